"""Issue #23: the viewer's NIfTI of a tensor (RAS sform, voxels unchanged), the parse of a
drawn mask (shape checked, gzip bounded), corrections stored beside the model's mask and
carried by the label set."""

from __future__ import annotations

import gzip
import struct
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from pipeline.lake import LakePaths
from pipeline.review.corrections import correction_path, latest_corrections, load_corrections
from pipeline.review.nifti import HEADER_BYTES, NiftiError, nifti_header, parse_mask
from pipeline.review.store import label_set

# LPS affine of an axial CT: column -> +x (L), row -> +y (P), slice -> +z (S)
AFFINE = [0.7, 0, 0, -180.0, 0, 0.7, 0, -150.0, 0, 0, 2.5, 40.0, 0, 0, 0, 1]


def _nii(array: np.ndarray, affine: list[float] = AFFINE) -> bytes:
    return nifti_header(array.shape, array.dtype, affine) + array.tobytes()


def test_header_is_nifti1_in_ras_with_the_arrays_bytes() -> None:
    vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # slices, rows, columns
    data = _nii(vol)
    assert struct.unpack_from("<i", data, 0)[0] == 348
    assert data[344:348] == b"n+1\0"
    assert struct.unpack_from("<8h", data, 40)[:4] == (3, 6, 5, 4)  # x=column, y=row, z=slice
    assert struct.unpack_from("<hh", data, 70) == (4, 16)  # int16
    assert struct.unpack_from("<f", data, 108)[0] == HEADER_BYTES
    assert struct.unpack_from("<hh", data, 252) == (0, 1)
    srow = np.array(struct.unpack_from("<12f", data, 280)).reshape(3, 4)
    lps = np.array(AFFINE).reshape(4, 4)
    assert np.allclose(srow, (np.diag([-1, -1, 1, 1]) @ lps)[:3])  # RAS = diag(-1,-1,1) LPS
    assert np.allclose(struct.unpack_from("<3f", data, 80), (0.7, 0.7, 2.5))
    # NIfTI's x-fastest order is the C order of (slices, rows, columns): voxel (x=2,y=1,z=3)
    body = np.frombuffer(data, dtype="<i2", offset=HEADER_BYTES)
    assert body[2 + 6 * (1 + 5 * 3)] == vol[3, 1, 2]


def test_a_drawn_mask_round_trips_and_wrong_ones_are_refused() -> None:
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[1:3, 2:4, 3] = 1
    for body in (_nii(mask), gzip.compress(_nii(mask * 7))):
        assert np.array_equal(parse_mask(body, (4, 5, 6)), mask)
    with pytest.raises(NiftiError, match="not the tensor's"):
        parse_mask(_nii(np.zeros((4, 6, 5), dtype=np.uint8)), (4, 5, 6))
    with pytest.raises(NiftiError, match="NIfTI-1"):
        parse_mask(b"P" * 400, (4, 5, 6))
    with pytest.raises(NiftiError, match="too short"):
        parse_mask(b"", (4, 5, 6))
    with pytest.raises(NiftiError, match="size"):
        parse_mask(_nii(mask)[:-1], (4, 5, 6))
    with pytest.raises(NiftiError, match="gzip"):
        parse_mask(b"\x1f\x8b" + b"\0" * 50, (4, 5, 6))
    # a gzip bomb: decompression stops at the size such a mask can have
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))
    with pytest.raises(NiftiError, match="larger"):
        parse_mask(bomb, (4, 5, 6))


def test_corrections_are_stored_beside_the_models_mask_and_exported(tmp_path: Path) -> None:
    from pipeline.review.corrections import record_correction

    lake = LakePaths(tmp_path / "lake")
    lake.research.mkdir(parents=True)
    finding = {
        "finding_key": "t1/tiny@1+abc/liver",
        "tensor_key": "t1",
        "SeriesInstanceUID": "2.25.1",
        "model": "tiny",
        "model_version": "1",
        "weights_sha256": "abc",
        "tensor_checksum": "sha256:t",
        "mask_path": "masks/t1/tiny.npy",
        "mask_checksum": "sha256:m",
        "label_value": 2,
        "label": "liver",
        "shape": [4, 5, 6],
    }
    mask = np.zeros((4, 5, 6), dtype=np.uint8)
    mask[2, 2, 2] = 1
    with pytest.raises(ValueError, match="shape"):
        record_correction(lake, finding, mask[:2], reviewer="rudi")
    first = record_correction(
        lake, finding, mask, reviewer="rudi", now=datetime(2026, 1, 1, tzinfo=UTC)
    )
    second = record_correction(lake, finding, mask * 0, reviewer="rudi")
    assert first["mask_path"] == f"masks/t1/corrections/{first['correction_id']}.npy"
    assert np.array_equal(np.load(lake.research / first["mask_path"]), mask)
    assert first["voxel_count"] == 1
    assert second["voxel_count"] == 0
    rows = load_corrections(lake)
    assert [r["correction_id"] for r in rows] == [first["correction_id"], second["correction_id"]]
    assert rows[0]["tensor_checksum"] == "sha256:t"
    assert rows[0]["base_mask_checksum"] == "sha256:m"
    latest = latest_corrections(rows)
    review = {
        "decision": "accept",
        "reviewer": "rudi",
        "reviewed_at": datetime.now(UTC),
        "review_id": "r1",
        "corrected_label": None,
    }
    table = label_set([finding], {finding["finding_key"]: review}, latest)
    row = table.to_pylist()[0]
    assert row["corrected_mask_path"] == second["mask_path"]
    assert row["correction_id"] == second["correction_id"]
    assert (
        label_set([finding], {finding["finding_key"]: review}).to_pylist()[0]["corrected_mask_path"]
        is None
    )
    for bad_key in ("../../etc", "/abs"):
        with pytest.raises(ValueError, match="leaves the masks folder"):
            correction_path(lake, bad_key, first["correction_id"])
    with pytest.raises(ValueError, match="32 hex digits"):
        correction_path(lake, "t1", "../x")


def test_a_box_mask_is_built_over_the_region_asked_for_only() -> None:
    """A detection's box is served without a volume-sized array: over any region (whole,
    preview, one plane, the box itself) it equals the whole mask cut to that region."""
    from pipeline.review.viewer import _box_part

    shape = (7, 9, 11)
    box = (slice(2, 5), slice(1, 8), slice(3, 4))
    whole = np.zeros(shape, dtype=np.uint8)
    whole[box] = 1
    every = slice(None, None, 1)
    for region in (
        (every, every, every),
        (slice(None, None, 2),) * 3,
        (slice(3, 4), every, every),
        (every, every, slice(10, 11)),
        box,
    ):
        got = _box_part(shape, box, region)
        assert got.dtype == np.uint8
        assert np.array_equal(got, whole[region]), region
