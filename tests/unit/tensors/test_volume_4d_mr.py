"""4D and multi-volume MR as dcm2niix makes it (issue #21 section 1): diffusion by b-value and
direction, fMRI without Temporal Position Identifier, several acquisitions under one Series
Instance UID, non-image objects."""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import make_ct
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from pipeline.errors import GeometryError
from pipeline.tensors.volume import build_volumes, is_volume_candidate

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
OBLIQUE = (0.98, 0.0, 0.198997, 0.0, 1.0, 0.0)  # a 11.5 degree rotation about y


def _mr(
    z: float, number: int, value: int, iop: Sequence[float] = OBLIQUE, **attrs: object
) -> Dataset:
    ds = make_ct(number=number)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR
    ds.Modality = "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.ImagePositionPatient = [
        f"{v:.6f}" for v in np.asarray([-10.0, -20.0, 5.0]) + z * np.cross(row, col)
    ]
    ds.PixelSpacing = ["2", "2"]
    ds.PixelData = np.full((8, 8), value, dtype=np.uint16).tobytes()
    for key, val in attrs.items():
        setattr(ds, key, val)
    return ds


def _series(
    n_volumes: int, zs: Sequence[float] = (0.0, 3.0, 6.0), **per_volume: list[object]
) -> list[Dataset]:
    """Volume-major instance numbers (as scanners write them); pixel value 100 t + k."""
    out = []
    for t in range(n_volumes):
        for k, z in enumerate(zs):
            attrs = {key: values[t] for key, values in per_volume.items()}
            out.append(_mr(z, number=t * len(zs) + k + 1, value=100 * t + k, **attrs))
    return out


def _values(volumes: Sequence[object]) -> list[int]:
    return [int(v.array[0, 0, 0]) // 100 for v in volumes]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# diffusion
# ---------------------------------------------------------------------------------------------

DIRECTIONS = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.6, 0.8), (0.0, 0.0, 1.0)]
BVALUES = [0.0, 1000.0, 1000.0, 1000.0]


def test_classic_diffusion_splits_by_direction_in_acquisition_order() -> None:
    """Standard Diffusion b-value/Gradient Orientation on classic MR: three b=1000 volumes
    differ only in direction (refused before: "no temporal/echo/b-value attribute")."""
    datasets = _series(
        4,
        DiffusionBValue=BVALUES,
        DiffusionGradientOrientation=[list(d) for d in DIRECTIONS],
    )
    random.Random(5).shuffle(datasets)
    volumes = build_volumes(datasets)
    assert _values(volumes) == [0, 1, 2, 3]  # InstanceNumber order, not b-value order
    assert [v.bvalue for v in volumes] == BVALUES
    assert [v.bvec for v in volumes] == DIRECTIONS
    row, col = np.asarray(OBLIQUE[:3]), np.asarray(OBLIQUE[3:])
    for vol in volumes:
        v = np.asarray(vol.bvec)
        np.testing.assert_allclose(
            vol.bvec_dcm2niix, [v @ row, -(v @ col), v @ np.cross(row, col)], atol=1e-12
        )


def _ge_private(ds: Dataset, b: float, vec: Sequence[float]) -> None:
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    acq = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    for offset, v in zip((0xBB, 0xBC, 0xBD), vec, strict=True):
        acq.add_new(offset, "DS", f"{v:.6f}")
    parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    parm.add_new(0x39, "IS", [int(1e9 + b), 8, 0, 0])


