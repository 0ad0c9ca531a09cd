"""Write-back of masks over a gantry-tilted CT: the sheared (native) volume maps each mask slice
back onto its own frame; the de-tilted one is refused with the reason (issue #21 section 2)."""

from __future__ import annotations

import io
import math

import numpy as np
import pydicom
import pytest
from dicom_factory import make_ct

from pipeline.config import load_config
from pipeline.dicom.volume import Volume, VolumeGrid
from pipeline.errors import WritebackError
from pipeline.tensors.preprocess import preprocess_volume, volume_preprocessing_json
from pipeline.tensors.volume import build_volumes
from pipeline.writeback.objects import SegmentSpec, build_seg
from pipeline.writeback.segread import read_seg
from pipeline.writeback.stage import _plan

LUNG = SegmentSpec("lung", 4, ("123037004", "SCT", "Anatomical Structure"),
                   ("39607008", "SCT", "Lung"), volume_ml=1.5, mean_hu=-800.0)  # fmt: skip
BONE = SegmentSpec("bone", 3, ("85756007", "SCT", "Tissue"), ("272673000", "SCT", "Bone"),
                   volume_ml=0.25, mean_hu=450.0)  # fmt: skip
SIN = 0.3173047  # the GE head's 18.5 degrees


def _tilted(n: int = 5) -> list[pydicom.Dataset]:
    cos = math.sqrt(1 - SIN**2)
    out = []
    for k in range(n):
        ds = make_ct(number=k + 1)
        ds.ImagePositionPatient = [-10.0, -12.0, 30.0 + 4.2 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, f"{cos:.7f}", -SIN]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 4.0
        ds.GantryDetectorTilt = 18.5
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
        ds.PositionReferenceIndicator = ""
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = "F"
        ds.SeriesDescription = "head"
        ds.Manufacturer = "test"
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        out.append(ds)
    return out


def _seg(vol: Volume, sources: list[pydicom.Dataset], mask: np.ndarray) -> pydicom.Dataset:
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    ordered = [by_uid[u] for u in vol.sop_instance_uids]
    seg = build_seg(ordered, vol.frame_numbers, mask, [LUNG, BONE], model="m", model_version="1",
                    weights_sha256="sha256:00", series_instance_uid="2.25.1",
                    sop_instance_uid="2.25.2")  # fmt: skip
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _mask(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(3)
    mask = np.zeros(shape, np.uint8)
    mask[rng.random(shape) > 0.6] = 4
    mask[rng.random(shape) > 0.85] = 3
    return mask


def test_sheared_volume_masks_land_on_their_own_frames() -> None:
    """``gantry_tilt: sheared``: the tensor is the frames as stored (native grid, exact
    non-orthogonal affine), so a mask on it writes back slice for frame, and the SEG read
    back against the same volume is the mask."""
    sources = _tilted()
    cfg = load_config(overrides={"tensors": {"gantry_tilt": "sheared"}}, environ={})
    (raw,) = build_volumes(sources, allow_tilt=True)
    vol = preprocess_volume(raw, cfg.tensors)
    assert vol.grid is VolumeGrid.NATIVE
    mask = _mask(vol.array.shape)
    seg = _seg(vol, sources, mask)
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    for fg in seg.PerFrameFunctionalGroupsSequence:  # each frame sits on its source image
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ipp = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(ipp, [float(v) for v in by_uid[ref].ImagePositionPatient])
    got = read_seg(seg, vol)
    for number, spec in ((1, LUNG), (2, BONE)):
        label, plane = got[number]
        assert label == spec.label
        np.testing.assert_array_equal(plane, mask == spec.value)
    # the tensors row of the sheared volume says native: the stage's check lets it through
    row = {
        "affine": [float(x) for x in vol.affine.reshape(-1)],
        "spacing": list(vol.spacing),
        "sop_instance_uids": list(vol.sop_instance_uids),
        "frame_numbers": list(vol.frame_numbers),
        "preprocessing": volume_preprocessing_json(raw, cfg.tensors),
    }
    again = Volume.from_tensor_row(row, mask)
    assert again.on_source_grid
    np.testing.assert_allclose(again.affine, vol.affine)


def test_detilted_volume_masks_are_refused_with_the_reason() -> None:
    sources = _tilted()
    cfg = load_config(overrides={}, environ={})  # default: detilt
    (raw,) = build_volumes(sources, allow_tilt=True)
    vol = preprocess_volume(raw, cfg.tensors)
    assert vol.grid is VolumeGrid.RESAMPLED
    assert vol.array.shape[1] > raw.array.shape[1]  # rows added by the de-tilt
    # read_seg on the typed volume
    seg = _seg(raw, sources, _mask(raw.array.shape))
    with pytest.raises(WritebackError, match="resampled"):
        read_seg(seg, vol)
    # the write-back stage, from the tensors row's preprocessing
    prep = volume_preprocessing_json(raw, cfg.tensors)
    row = {
        "affine": [float(x) for x in vol.affine.reshape(-1)],
        "spacing": list(vol.spacing),
        "sop_instance_uids": list(vol.sop_instance_uids),
        "frame_numbers": list(vol.frame_numbers),
        "preprocessing": prep,
    }
    assert not Volume.from_tensor_row(row, vol.array).on_source_grid
    with pytest.raises(WritebackError, match=r"de-tilted.*gantry_tilt: sheared"):
        _plan(None, None, None, None, {"preprocessing": prep})  # type: ignore[arg-type]
