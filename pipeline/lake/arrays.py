"""``.npy`` arrays in the research zone: tensors and masks, written atomically and hashed."""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.dicom.atomic import atomic_open

if TYPE_CHECKING:
    from pipeline.lake.paths import LakePaths

__all__ = ["load_tensor", "write_npy"]


def load_tensor(lake: LakePaths, path: str) -> np.ndarray[Any, Any]:
    """Load a stored volume by its ``tensors.path`` (relative to ``research/``)."""
    return np.load(lake.research / path, allow_pickle=False)


def write_npy(path: Path, array: np.ndarray[Any, Any]) -> str:
    """Write ``array`` as a ``.npy`` file (the bytes ``np.save`` writes) atomically, without
    copying it, and return ``"sha256:<hex>"`` of the file. Not fsynced: the caller flushes
    the filesystem once per batch."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    data = array.data.cast("B") if array.size else memoryview(b"")
    digest = hashlib.sha256(header.getvalue())
    # hashlib releases the GIL on large buffers: hash on a second thread while writing
    hasher = threading.Thread(target=digest.update, args=(data,), name="write_npy-sha256")
    hasher.start()
    try:
        with atomic_open(path, durable=False) as fh:
            fh.write(header.getvalue())
            fh.write(data)
    finally:
        hasher.join()
    return "sha256:" + digest.hexdigest()
