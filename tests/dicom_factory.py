"""Small, complete DICOM objects made in code, for tests that need a few real files fast."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)


def make_ct(
    *,
    sop_uid: str | None = None,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    study_uid: str = "1.2.826.0.1.3680043.8.498.2",
    syntax: str = ExplicitVRLittleEndian,
    number: int = 1,
) -> Dataset:
    """A small but complete CT image dataset with file meta."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid(entropy_srcs=[str(number), series_uid])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = CTImageStorage
    ds.PatientID = "PAT-001"
    ds.PatientName = "DOE^JANE"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.StudyDate = "20260102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    arr = (np.arange(64, dtype=np.uint16) * number).reshape(8, 8)
    if syntax == RLELossless:
        ds.PixelData = arr.tobytes()
        ds.compress(RLELossless, arr)
    else:
        ds.PixelData = arr.tobytes()
    return ds


def write(ds: Dataset, path: Path, *, preamble: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds = ds.copy()
        del ds.file_meta
        buf = io.BytesIO()
        ds.save_as(buf, implicit_vr=True, little_endian=True)
        path.write_bytes(buf.getvalue())
    return path


def with_file_meta(ds: Dataset) -> Dataset:
    """Give a bare dataset (no preamble, no file meta) the meta a sender adds before STOW-RS."""
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", FileMetaDataset()):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds
