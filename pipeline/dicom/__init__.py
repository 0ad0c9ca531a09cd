"""The DICOM core under the stages: raw elements, atomic files, the ``Volume`` type.

One layer below the stages (next to :mod:`pipeline.lake` and :mod:`pipeline.connectors`):
every stage that reads or writes DICOM bytes, writes a file atomically or passes a volume on
uses these, so the rules live once.

- :mod:`pipeline.dicom.elements`: the raw element reader/writer (tag, VR, length, value;
  explicit/implicit VR little endian; undefined lengths; the one list of long-length VRs);
- :mod:`pipeline.dicom.atomic`: the atomic file writer (temporary file, fsync, rename);
- :mod:`pipeline.dicom.volume`: :class:`Volume`, from tensors through infer to write-back.

Neither torch nor monai is imported here (import-linter checks it).
"""

from pipeline.dicom.atomic import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    sync_filesystem,
)
from pipeline.dicom.volume import Volume, VolumeGrid, lps_to_ras

__all__ = [
    "Volume",
    "VolumeGrid",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "lps_to_ras",
    "sync_filesystem",
]
