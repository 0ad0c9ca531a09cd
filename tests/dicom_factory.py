"""Small, complete DICOM objects made in code, for tests that need a few real files fast."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
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


def make_projection(
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    pixel_spacing: tuple[float, float] | None = None,
    imager_spacing: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    intent: str | None = None,
    number: int = 1,
    series: int = 1,
    samples: int = 1,
    pixels: np.ndarray | None = None,
) -> Dataset:
    """A small projection radiograph (12 bits stored), ultrasound or cine with file meta.

    ``pixels`` replaces the default 8x10 ramp: uint8 or uint16, ``(rows, cols[, samples])``
    or ``(frames, rows, cols[, samples])`` (several frames: Number of Frames is set).
    """
    classes = {
        "DX": "1.2.840.10008.5.1.4.1.1.1.1",
        "CR": "1.2.840.10008.5.1.4.1.1.1",
        "MG": "1.2.840.10008.5.1.4.1.1.1.2",
        "US": "1.2.840.10008.5.1.4.1.1.6.1",
        "XA": "1.2.840.10008.5.1.4.1.1.12.1",
        "CT": CTImageStorage,
    }
    ds = make_ct(series_uid=f"1.2.826.0.1.3680043.8.498.7{series}", number=number)
    ds.SOPClassUID = classes.get(modality, "1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = modality
    ds.PhotometricInterpretation = photometric
    if pixels is None:
        pixels = ((np.arange(80, dtype=np.uint16) * 97 + number * 13) % 4096).reshape(8, 10)
        ds.BitsStored, ds.HighBit = 12, 11
    else:
        ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
    ds.SamplesPerPixel = samples
    if samples > 1:
        ds.PlanarConfiguration = 0
    spatial = pixels.ndim - (1 if samples > 1 else 0)
    if spatial == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[spatial - 2], pixels.shape[spatial - 1]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_spacing)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if intent is not None:
        ds.PresentationIntentType = intent
    return ds


def make_ct_stack(
    positions: Sequence[Sequence[float]],
    phantom: Callable[[np.ndarray], np.ndarray],
    *,
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    pixel_spacing: tuple[float, float] = (1.0, 0.5),
    rows: int = 16,
    columns: int = 12,
    gantry_tilt: float | None = None,
    series: int = 1,
) -> list[Dataset]:
    """A CT series with one slice at each ImagePositionPatient of ``positions`` (any spacing,
    stacked along the normal or sheared like a gantry-tilted one), in that (instance) order.

    ``phantom`` maps patient coordinates (LPS mm, shape ``(rows, columns, 3)``) to each
    voxel's value: uint16 pixels (rounded), Rescale Intercept 0; the attributes
    de-identification and write-back need are set.
    """
    o = np.asarray(orientation, dtype=np.float64)
    row_dir, col_dir = o[:3], o[3:]
    jj, ii = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    out = []
    for k, position in enumerate(positions):
        ds = make_ct(series_uid=f"1.2.826.0.1.3680043.8.498.9{series}", number=k + 1)
        ipp = np.asarray(position, dtype=np.float64)
        ds.ImagePositionPatient = [f"{v:.10g}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in o]
        ds.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
        ds.Rows, ds.Columns = rows, columns
        points = (
            ipp
            + (jj * pixel_spacing[0])[..., None] * col_dir
            + (ii * pixel_spacing[1])[..., None] * row_dir
        )
        plane = np.rint(phantom(points)).astype(np.uint16)
        ds.PixelData = plane.tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.SliceThickness = 1.0
        if gantry_tilt is not None:
            ds.GantryDetectorTilt = gantry_tilt
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
        ds.PositionReferenceIndicator = ""
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = "F"
        ds.SeriesDescription = "head"
        ds.Manufacturer = "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        out.append(ds)
    return out
