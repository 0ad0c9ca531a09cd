"""Detected boxes written back as TID 1500 (issue #22, §4): one volumetric ROI group per box,
the box as a SCOORD3D ELLIPSOID in the source frame of reference; highdicom and dciodvfy
accept the SR, and reading it back gives the findings' mm boxes and scores exactly."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_factory import make_ct

from pipeline.writeback.boxes import BoxSpec, box_of_ellipsoid, build_box_sr, ellipsoid_of_box
from pipeline.writeback.stage import dciodvfy_errors

NODULE = (("123037004", "SCT", "Anatomical Structure"), ("27925004", "SCT", "Nodule"))
BOXES = [
    BoxSpec("lung_nodule_1", *NODULE, box_mm=(-2.2, 36.8, -76.25, 2.0, 42.4, -71.25), score=0.97),
    BoxSpec("lung_nodule_2", *NODULE, box_mm=(10.0, -5.5, -80.0, 17.5, 1.0, -70.0), score=0.61),
]


def _sources() -> list[pydicom.Dataset]:
    out = []
    for k in range(4):
        ds = make_ct(number=k + 1)
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
        ds.ImagePositionPatient = [-12.0, 30.5, -80.0 + 1.25 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 1.25
        ds.PatientSex = "F"
        ds.PatientBirthDate = "19700101"
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        out.append(ds)
    return out


def test_ellipsoid_points_give_the_box_back() -> None:
    box = (-2.2, 36.8, -76.25, 2.0, 42.4, -71.25)
    assert box_of_ellipsoid(ellipsoid_of_box(box)) == pytest.approx(box, abs=0)


def test_box_sr_is_valid_and_reads_back(tmp_path: Path) -> None:
    sr = build_box_sr(
        _sources(),
        BOXES,
        model="lung_nodule_ct_detection",
        model_version="0.6.8",
        weights_sha256="sha256:" + "ab" * 32,
        device_uid=hd.UID(),
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
    )
    path = tmp_path / "sr.dcm"
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    errors = dciodvfy_errors(path)
    assert not errors, errors[:3]
    back = hd.sr.srread(path)
    groups = back.content.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == ["lung_nodule_1", "lung_nodule_2"]
    for group, spec in zip(groups, BOXES, strict=True):
        surface = group.roi
        assert isinstance(surface, hd.sr.VolumeSurface)
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.ELLIPSOID
        points = np.asarray(surface.graphic_data, dtype=np.float64).reshape(-1, 3)
        assert points.shape == (6, 3)
        assert box_of_ellipsoid(points) == pytest.approx(spec.box_mm, abs=1e-4)
        assert surface.frame_of_reference_uid == "1.2.826.0.1.3680043.8.498.3"
        by_name = {m.name.meaning: m.value for m in group.get_measurements()}
        assert by_name["Probability"] == pytest.approx(spec.score)
        assert by_name["Width"] == pytest.approx(spec.box_mm[3] - spec.box_mm[0])
        assert by_name["Depth"] == pytest.approx(spec.box_mm[5] - spec.box_mm[2])
