"""Synthetic studies for the model-zoo classification and multi-sequence tests (issue #22):
a mammography series of 2D images, and brain MR studies of four sequences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom_factory import make_ct, make_projection, write
from pydicom import Dataset

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: (SeriesDescription, RepetitionTime, EchoTime, InversionTime, FlipAngle): what tells the
#: sequences apart in the research tables
SEQUENCES = {
    "T1c": ("t1_mprage_post", 2300.0, 2.3, 900.0, 8.0),
    "T1": ("t1_se", 500.0, 12.0, None, 90.0),
    "T2": ("t2_tse", 4000.0, 100.0, None, 150.0),
    "FLAIR": ("t2_flair", 9000.0, 85.0, 2500.0, 150.0),
}


def _study_attrs(ds: Dataset, patient: str) -> Dataset:
    ds.PatientID = patient
    ds.PatientName = f"DOE^{patient}"
    ds.AccessionNumber = f"A{patient[-3:]}"
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.Manufacturer = "test"
    return ds


def mammograms(out: Path, *, images: int = 2, rows: int = 96, cols: int = 64) -> list[Path]:
    """A MG series of ``images`` 2D mammograms (12 bits, a bright breast on black)."""
    paths = []
    rng = np.random.default_rng(11)
    for n in range(1, images + 1):
        px = np.zeros((rows, cols), np.uint16)
        yy, xx = np.mgrid[:rows, :cols]
        breast = (yy - rows / 2) ** 2 / (rows / 2.2) ** 2 + xx**2 / (cols * 0.8) ** 2 < 1
        px[breast] = (rng.normal(1800 + 400 * n, 300, breast.sum())).clip(0, 4095).astype(np.uint16)
        ds = make_projection(modality="MG", pixels=px, imager_spacing=(0.1, 0.1), number=n)
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.90"
        ds.BitsStored, ds.HighBit = 12, 11
        ds.ViewPosition = "CC" if n == 1 else "MLO"
        ds.ImageLaterality = "L"
        _study_attrs(ds, "MG-001")
        paths.append(write(ds, out / f"mg{n}.dcm"))
    return paths


def brain_study(
    out: Path,
    *,
    study: int,
    sequences: tuple[str, ...] = ("T1c", "T1", "T2", "FLAIR"),
    shape: tuple[int, int, int] = (32, 64, 64),
    spacing: float = 2.0,
) -> dict[str, list[Path]]:
    """One MR study: a series per sequence, ``shape`` (slices, rows, cols) at ``spacing`` mm,
    a bright ball (the "tumour") in a grey head. T2 is acquired on a shifted, coarser grid
    (as a real protocol's series differ), so the inputs must be resampled."""
    study_uid = f"1.2.826.0.1.3680043.8.498.9{study}"
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    c = np.array(shape) / 2
    head = ((z - c[0]) / (shape[0] * 0.45)) ** 2 + ((y - c[1]) / (shape[1] * 0.45)) ** 2 + (
        (x - c[2]) / (shape[2] * 0.45)
    ) ** 2 < 1
    ball = (z - c[0]) ** 2 + (y - c[1] + 8) ** 2 + (x - c[2] - 6) ** 2 < 36
    out_paths: dict[str, list[Path]] = {}
    for number, name in enumerate(sequences, start=1):
        desc, tr, te, ti, flip = SEQUENCES[name]
        step = spacing * (1.25 if name == "T2" else 1.0)
        n_slices = shape[0] if name != "T2" else int(shape[0] / 1.25)
        vol = np.where(head, 400 + 100 * number, 0) + np.where(ball, 300 * number, 0)
        series_uid = f"{study_uid}.{number}"
        paths = []
        for k in range(n_slices):
            src = min(round(k * step / spacing), shape[0] - 1)
            ds = make_ct(series_uid=series_uid, study_uid=study_uid, number=k + 1)
            ds.SOPClassUID = MR_STORAGE
            ds.file_meta.MediaStorageSOPClassUID = MR_STORAGE
            ds.Modality = "MR"
            ds.SeriesNumber = number
            ds.SeriesDescription = desc
            ds.Rows, ds.Columns = shape[1], shape[2]
            ds.PixelData = np.ascontiguousarray(vol[src].astype(np.uint16)).tobytes()
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            shift = 1.0 if name == "T2" else 0.0
            ds.ImagePositionPatient = [-64.0 + shift, -64.0, -32.0 + k * step]
            ds.PixelSpacing = [spacing, spacing]
            ds.SliceThickness = step
            ds.FrameOfReferenceUID = f"{study_uid}.0"
            ds.PositionReferenceIndicator = ""
            ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = tr, te, flip
            if ti is not None:
                ds.InversionTime = ti
            ds.ScanningSequence = ["IR"] if ti is not None else ["SE"]
            ds.MagneticFieldStrength = 3.0
            _study_attrs(ds, f"MR-00{study}")
            paths.append(write(ds, out / f"study{study}" / name / f"{k:03d}.dcm"))
        out_paths[name] = paths
    return out_paths