def test_ge_private_diffusion_with_repeated_b0_in_image_frame() -> None:
    """GE: b-value in (0043,xx39)[0] (1e9 + b), direction in the image frame in
    (0019,xxBB-BD); two b=0 volumes share every attribute and are told apart by order."""
    bvals = [0.0, 1000.0, 0.0, 1000.0]
    vecs = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0)]
    datasets = _series(4)
    for ds in datasets:
        t = (int(ds.InstanceNumber) - 1) // 3
        _ge_private(ds, bvals[t], vecs[t])
    random.Random(2).shuffle(datasets)
    volumes = build_volumes(datasets)
    assert _values(volumes) == [0, 1, 2, 3]
    assert [v.bvalue for v in volumes] == bvals
    row, col = np.asarray(OBLIQUE[:3]), np.asarray(OBLIQUE[3:])
    np.testing.assert_allclose(volumes[1].bvec, row, atol=1e-6)  # image x = row direction
    np.testing.assert_allclose(volumes[3].bvec, col, atol=1e-6)
    np.testing.assert_allclose(volumes[1].bvec_dcm2niix, [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(volumes[3].bvec_dcm2niix, [0, -1, 0], atol=1e-6)


def test_philips_private_diffusion() -> None:
    datasets = _series(3)
    for ds in datasets:
        t = (int(ds.InstanceNumber) - 1) // 3
        ds.Manufacturer = "Philips Medical Systems"
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(
            0x03, "FL", BVALUES[t]
        )
        block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        for offset, v in zip((0xB0, 0xB1, 0xB2), DIRECTIONS[t], strict=True):
            block.add_new(offset, "FL", v)
    volumes = build_volumes(datasets[::-1])
    assert [v.bvalue for v in volumes] == BVALUES[:3]
    assert [v.bvec for v in volumes] == DIRECTIONS[:3]


def test_diffusion_volume_mixing_directions_is_refused() -> None:
    datasets = _series(2, DiffusionBValue=[1000.0, 1000.0])
    d1, d2 = DIRECTIONS[1], DIRECTIONS[2]
    for ds, d in zip(datasets, [d1, d2, d1, d1, d1, d2], strict=True):
        ds.DiffusionGradientOrientation = list(d)
    with pytest.raises(GeometryError, match="different b-values or gradient directions"):
        build_volumes(datasets)


# ---------------------------------------------------------------------------------------------
# fMRI without Temporal Position Identifier (GE)
# ---------------------------------------------------------------------------------------------


def _ge_fmri(n_volumes: int = 3, zs: Sequence[float] = (0.0, 3.0, 6.0)) -> list[Dataset]:
    """GE-like: one AcquisitionNumber, TriggerTime = the slice's time within the TR (repeats
    every volume), Number of Temporal Positions and Images in Acquisition, instance order."""
    datasets = _series(n_volumes, zs)
    for ds in datasets:
        k = (int(ds.InstanceNumber) - 1) % len(zs)
        t = (int(ds.InstanceNumber) - 1) // len(zs)
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.AcquisitionNumber = 1
        ds.TriggerTime = f"{k * 600:.1f}"
        ds.NumberOfTemporalPositions = n_volumes
        ds.ImagesInAcquisition = n_volumes * len(zs)
        ds.AcquisitionTime = f"1200{t * 2:02d}.{k * 6:d}"
    return datasets


def test_ge_fmri_ordered_by_instance_number() -> None:
    datasets = _ge_fmri()
    random.Random(7).shuffle(datasets)
    volumes = build_volumes(datasets)
    assert _values(volumes) == [0, 1, 2]
    for vol in volumes:
        assert [int(v) % 100 for v in vol.array[:, 0, 0]] == [0, 1, 2]
        assert vol.bvalue is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda ds: setattr(ds, "NumberOfTemporalPositions", 4), "says 4 time points"),
        (
            lambda ds: (
                setattr(ds, "AcquisitionTime", "1159" + ds.AcquisitionTime[4:])
                if int(ds.InstanceNumber) > 6
                else None
            ),
            "InstanceNumber and AcquisitionTime disagree",
        ),
    ],
    ids=["temporal-count", "time-order"],
)
def test_ge_fmri_conflicting_attributes_refused(change: object, match: str) -> None:
    datasets = _ge_fmri()
    for ds in datasets:
        change(ds)  # type: ignore[operator]
    with pytest.raises(GeometryError, match=match) as info:
        build_volumes(datasets)
    assert "1.2.826" not in str(info.value)  # no UID in the reason


def test_ge_fmri_incomplete_time_point_refused() -> None:
    datasets = _ge_fmri()[:-1]
    with pytest.raises(GeometryError, match="hold 2 to 3 frames each"):
        build_volumes(datasets)


def test_repeated_positions_without_evidence_still_refused() -> None:
    datasets = _series(2)  # no temporal count, no diffusion: duplicates, not a time series
    with pytest.raises(GeometryError, match="duplicate slice positions"):
        build_volumes(datasets)


