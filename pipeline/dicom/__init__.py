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

from pydicom._uid_dict import UID_dictionary

from pipeline.dicom.atomic import (
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    sync_filesystem,
)
from pipeline.dicom.volume import Volume, VolumeGrid, lps_to_ras

# Transfer syntaxes newer than pydicom 3.0's dictionary (PS3.5 2024+), as pynetdicom adds them
# on import: registered here too, so whether a file with one of them can be written does not
# depend on whether pynetdicom happens to be imported (it is only for DIMSE sources); a
# Deflated Image Frame Compression object failed to export without it.
_TS = "Transfer Syntax"
UID_dictionary.update(
    {
        "1.2.840.10008.1.2.4.110": ("JPEG XL Lossless", _TS, "", "", "JPEGXLLossless"),
        "1.2.840.10008.1.2.4.111": (
            "JPEG XL JPEG Recompression", _TS, "", "", "JPEGXLJPEGRecompression",
        ),
        "1.2.840.10008.1.2.4.112": ("JPEG XL", _TS, "", "", "JPEGXL"),
        "1.2.840.10008.1.2.8.1": (
            "Deflated Image Frame Compression", _TS, "", "", "DeflatedImageFrameCompression",
        ),
    }
)  # fmt: skip

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
