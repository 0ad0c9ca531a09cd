"""Variable slice spacing (issue #21 section 2): equalized onto a uniform grid as dcm2niix's
``_Eq`` output does (after de-tilting, its ``_Tilt_Eq`` order), recorded in the preprocessing;
missing slices still refused.

The synthetic phantoms are linear in patient coordinates and their geometry rational (a tilt
with sine 0.6), so every equalized voxel whose sources lie inside the frames is known exactly
from the output affine alone."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_factory import make_ct_stack, write
from pydicom import Dataset

from pipeline.config import load_config
from pipeline.dicom.volume import Volume, VolumeGrid
from pipeline.errors import GeometryError, WritebackError
from pipeline.tensors.preprocess import (
    detilt,
    equalize,
    equalize_plan,
    preprocess_volume,
    shear_of,
    volume_preprocessing_json,
)
from pipeline.tensors.volume import build_volumes

#: distances along the normal (mm): 2 mm, then 1, then 3 mm steps -- not a grid with holes
DISTANCES = (0.0, 2.0, 4.0, 5.0, 8.0, 11.0, 14.0)
ORIGIN = np.array([-6.0, -4.0, 30.0])
ROW = np.array([1.0, 0.0, 0.0])
# a 36.87 degree tilt: column cosines (0, 0.8, -0.6), normal (0, 0.6, 0.8); slices 1.25 mm
# apart along z per mm along the normal, shifted by 0.75 of a 1 mm row
COL = np.array([0.0, 0.8, -0.6])
NORMAL = np.cross(ROW, COL)
ROWS = 24


def _phantom(points: np.ndarray) -> np.ndarray:
    """1000 + 4 per mm along the column cosines + 2 per mm along the normal (from ORIGIN)."""
    rel = points - ORIGIN
    return np.asarray(1000.0 + 4.0 * (rel @ COL) + 2.0 * (rel @ NORMAL))


def _tilted(distances: Sequence[float] = DISTANCES) -> list[Dataset]:
    positions = [ORIGIN + np.array([0.0, 0.0, d / 0.8]) for d in distances]
    return make_ct_stack(
        positions,
        _phantom,
        orientation=(*ROW, *COL),
        rows=ROWS,
        gantry_tilt=36.87,
    )


def _cfg(**tensors: object) -> Any:
    return load_config(overrides={"tensors": tensors}, environ={})


def _expect_exact(out: Volume, sources: list[Dataset], everywhere: bool = False) -> int:
    """Assert every voxel of ``out`` whose two source slices (of the equalization) cover its
    in-plane point (or every voxel: a sheared stack interpolates along its own direction,
    between voxels of the frames) holds the phantom at its patient position; return how many
    were checked."""
    ipp = sorted(
        (np.asarray(ds.ImagePositionPatient, dtype=float) for ds in sources),
        key=lambda p: float(p @ NORMAL),
    )
    plan = equalize_plan([float((p - ipp[0]) @ NORMAL) for p in ipp])
    checked = 0
    n_slices, n_rows, n_cols = out.array.shape
    jj, ii = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    for s in range(n_slices):
        points = (
            out.affine[:3, 3]
            + ii[..., None] * out.affine[:3, 0]
            + jj[..., None] * out.affine[:3, 1]
            + s * out.affine[:3, 2]
        )
        inside = np.ones((n_rows, n_cols), bool)
        for k in () if everywhere else {int(plan.lo[s]), int(plan.hi[s])}:
            row = (points - ipp[k]) @ COL  # the in-plane row coordinate on source slice k
            inside &= (row >= -1e-6) & (row <= ROWS - 1 + 1e-6)
        want = np.rint(_phantom(points))
        np.testing.assert_array_equal(out.array[s][inside], want[inside], err_msg=f"slice {s}")
        checked += int(inside.sum())
    return checked


# ---------------------------------------------------------------------------------------------
# the step and grid dcm2niix chooses
# ---------------------------------------------------------------------------------------------


def test_plan_takes_the_smallest_step_and_interpolates_between_neighbours() -> None:
    plan = equalize_plan(DISTANCES)
    assert plan.spacing == 1.0
    # dcm2niix: ceil((14 - 3 / 2) / 1) = 13 slices, 0..12 mm; pacsflow goes on to 14 mm
    assert plan.dcm2niix_slices == 13
    assert plan.slices == 15
    # slice s at s mm: between the source slices below and at-or-above it (a copy at 0 mm)
    assert list(plan.lo[:9]) == [0, 0, 0, 1, 1, 2, 3, 3, 3]
    assert list(plan.hi[:9]) == [0, 1, 1, 2, 2, 3, 4, 4, 4]
    np.testing.assert_allclose(plan.frac[:6], [1.0, 0.5, 1.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(plan.frac[6:9], [1 / 3, 2 / 3, 1.0], rtol=1e-6)
    assert (plan.lo[-1], plan.hi[-1], plan.frac[-1]) == (5, 6, 1.0)


def test_plan_caps_at_twice_the_slices_from_first_to_last() -> None:
    plan = equalize_plan([0.0, 0.5, 10.0, 20.0, 30.0])  # 0.5 mm would make 50 slices
    assert plan.slices == plan.dcm2niix_slices == 10
    assert plan.spacing == pytest.approx(30.0 / 9)
    assert (plan.hi[-1], plan.frac[-1]) == (4, pytest.approx(1.0))


# ---------------------------------------------------------------------------------------------
# synthetic series: exact values and geometry
# ---------------------------------------------------------------------------------------------


def test_untilted_variable_spacing_equalizes_exactly() -> None:
    positions = [ORIGIN + d * np.array([0.0, 0.6, 0.8]) for d in DISTANCES]  # along the normal
    sources = make_ct_stack(positions, _phantom, orientation=(*ROW, *COL), rows=ROWS)
    random.Random(2).shuffle(sources)  # stored out of order: ordered by position
    (vol,) = build_volumes(sources, allow_variable=True)
    assert vol.slice_positions == pytest.approx(DISTANCES)
    assert shear_of(vol.affine) is None
    out = equalize(vol)
    assert out.grid is VolumeGrid.RESAMPLED
    assert out.slice_positions is None
    assert out.array.shape == (15, ROWS, 12)
    assert out.array.dtype == vol.array.dtype
    assert out.spacing == pytest.approx((1.0, 1.0, 0.5))
    np.testing.assert_allclose(out.affine[:3, 2], NORMAL, atol=1e-12)
    np.testing.assert_array_equal(out.affine[:, [0, 1, 3]], vol.affine[:, [0, 1, 3]])
    jj = np.arange(ROWS)[:, None]
    for s in range(15):  # 1000 + 4 j + 2 s: the phantom at every voxel
        np.testing.assert_array_equal(out.array[s], np.broadcast_to(1000 + 4 * jj + 2 * s,
                                                                    (ROWS, 12)))  # fmt: skip
    assert out.sop_instance_uids == vol.sop_instance_uids  # the source slices


def test_tilted_variable_spacing_detilts_then_equalizes_exactly() -> None:
    sources = _tilted()
    (vol,) = build_volumes(sources, allow_tilt=True, allow_variable=True)
    assert vol.slice_positions == pytest.approx(DISTANCES)
    shear = shear_of(vol.affine)
    assert shear is not None
    assert shear.degrees == pytest.approx(36.87, abs=0.01)
    out = preprocess_volume(vol, _cfg().tensors)
    added = 11  # ceil(0.75 * 14) rows
    assert out.array.shape == (15, ROWS + added, 12)
    assert out.grid is VolumeGrid.RESAMPLED
    assert shear_of(out.affine) is None  # orthogonal: the step along the normal
    np.testing.assert_allclose(out.affine[:3, 2], NORMAL, atol=1e-9)
    np.testing.assert_allclose(out.affine[:3, 3], vol.affine[:3, 3] - added * COL, atol=1e-9)
    assert _expect_exact(out, sources) > 0.6 * out.array.size
    # the same as the two steps in dcm2niix's order
    np.testing.assert_array_equal(out.array, equalize(detilt(vol)).array)


def test_sheared_variable_spacing_equalizes_along_the_tilted_stack() -> None:
    sources = _tilted()
    (vol,) = build_volumes(sources, allow_tilt=True, allow_variable=True)
    out = preprocess_volume(vol, _cfg(gantry_tilt="sheared").tensors)
    assert out.array.shape == (15, ROWS, 12)
    assert out.grid is VolumeGrid.RESAMPLED
    # the slice step: 1 mm along the normal, and the tilt's 0.75 mm per mm back along the
    # column cosines -- i.e. 1.25 mm along z
    np.testing.assert_allclose(out.affine[:3, 2], [0.0, 0.0, 1.25], atol=1e-9)
    assert _expect_exact(out, sources, everywhere=True) == out.array.size


def test_padding_is_never_blended_into_tissue() -> None:
    positions = [ORIGIN + d * np.array([0.0, 0.6, 0.8]) for d in (0.0, 2.0, 3.0, 6.0)]
    sources = make_ct_stack(positions, _phantom, orientation=(*ROW, *COL), rows=ROWS)
    for ds in sources[1:2]:  # padding in the left half of one slice
        ds.PixelPaddingValue = 0
        plane = ds.pixel_array.copy()
        plane[:, :6] = 0
        ds.PixelData = plane.tobytes()
    for ds in sources:
        ds.PixelPaddingValue = 0
    (vol,) = build_volumes(sources, allow_variable=True)
    out = equalize(vol)
    # slice 1 (1 mm) lies half-way between sources 0 and 1 (0 and 2 mm): the nearer one
    # (the upper, at half) wins where one is padding; elsewhere the blend
    np.testing.assert_array_equal(out.array[1][:, :6], 0)
    np.testing.assert_array_equal(out.array[1][:, 6:], (vol.array[0] + vol.array[1])[:, 6:] // 2)


# ---------------------------------------------------------------------------------------------
# what is still refused
# ---------------------------------------------------------------------------------------------


def _axial(distances: Sequence[float], numbers: Sequence[int] | None = None) -> list[Dataset]:
    positions = [ORIGIN + np.array([0.0, 0.0, d]) for d in distances]
    out = make_ct_stack(positions, _phantom, rows=8, columns=8)
    for ds, number in zip(out, numbers or [], strict=False):
        ds.InstanceNumber = number
    for ds in out:  # int16, as CT (dcm2niix equalizes 8/16-bit signed, not uint16)
        ds.PixelRepresentation = 1
    return out


def test_refused_by_default_and_by_policy() -> None:
    with pytest.raises(GeometryError, match=r"variable slice spacing.*variable_spacing is refuse"):
        build_volumes(_axial(DISTANCES))
    (vol,) = build_volumes(_axial(DISTANCES), allow_variable=True)
    refuse = _cfg(variable_spacing="refuse").tensors
    with pytest.raises(GeometryError, match="variable_spacing is refuse"):
        preprocess_volume(vol, refuse)
    with pytest.raises(GeometryError, match="variable_spacing is refuse"):
        volume_preprocessing_json(vol, refuse)


def test_missing_slices_are_refused() -> None:
    # dcm2niix's rule: Instance Numbers that span more images than the stack holds
    with pytest.raises(GeometryError, match="missing slices: the Instance Numbers span 8"):
        build_volumes(_axial(DISTANCES, [1, 2, 3, 4, 6, 7, 8]), allow_variable=True)
    # and a regular grid with a hole, whatever the numbers say
    with pytest.raises(GeometryError, match="gap in slice positions: about 1 missing"):
        build_volumes(_axial([0.0, 2.0, 4.0, 8.0, 10.0]), allow_variable=True)
    # Instance Numbers that run against the positions are no sign of a missing image
    numbers = [1, 2, 3, 4, 5, 6, 7]
    (vol,) = build_volumes(_axial(DISTANCES, numbers[::-1]), allow_variable=True)
    assert vol.slice_positions is not None


def test_a_4d_series_is_not_equalized() -> None:
    first, second = _axial(DISTANCES), _axial(DISTANCES)
    for t, run in enumerate((first, second)):
        for k, ds in enumerate(run):
            ds.TemporalPositionIdentifier = t + 1
            ds.InstanceNumber = t * 10 + k + 1
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.55.{t}.{k}"
    with pytest.raises(GeometryError, match="a 4D series is not equalized"):
        build_volumes(first + second, allow_variable=True)


# ---------------------------------------------------------------------------------------------
# the preprocessing identity and write-back
# ---------------------------------------------------------------------------------------------


def test_preprocessing_identity_records_the_equalization() -> None:
    default, refuse = _cfg(), _cfg(variable_spacing="refuse")
    # the default's identity (and hash) are those before variable_spacing existed
    assert default.tensors.preprocessing_json() == (
        '{"dtype":"native","normalize":"none","orientation":"native","spacing":null,"window":null}'
    )
    assert '"variable_spacing":"refuse"' in refuse.tensors.preprocessing_json()
    assert default.tensors.preprocessing_hash() != refuse.tensors.preprocessing_hash()
    (vol,) = build_volumes(_tilted(), allow_tilt=True, allow_variable=True)
    row = json.loads(volume_preprocessing_json(vol, default.tensors))
    assert row["equalize"] == {"steps": [2.0, 2.0, 1.0, 3.0, 3.0, 3.0], "spacing": 1.0,
                               "slices": 15}  # fmt: skip
    assert row["detilt"]["added"] == 11
    assert VolumeGrid.from_preprocessing(row) is VolumeGrid.RESAMPLED


def test_writeback_refuses_masks_of_an_equalized_volume() -> None:
    from pipeline.writeback.stage import _plan

    (vol,) = build_volumes(_tilted(), allow_tilt=True, allow_variable=True)
    prep = volume_preprocessing_json(vol, _cfg(gantry_tilt="sheared").tensors)
    assert "detilt" not in prep
    with pytest.raises(WritebackError, match="slice spacing varied and was equalized"):
        _plan(None, None, None, None, {"preprocessing": prep})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the stage: crawl -> deid -> tensors
# ---------------------------------------------------------------------------------------------


def test_stage_stores_the_detilted_equalized_volume(tmp_path: Path) -> None:
    from pipeline.connectors import FolderSource
    from pipeline.crawl import run as crawl_run
    from pipeline.deid.stage import run as deid_run
    from pipeline.lake import LakePaths, read_table
    from pipeline.tensors.stage import load_tensor
    from pipeline.tensors.stage import run as tensors_run

    sources = _tilted()
    archive = tmp_path / "archive"
    for k, ds in enumerate(sources):
        write(ds, archive / f"{k:02d}.dcm")
    results = {}
    for policy in ("equalize", "refuse"):
        cfg = load_config(
            overrides={"compute": {"workers": 1}, "tensors": {"variable_spacing": policy}},
            environ={},
        )
        lake = LakePaths(tmp_path / policy)
        crawl_run(cfg, lake, FolderSource(archive), run_id="c")
        deid_run(cfg, lake, key=b"q" * 32, run_id="d")
        tensors_run(cfg, lake, run_id="t")
        (row,) = read_table(lake, "tensors").to_pylist()
        results[policy] = (row, lake)
    row, lake = results["equalize"]
    assert row["status"] == "ok", row["reason"]
    prep = json.loads(row["preprocessing"])
    assert prep["detilt"] == {"axis": "rows", "added": 11, "degrees": pytest.approx(36.87, 1e-3)}
    assert prep["equalize"]["steps"] == [2.0, 2.0, 1.0, 3.0, 3.0, 3.0]
    assert row["shape"] == [15, ROWS + 11, 12]
    assert row["spacing"] == [1.0, 1.0, 0.5]
    (vol,) = build_volumes(sources, allow_tilt=True, allow_variable=True)
    want = preprocess_volume(vol, _cfg().tensors)
    np.testing.assert_array_equal(load_tensor(lake, row["path"]), want.array)
    np.testing.assert_allclose(np.reshape(row["affine"], (4, 4)), want.affine, atol=1e-9)
    assert len(row["sop_instance_uids"]) == len(DISTANCES)  # pseudonyms of the sources
    assert not set(row["sop_instance_uids"]) & {ds.SOPInstanceUID for ds in sources}
    refused, _lake = results["refuse"]
    assert refused["status"] == "refused"
    assert "variable slice spacing" in refused["reason"]
    assert "variable_spacing is refuse" in refused["reason"]


# ---------------------------------------------------------------------------------------------
# against dcm2niix, run live
# ---------------------------------------------------------------------------------------------


def _dcm2niix(src: Path, out: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix is not installed (apt-get install dcm2niix): no live reference")
    out.mkdir()
    return subprocess.run(
        [exe, "-f", "eq", "-z", "n", "-b", "n", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )


def _as_reference(out: Volume, ref: Any) -> Any:
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    img = nib.Nifti1Image(np.moveaxis(out.array, (0, 1, 2), (2, 1, 0)), out.affine_ras)
    return img.as_reoriented(
        ornt_transform(io_orientation(out.affine_ras), io_orientation(ref.affine))
    )


def test_synthetic_matches_dcm2niix_eq_output(tmp_path: Path) -> None:
    """An axial stack of varying spacing against dcm2niix's ``_Eq_1``: the same values on its
    slices (pacsflow has two more, up to the last source slice), the affine within 1e-3 mm."""
    import nibabel as nib

    sources = _axial(DISTANCES)
    for k, ds in enumerate(sources):
        write(ds, tmp_path / "in" / f"{k:02d}.dcm")
    done = _dcm2niix(tmp_path / "in", tmp_path / "out")
    ref_path = tmp_path / "out" / "eq_Eq_1.nii"
    assert ref_path.is_file(), done.stdout[-2000:]
    (vol,) = build_volumes(sources, allow_variable=True)
    out = preprocess_volume(vol, _cfg().tensors)
    ref = nib.load(ref_path)
    assert ref.shape == (8, 8, 13)
    mine = _as_reference(out, ref)
    assert mine.shape == (8, 8, 15)
    np.testing.assert_allclose(mine.affine, ref.affine, atol=1e-3, rtol=0)
    got = np.asanyarray(mine.dataobj)[:, :, :13].astype(np.int32)
    np.testing.assert_array_equal(got, np.asanyarray(ref.dataobj))


GE = Path("dicom/dcm_qa_ct/In/GE")


@pytest.mark.shared_data
def test_ge_head_matches_dcm2niix_tilt_eq_output(shared_data: Path, tmp_path: Path) -> None:
    """The whole GE head (18.5 degrees; 4 mm, one 1.08 mm, then 7 mm steps) against
    dcm2niix's ``_Tilt_Eq_1``, run live: 56 slices of 2.62 mm and 99 rows added; the values
    within the rounding of the interpolation wherever neither source voxel is the Pixel
    Padding Value (there pacsflow takes the nearer voxel, dcm2niix blends padding in); the
    affine within 1e-3 mm of dcm2niix's once its known slip is applied: ``nii_saveNII3Deq``
    scales the z *row* of the sform by the new spacing over the old ("to do: do I change
    srow_z or ..."), right for axial slices only, so for these oblique ones its column
    vector's z part shrinks and its slice vector keeps its old y part."""
    import nibabel as nib

    src = tmp_path / "in"
    src.mkdir()
    for path in sorted((shared_data / GE).glob("*.dcm")):
        (src / path.name).symlink_to(path)
    done = _dcm2niix(src, tmp_path / "out")
    ref_path = tmp_path / "out" / "eq_Tilt_Eq_1.nii"
    assert ref_path.is_file(), done.stdout[-2000:]
    datasets = [pydicom.dcmread(p) for p in sorted(src.glob("*.dcm"))]
    (vol,) = build_volumes(datasets, allow_tilt=True, allow_variable=True)
    tilted = detilt(vol)
    out = preprocess_volume(vol, _cfg().tensors)
    assert out.array.shape == (56, 611, 512)
    assert out.spacing[0] == pytest.approx(144.0883 / 55, abs=1e-4)
    ref = nib.load(ref_path)
    mine = _as_reference(out, ref)
    assert mine.shape == ref.shape == (512, 611, 56)
    # the geometry is exact: the first and last slices are the first and last source planes
    # (de-tilted), the slice step is along the normal
    assert shear_of(out.affine) is None
    np.testing.assert_allclose(out.affine @ [0, 0, 0, 1], tilted.affine @ [0, 0, 0, 1])
    np.testing.assert_allclose(out.affine @ [0, 0, 55, 1], tilted.affine @ [0, 0, 27, 1], atol=1e-3)
    # dcm2niix's affine: the slice column at the first step (its pixdim[3]), then the z row
    # scaled by new / old spacing
    first = vol.slice_positions[1]  # type: ignore[index]
    scale = out.spacing[0] / first
    expect = mine.affine.copy()
    expect[:3, 2] = expect[:3, 2] / scale  # the slice axis is the third in both
    expect[2, :3] = expect[2, :3] * scale
    np.testing.assert_allclose(expect, ref.affine, atol=1e-3, rtol=0)
    # values: where no padding is involved, within the rounding of float32 interpolation
    plan = equalize_plan(vol.slice_positions)  # type: ignore[arg-type]
    padded = np.zeros(out.array.shape, dtype=bool)
    for s in range(plan.slices):
        lo, hi = int(plan.lo[s]), int(plan.hi[s])
        if lo != hi:
            padded[s] = (tilted.array[lo] == -1500) | (tilted.array[hi] == -1500)
            near = np.where(plan.frac[s] >= 0.5, tilted.array[hi], tilted.array[lo])
            np.testing.assert_array_equal(out.array[s][padded[s]], near[padded[s]])
    pad = np.asanyarray(
        _as_reference(replace(out, array=padded.astype(np.uint8)), ref).dataobj
    ).astype(bool)
    diff = np.asanyarray(mine.dataobj).astype(np.int32) - np.asanyarray(ref.dataobj)
    assert int(np.abs(diff[~pad]).max()) <= 1
    assert np.count_nonzero(diff[~pad]) < 5e-4 * diff.size
    assert np.count_nonzero(diff[pad]) < 0.02 * diff.size  # the field of view's rim