# ---------------------------------------------------------------------------------------------
# several acquisitions under one Series Instance UID
# ---------------------------------------------------------------------------------------------


def _enhanced_copy(classic: Sequence[Dataset]) -> Dataset:
    """An Enhanced MR object holding the frames of ``classic`` (same geometry, same values)."""
    ds = make_ct(number=99)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.Modality = "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = len(classic)
    ds.PixelData = b"".join(c.PixelData for c in classic)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = classic[0].PixelSpacing
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ori = Dataset()
    ori.ImageOrientationPatient = classic[0].ImageOrientationPatient
    shared.PlaneOrientationSequence = DicomSequence([ori])
    ftype = Dataset()
    ftype.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ftype.ComplexImageComponent = "MAGNITUDE"
    shared.MRImageFrameTypeSequence = DicomSequence([ftype])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per = []
    for c in classic:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = c.ImagePositionPatient
        item.PlanePositionSequence = DicomSequence([pos])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    return ds


def test_classic_and_enhanced_copy_are_two_acquisitions() -> None:
    classic = _series(1)
    for ds in classic:  # the enhanced frames' type, so no frame-type attribute tells them apart
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE", "MAGNITUDE"]
    enhanced = _enhanced_copy(classic)
    volumes = build_volumes([*classic, enhanced])
    assert len(volumes) == 2
    assert sorted(v.acquisition or "" for v in volumes) == [
        "Enhanced MR Image Storage/ORIGINAL",
        "MR Image Storage/ORIGINAL",
    ]
    np.testing.assert_array_equal(volumes[0].array, volumes[1].array)
    np.testing.assert_allclose(volumes[0].affine, volumes[1].affine)
    assert build_volumes(classic)[0].acquisition is None  # one acquisition: nothing to say


def test_derived_copy_refusal_names_its_acquisition() -> None:
    original = _series(1)
    derived = _series(1, zs=(0.0, 3.0))  # a derived copy of two slices only: single, broken
    for ds in derived:
        ds.ImageType = ["DERIVED", "SECONDARY", "M", "ND"]
        ds.SOPInstanceUID = ds.SOPInstanceUID[:-2] + ".9"
    derived = derived[:1]
    with pytest.raises(GeometryError, match=r"2 acquisitions .*MR Image Storage/DERIVED: single"):
        build_volumes([*original, *derived])


def test_non_image_objects_are_no_volume_candidates() -> None:
    image = _series(1)[0]
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    seg = _series(1)[0]
    seg.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation: pixels, but labels
    assert is_volume_candidate(image)
    assert not is_volume_candidate(sr)
    assert not is_volume_candidate(seg)


# ---------------------------------------------------------------------------------------------
# real data: UIH DTI (GRID images, private b-values and directions) against dcm2niix
# ---------------------------------------------------------------------------------------------

UIH = Path("dicom/dcm_qa_uih")


def _uih_volumes(shared_data: Path) -> list[object]:
    files = sorted((shared_data / UIH / "In/DTI_134434").rglob("*.dcm"))
    return build_volumes([pydicom.dcmread(f) for f in files][::-1])


@pytest.mark.shared_data
def test_uih_dti_matches_dcm2niix_bval_bvec(shared_data: Path) -> None:
    volumes = _uih_volumes(shared_data)
    ref = shared_data / UIH / "Ref"
    bval = [float(x) for x in (ref / "dti_tra_dir16_AP_9_134431.bval").read_text().split()]
    rows = (ref / "dti_tra_dir16_AP_9_134431.bvec").read_text().splitlines()
    bvec = np.asarray([[float(x) for x in r.split()] for r in rows]).T
    assert len(volumes) == len(bval) == 17
    assert [float(f"{v.bvalue:g}") for v in volumes] == bval  # type: ignore[attr-defined]
    ours = np.asarray([v.bvec_dcm2niix for v in volumes])  # type: ignore[attr-defined]
    np.testing.assert_allclose(ours, bvec, atol=1e-4, rtol=0)
    for vol in volumes:  # the patient-frame vector is a unit vector (or zero for b ~ 0)
        assert np.linalg.norm(vol.bvec) == pytest.approx(1.0 if vol.bvalue > 10 else 0.0, abs=1e-5)  # type: ignore[attr-defined]


