"""Gantry-tilted CT (issue #21 section 2): the sheared stack with its exact affine, de-tilting
as dcm2niix's ``_Tilt_1`` does (recorded in the preprocessing), and the refusals that remain.

The synthetic series is tilted so that each slice shifts by exactly half a row: its phantom is
linear along the shift, so the de-tilted values are known analytically."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_factory import make_ct
from pydicom import Dataset

from pipeline.config import load_config
from pipeline.dicom.volume import Volume, VolumeGrid
from pipeline.errors import GeometryError
from pipeline.tensors.preprocess import (
    detilt,
    preprocess_volume,
    shear_of,
    volume_preprocessing_json,
)
from pipeline.tensors.volume import build_volumes

SIN = 0.25  # tilt of asin(0.25) = 14.48 degrees
COS = math.sqrt(1 - SIN**2)
DZ = 2.0  # slices 2 mm apart along z: 0.5 mm (half a 1 mm row) in plane, 1.936 mm along n
ROWS, COLS, SLICES = 16, 12, 6
ORIGIN = np.array([-6.0, -8.0, 40.0])


def _value(j: np.ndarray | int, k: int) -> np.ndarray | int:
    """The phantom: linear in the patient coordinate along the column cosines."""
    return 1000 + 10 * np.asarray(j) - 5 * k  # 10 per mm along the columns; slice k is 0.5 mm on


def _tilted(slices: int = SLICES, padding: int | None = None) -> list[Dataset]:
    out = []
    for k in range(slices):
        ds = make_ct(number=k + 1)
        ds.ImageOrientationPatient = [1, 0, 0, 0, f"{COS:.10f}", -SIN]
        ds.ImagePositionPatient = [float(v) for v in ORIGIN + np.array([0.0, 0.0, k * DZ])]
        ds.PixelSpacing = [1.0, 0.5]  # rows 1 mm apart, columns 0.5 mm
        ds.GantryDetectorTilt = 14.48
        ds.Rows, ds.Columns = ROWS, COLS
        plane = np.repeat(np.asarray(_value(np.arange(ROWS), k))[:, None], COLS, axis=1)
        ds.PixelData = plane.astype(np.uint16).tobytes()
        if padding is not None:
            ds.PixelPaddingValue = padding
        out.append(ds)
    return out[::-1]  # stored top-down: the builder orders by position along the normal


def _cfg(**tensors: object) -> Any:
    return load_config(overrides={"tensors": tensors}, environ={})


def test_tilted_series_refused_by_default_with_the_policy_named() -> None:
    with pytest.raises(GeometryError, match=r"gantry tilt of 14\.5 degrees.*gantry_tilt"):
        build_volumes(_tilted())


def test_sheared_volume_keeps_voxels_and_exact_affine() -> None:
    datasets = _tilted()
    (vol,) = build_volumes(datasets, allow_tilt=True)
    assert vol.grid is VolumeGrid.NATIVE
    # the third column is the real slice step, not the normal: a non-orthogonal affine
    np.testing.assert_allclose(vol.affine[:3, 2], [0.0, 0.0, DZ], atol=1e-9)
    assert vol.spacing[0] == pytest.approx(DZ * COS)  # the distance between slice planes
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for k, uid in enumerate(vol.sop_instance_uids):
        ds = by_uid[uid]
        np.testing.assert_array_equal(vol.array[k], ds.pixel_array)  # voxels as stored
        for i, j in ((0, 0), (COLS - 1, ROWS - 1), (3, 7)):
            expect = (
                np.asarray(ds.ImagePositionPatient, float)
                + i * 0.5 * np.array([1.0, 0, 0])
                + j * 1.0 * np.array([0.0, COS, -SIN])
            )
            np.testing.assert_allclose((vol.affine @ [i, j, k, 1])[:3], expect, atol=1e-6)
    shear = shear_of(vol.affine)
    assert shear is not None
    assert shear.along_j == pytest.approx(-0.5)
    assert shear.along_i == pytest.approx(0.0, abs=1e-9)
    assert shear.degrees == pytest.approx(math.degrees(math.asin(SIN)))


def test_detilt_of_the_analytic_phantom_is_exact() -> None:
    (vol,) = build_volumes(_tilted(), allow_tilt=True)
    out = detilt(vol)
    added = math.ceil(0.5 * (SLICES - 1))  # 3 rows, prepended: the stack shifts to -j
    assert out.array.shape == (SLICES, ROWS + added, COLS)
    assert out.array.dtype == vol.array.dtype
    assert out.grid is VolumeGrid.RESAMPLED
    assert out.sop_instance_uids == vol.sop_instance_uids
    assert out.spacing == vol.spacing
    # orthogonal: the slice step along the normal, same in-plane axes, origin moved 3 rows
    normal = np.array([0.0, SIN, COS])
    np.testing.assert_allclose(out.affine[:3, 2], normal * DZ * COS, atol=1e-9)
    np.testing.assert_array_equal(out.affine[:3, :2], vol.affine[:3, :2])
    np.testing.assert_allclose(out.affine[:3, 3], vol.affine[:3, 3] - added * vol.affine[:3, 1])
    assert shear_of(out.affine) is None
    fill = int(vol.array.min())
    for k in range(SLICES):
        # output row j reads source row j - added + 0.5 k: every row it covers holds the
        # phantom at its patient position, the same in every slice (the tilt is gone)
        for j in range(ROWS + added):
            source = j - added + 0.5 * k
            want = 1000 + 10 * (j - added) if 0 <= source <= ROWS - 1 else fill
            np.testing.assert_array_equal(out.array[k, j], want, err_msg=f"k={k} j={j}")
        # and where the source is a whole row, the same point in space as that voxel
        if k % 2 == 0:
            j = 5
            src = vol.affine @ [2, j - added + k // 2, k, 1]
            np.testing.assert_allclose(out.affine @ [2, j, k, 1], src, atol=1e-9)


def test_detilt_fills_with_the_padding_value_and_keeps_it_unblended() -> None:
    datasets = _tilted(padding=0)
    for ds in datasets:  # a padded row in every slice
        plane = ds.pixel_array.copy()
        plane[ROWS - 1] = 0
        ds.PixelData = plane.tobytes()
    (vol,) = build_volumes(datasets, allow_tilt=True)
    assert vol.padding == 0.0
    out = detilt(vol)
    assert int(out.array[-1, 0, 0]) == 0  # brought in from outside: the padding value
    # slice 1 reads half-way between rows: next to the padded row, the nearest value wins
    # (dcm2niix), never a blend of tissue and padding
    values = set(np.unique(out.array[1]).tolist())
    assert all(v == 0 or (v % 5 == 0 and v >= 975) for v in values)
    assert len(values) > 1


def test_preprocessing_identity_records_the_detilt() -> None:
    (vol,) = build_volumes(_tilted(), allow_tilt=True)
    default, sheared, refuse = _cfg(), _cfg(gantry_tilt="sheared"), _cfg(gantry_tilt="refuse")
    # the default configuration's identity (and hash) are those before gantry_tilt existed
    assert default.tensors.preprocessing_json() == (
        '{"dtype":"native","normalize":"none","orientation":"native","spacing":null,"window":null}'
    )
    hashes = {c.tensors.preprocessing_hash() for c in (default, sheared, refuse)}
    assert len(hashes) == 3  # a change of policy re-runs
    row = json.loads(volume_preprocessing_json(vol, default.tensors))
    degrees = pytest.approx(14.4775, abs=1e-3)
    assert row["detilt"] == {"axis": "rows", "added": 3, "degrees": degrees}
    assert VolumeGrid.from_preprocessing(row) is VolumeGrid.RESAMPLED
    out = preprocess_volume(vol, default.tensors)
    assert out.grid is VolumeGrid.RESAMPLED
    assert out.array.shape == (SLICES, ROWS + 3, COLS)
    # sheared: the stored voxels and the exact non-orthogonal affine, on the native grid
    text = volume_preprocessing_json(vol, sheared.tensors)
    assert "detilt" not in text
    assert '"gantry_tilt":"sheared"' in text
    kept = preprocess_volume(vol, sheared.tensors)
    assert kept.grid is VolumeGrid.NATIVE
    np.testing.assert_array_equal(kept.array, vol.array)
    np.testing.assert_array_equal(kept.affine, vol.affine)
    # an untilted volume is untouched by the policy
    flat = Volume(
        array=vol.array,
        affine=np.diag([0.5, 1.0, 2.0, 1.0]),
        spacing=(2.0, 1.0, 0.5),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        sop_instance_uids=vol.sop_instance_uids,
        frame_numbers=vol.frame_numbers,
        rescaled=False,
    )
    assert volume_preprocessing_json(flat, default.tensors) == (
        default.tensors.preprocessing_json()
    )
    assert preprocess_volume(flat, default.tensors).grid is VolumeGrid.NATIVE


def test_shear_along_both_axes_is_not_a_tilt() -> None:
    datasets = _tilted()
    for ds in datasets:  # move each slice along the rows too
        z = float(ds.ImagePositionPatient[2]) - ORIGIN[2]
        ds.ImagePositionPatient = [ORIGIN[0] + 0.4 * z, ORIGIN[1], ORIGIN[2] + z]
    (vol,) = build_volumes(datasets, allow_tilt=True)
    with pytest.raises(GeometryError, match="both in-plane axes"):
        detilt(vol)
    with pytest.raises(GeometryError, match="both in-plane axes"):
        volume_preprocessing_json(vol, _cfg().tensors)


def test_varying_tilt_is_refused() -> None:
    datasets = _tilted()
    shifted = datasets[2]
    ipp = [float(v) for v in shifted.ImagePositionPatient]
    shifted.ImagePositionPatient = [ipp[0], ipp[1] + 0.4, ipp[2]]
    with pytest.raises(GeometryError, match="varying gantry tilt"):
        build_volumes(datasets, allow_tilt=True)


# ---------------------------------------------------------------------------------------------
# real data: dcm_qa_ct's GE head (18.5 degrees, 4 mm then 7 mm between slices)
# ---------------------------------------------------------------------------------------------

GE = Path("dicom/dcm_qa_ct/In/GE")


def _ge(shared_data: Path, names: Sequence[str] | None = None) -> list[Dataset]:
    files = sorted((shared_data / GE).glob("*.dcm"))
    return [pydicom.dcmread(p) for p in files if names is None or p.name in names]


@pytest.mark.shared_data
def test_ge_tilted_head_is_refused_only_for_its_variable_spacing(shared_data: Path) -> None:
    datasets = _ge(shared_data)
    with pytest.raises(GeometryError, match=r"gantry tilt of 18\.5 degrees"):
        build_volumes(datasets)
    # de-tilting is possible; the series' 4 mm and 7 mm spacing is not one volume
    with pytest.raises(GeometryError, match=r"variable slice spacing: steps from 1\.08 to 7"):
        build_volumes(datasets, allow_tilt=True)


def _first_14() -> list[str]:
    return [f"{n:02d}.dcm" for n in range(1, 15)]  # the 4 mm part: one spacing


@pytest.mark.shared_data
def test_ge_tilted_part_sheared_affine_maps_every_slice(shared_data: Path) -> None:
    datasets = _ge(shared_data, _first_14())
    (vol,) = build_volumes(datasets, allow_tilt=True)
    assert vol.array.shape == (14, 512, 512)
    assert vol.padding == -1500.0
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for k, uid in enumerate(vol.sop_instance_uids):
        ipp = [float(v) for v in by_uid[uid].ImagePositionPatient]
        np.testing.assert_allclose(vol.affine @ [0, 0, k, 1], [*ipp, 1], atol=1e-4)
    shear = shear_of(vol.affine)
    assert shear is not None
    assert shear.degrees == pytest.approx(18.5, abs=0.01)


@pytest.mark.shared_data
def test_ge_detilt_matches_dcm2niix_tilt_output(shared_data: Path, tmp_path: Path) -> None:
    """pacsflow's de-tilted volume against dcm2niix's ``_Tilt_1`` NIfTI, run live on the
    uniformly spaced part of the GE series: affine within 1e-3 mm, values within the
    rounding of the interpolation (dcm2niix computes the shift in float32)."""
    exe = shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix is not installed (apt-get install dcm2niix): no live reference")
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    src = tmp_path / "in"
    src.mkdir()
    for name in _first_14():
        (src / name).symlink_to(shared_data / GE / name)
    done = subprocess.run(
        [exe, "-f", "tilt", "-z", "n", "-b", "n", "-o", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    ref_path = tmp_path / "tilt_Tilt_1.nii"
    assert ref_path.is_file(), done.stdout[-2000:]
    (vol,) = build_volumes(_ge(shared_data, _first_14()), allow_tilt=True)
    out = preprocess_volume(vol, _cfg().tensors)
    assert out.grid is VolumeGrid.RESAMPLED
    ref = nib.load(ref_path)
    img = nib.Nifti1Image(np.moveaxis(out.array, (0, 1, 2), (2, 1, 0)), out.affine_ras)
    mine = img.as_reoriented(
        ornt_transform(io_orientation(out.affine_ras), io_orientation(ref.affine))
    )
    assert mine.shape == ref.shape == (512, 548, 14)
    np.testing.assert_allclose(mine.affine, ref.affine, atol=1e-3, rtol=0)
    diff = np.asanyarray(mine.dataobj).astype(np.int32) - np.asanyarray(ref.dataobj)
    assert int(np.abs(diff).max()) <= 1
    assert np.count_nonzero(diff) < 1e-4 * diff.size
