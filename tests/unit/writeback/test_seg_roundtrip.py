"""SEG and SR objects: what the writer puts on each source frame, the reader finds there;
a real SEG from another tool is read onto the right slices; UIDs are deterministic."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import make_ct

from pipeline.errors import WritebackError
from pipeline.lake.keys import Pseudonymizer
from pipeline.tensors.volume import build_volume
from pipeline.writeback.objects import SegmentSpec, build_seg, build_sr
from pipeline.writeback.segread import read_seg

LUNG = SegmentSpec("lung", 4, ("123037004", "SCT", "Anatomical Structure"),
                   ("39607008", "SCT", "Lung"), volume_ml=1.5, mean_hu=-800.0)  # fmt: skip
BONE = SegmentSpec("bone", 3, ("85756007", "SCT", "Tissue"), ("272673000", "SCT", "Bone"),
                   volume_ml=0.25, mean_hu=450.0)  # fmt: skip


def _series(n: int = 5) -> list[pydicom.Dataset]:
    out = []
    for k in range(n):
        ds = make_ct(number=k + 1)
        ds.ImagePositionPatient = [-10.0, -12.0, 30.0 - 2.5 * k]  # stored top-down
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
        ds.PositionReferenceIndicator = ""
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = "F"
        ds.SeriesDescription = "chest"
        ds.Manufacturer = "test"
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        out.append(ds)
    return out


def _mask(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(1)
    mask = np.zeros(shape, np.uint8)
    mask[rng.random(shape) > 0.7] = 4
    mask[rng.random(shape) > 0.85] = 3
    mask[2] = 0  # an empty slice: its frame is left out, the others must still land right
    return mask


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_writer_and_reader_agree_on_every_frame() -> None:
    sources = _series()
    vol = build_volume(sources)  # slices sorted along the normal: reversed file order
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    ordered = [by_uid[u] for u in vol.sop_instance_uids]
    mask = _mask(vol.array.shape)
    seg = build_seg(ordered, vol.frame_numbers, mask, [LUNG, BONE], model="m", model_version="1",
                    weights_sha256="sha256:00", series_instance_uid="2.25.1",
                    sop_instance_uid="2.25.2")  # fmt: skip
    seg = _roundtrip(seg)
    assert seg.NumberOfFrames == 2 * 4  # two segments on the 4 non-empty slices
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    got = read_seg(seg, vol)
    assert {label for label, _ in got.values()} == {"lung", "bone"}
    for number, spec in ((1, LUNG), (2, BONE)):
        label, m = got[number]
        assert label == spec.label
        np.testing.assert_array_equal(m, mask == spec.value)
    # each frame references the source image it overlays
    for fg in seg.PerFrameFunctionalGroupsSequence:
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = float(fg.PlanePositionSequence[0].ImagePositionPatient[2])
        assert float(by_uid[ref].ImagePositionPatient[2]) == pytest.approx(z)
    sr = _roundtrip(build_sr(seg, ordered, [LUNG, BONE], model="m", model_version="1",
                             weights_sha256="sha256:00", device_uid="2.25.9",
                             series_instance_uid="2.25.3", sop_instance_uid="2.25.4"))  # fmt: skip
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    text = str(sr)
    assert "Lung" in text
    assert "1.5" in text


def test_bad_inputs_are_explained() -> None:
    sources = _series(3)
    with pytest.raises(WritebackError, match="does not match 2 source slices"):
        build_seg(sources[:2], [1, 1], np.zeros((3, 8, 8), np.uint8), [LUNG], model="m",
                  model_version="1", weights_sha256="x", series_instance_uid="2.25.1",
                  sop_instance_uid="2.25.2")  # fmt: skip
    with pytest.raises(WritebackError, match="no segments"):
        build_seg(sources, [1, 1, 1], np.zeros((3, 8, 8), np.uint8), [], model="m",
                  model_version="1", weights_sha256="x", series_instance_uid="2.25.1",
                  sop_instance_uid="2.25.2")  # fmt: skip


def test_result_uids_are_deterministic_and_keyed() -> None:
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    parts = ("writeback", "model\x1f1.0\x1fsha\x1f1.2.3\x1f0", "SEG")
    assert a.derived_uid(*parts) == a.derived_uid(*parts)
    assert a.derived_uid(*parts) != b.derived_uid(*parts)
    assert a.derived_uid(*parts) != a.derived_uid(
        "writeback", "model\x1f2.0\x1fsha\x1f1.2.3\x1f0", "SEG"
    )
    uid = a.derived_uid(*parts)
    assert uid.startswith("2.25.")
    assert len(uid) <= 64


@pytest.mark.shared_data
def test_real_seg_lands_on_the_right_slices(shared_data: Path) -> None:
    """pydicom-data's liver SEG (made by another tool, no Spatial Locations Preserved) over
    dcmqi's three CT slices: each SEG frame lands on the slice at its Plane Position."""
    seg = pydicom.dcmread(shared_data / "dicom/pydicom-data/data_store/data/liver.dcm")
    folder = shared_data / "dicom/dcmqi/data/segmentations/ct-3slice"
    sources = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    vol = build_volume(sources)
    got = read_seg(seg, vol)
    ((label, mask),) = got.values()
    assert label == "Liver"
    frames = seg.pixel_array
    for index, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = list(vol.sop_instance_uids).index(ref)  # the slice of the image it was made on
        np.testing.assert_array_equal(mask[k], frames[index] > 0)
    assert mask.sum() == int((frames > 0).sum())


def test_reader_refuses_a_volume_off_the_source_grid() -> None:
    """Write-back takes the typed Volume and checks its grid attribute (issue #19): a
    reoriented or resampled volume is refused, whatever its preprocessing JSON looks like."""
    import dataclasses

    from pipeline.dicom.volume import VolumeGrid

    sources = _series()
    vol = build_volume(sources)
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    ordered = [by_uid[u] for u in vol.sop_instance_uids]
    seg = build_seg(ordered, vol.frame_numbers, _mask(vol.array.shape), [LUNG, BONE], model="m",
                    model_version="1", weights_sha256="sha256:00",
                    series_instance_uid="2.25.1", sop_instance_uid="2.25.2")  # fmt: skip
    seg = _roundtrip(seg)
    assert vol.grid is VolumeGrid.NATIVE
    read_seg(seg, vol)
    for grid in (VolumeGrid.REORIENTED, VolumeGrid.RESAMPLED):
        with pytest.raises(WritebackError, match=grid.value):
            read_seg(seg, dataclasses.replace(vol, grid=grid))