@pytest.mark.shared_data
@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
def test_uih_dti_voxels_match_live_dcm2niix(shared_data: Path, tmp_path: Path) -> None:
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    subprocess.run(
        ["dcm2niix", "-o", str(tmp_path), "-f", "dti", str(shared_data / UIH / "In/DTI_134434")],
        check=True,
        capture_output=True,
    )
    ref = nib.load(tmp_path / "dti.nii")
    data = np.asanyarray(ref.dataobj)
    volumes = _uih_volumes(shared_data)
    assert data.shape == (64, 64, 20, 17)
    for t, vol in enumerate(volumes):
        img = nib.Nifti1Image(np.moveaxis(vol.array, (0, 1, 2), (2, 1, 0)), vol.affine_ras)  # type: ignore[attr-defined]
        out = img.as_reoriented(
            ornt_transform(io_orientation(img.affine), io_orientation(ref.affine))
        )
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(np.asanyarray(out.dataobj), data[..., t])


@pytest.mark.shared_data
@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix is not installed")
def test_ge_dti_by_instance_order_matches_live_dcm2niix(shared_data: Path, tmp_path: Path) -> None:
    """dicom2nifti's GE DTI: 16 classic slices at 4 positions, every direction anonymised to
    b = 0 (GE private elements): 4 volumes in InstanceNumber order, dcm2niix's voxels."""
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    folder = shared_data / "dicom/dicom2nifti/tests/data/ge/dti/002"
    subprocess.run(
        ["dcm2niix", "-o", str(tmp_path), "-f", "ge", str(folder)], check=True, capture_output=True
    )
    ref = nib.load(tmp_path / "ge.nii")
    data = np.asanyarray(ref.dataobj)
    volumes = build_volumes([pydicom.dcmread(f) for f in sorted(folder.iterdir())])
    assert data.shape == (64, 64, 4, 4)
    assert len(volumes) == 4
    for t, vol in enumerate(volumes):
        assert vol.bvalue == 0.0
        img = nib.Nifti1Image(np.moveaxis(vol.array, (0, 1, 2), (2, 1, 0)), vol.affine_ras)
        out = img.as_reoriented(
            ornt_transform(io_orientation(img.affine), io_orientation(ref.affine))
        )
        # the slice step: ours from the positions (4 slices: their mean step), dcm2niix's
        # from the first two, 3e-4 mm apart -- within test_volume.py's 1e-3 mm
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-3, rtol=0)
        np.testing.assert_array_equal(np.asanyarray(out.dataobj), data[..., t])


def test_diffusion_series_through_the_stages(shared_data: Path, tmp_path: Path) -> None:
    """The tensors stage reads classic images with its fast header reader: it must not drop
    the private diffusion and GRID elements the split needs (found at merge: the stage refused
    the UIH DTI series that build_volumes on dcmread datasets splits)."""
    from pipeline.config import load_config
    from pipeline.connectors import FolderSource
    from pipeline.crawl import run as crawl_run
    from pipeline.deid.stage import run as deid_run
    from pipeline.lake import LakePaths, read_table
    from pipeline.tensors.stage import run as tensors_run

    archive = tmp_path / "dti"
    shutil.copytree(shared_data / UIH / "In/DTI_134434", archive)
    cfg = load_config(overrides={"compute": {"workers": 1}}, environ={})
    lake = LakePaths(tmp_path / "lake")
    crawl_run(cfg, lake, FolderSource(archive), run_id="c")
    deid_run(cfg, lake, key=b"k" * 32, run_id="d")
    result = tensors_run(cfg, lake, run_id="t")
    assert result.counts.extra == {"volumes": 17, "refused_series": 0}
    rows = sorted(read_table(lake, "tensors").to_pylist(), key=lambda r: r["volume_index"])
    bvals = (shared_data / UIH / "Ref").glob("*.bval")
    expected = [float(v) for v in next(bvals).read_text().split()]
    assert [float(f"{r['bvalue']:g}") for r in rows] == expected  # the .bval is %g
