"""The tensors stage on a synthesised, crawled, de-identified archive: volumes stored with
exact geometry (the phantom's lesions land where the ground truth says), pseudonyms only,
refusals recorded, incremental, versioned by preprocessing, object state ``tensorised``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.deid.verify import verify
from pipeline.lake import LakePaths, read_table
from pipeline.lake.duck import object_states
from pipeline.tensors.stage import load_tensor
from pipeline.tensors.stage import run as tensors_run

KEY = b"t" * 32


def _cfg(**tensors: Any) -> Any:
    return load_config(
        overrides={"compute": {"partition_size": 64}, "tensors": tensors}, environ={}
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LakePaths, Any]:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("tensors")
    archive = root / "archive"
    synthesize(archive, patients=1, seed=0, ct_slices=24, rows=96, columns=96, include_bad=False)
    lake = LakePaths(root / "lake")
    cfg = _cfg()
    crawl_run(cfg, lake, FolderSource(archive), run_id="c1")
    deid_run(cfg, lake, key=KEY, run_id="d1")
    result = tensors_run(cfg, lake, run_id="t1")
    return archive, lake, result


def test_volumes_are_stored_with_exact_geometry(built: tuple[Path, LakePaths, Any]) -> None:
    archive, lake, result = built
    truth = json.loads((archive / "ground_truth.json").read_text())
    rows = read_table(lake, "tensors").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    volume_series = [s for s in truth["series"] if s["affine"] is not None]
    assert len(ok) == len(volume_series)
    assert result.counts.extra["volumes"] == len(ok)
    refused = [r for r in rows if r["status"] == "refused"]
    assert refused  # the scouts: two localizers in two orientations
    assert all(r["reason"] for r in refused)
    checked = 0
    for s in volume_series:
        row = next(
            r
            for r in ok
            if r["shape"] == s["shape"]
            and len(r["sop_instance_uids"]) == s["n_instances"]
            and np.allclose(
                np.abs(np.reshape(r["affine"], (4, 4))[:3, :3]),
                np.abs(np.asarray(s["affine"])[:3, :3]),
                atol=1e-6,
            )
        )
        data = (lake.research / row["path"]).read_bytes()
        assert row["checksum"] == "sha256:" + hashlib.sha256(data).hexdigest()
        array = load_tensor(lake, row["path"])
        assert list(array.shape) == row["shape"]
        affine = np.reshape(row["affine"], (4, 4))
        inverse = np.linalg.inv(affine)
        for lesion in s["lesions"]:  # the phantom's lesions, through the stored affine
            i, j, k = np.rint(inverse @ [*lesion["centre_mm"], 1.0])[:3].astype(int)
            value = float(array[k, j, i])
            assert abs(value - lesion["hu"]) <= s["noise_bound"] + 1e-6, (value, lesion["hu"])
            checked += 1
    assert checked >= 2


def test_only_pseudonyms_and_nothing_identifying(built: tuple[Path, LakePaths, Any]) -> None:
    _archive, lake, _result = built
    vault = read_table(lake, "vault").to_pylist()
    pseudonyms = {r["sop_pseudonym"] for r in vault}
    originals = {r["SOPInstanceUID"] for r in vault}
    for row in read_table(lake, "tensors").to_pylist():
        uids = set(row["sop_instance_uids"] or [])
        assert uids <= pseudonyms
        assert not uids & originals
    assert verify(lake) == []
    states = object_states(lake).to_pylist()
    assert {r["state"] for r in states} >= {"tensorised"}


def test_rerun_reuses_and_new_preprocessing_adds_a_version(
    built: tuple[Path, LakePaths, Any],
) -> None:
    _archive, lake, _result = built
    before = read_table(lake, "tensors").num_rows
    again = tensors_run(_cfg(), lake, run_id="t2")
    assert again.counts.seen == 0
    assert read_table(lake, "tensors").num_rows == before
    ras = tensors_run(_cfg(orientation="RAS", dtype="float32"), lake, run_id="t3")
    assert ras.counts.extra["volumes"] >= 1
    rows = read_table(lake, "tensors").to_pylist()
    hashes = {r["preprocessing_hash"] for r in rows}
    assert len(hashes) == 2
    raw = {
        r["SeriesInstanceUID"]: r
        for r in rows
        if r["status"] == "ok" and "RAS" not in r["preprocessing"]
    }
    for r in rows:
        if r["status"] != "ok" or "RAS" not in r["preprocessing"]:
            continue
        base = raw[r["SeriesInstanceUID"]]
        a, b = load_tensor(lake, base["path"]), load_tensor(lake, r["path"])
        assert b.dtype == np.float32
        # the same voxels in patient space: map a's centre voxel through both affines
        fa, fb = np.reshape(base["affine"], (4, 4)), np.reshape(r["affine"], (4, 4))
        k, j, i = (n // 2 for n in a.shape[:3])
        world = fa @ [i, j, k, 1.0]
        ib, jb, kb = np.rint(np.linalg.inv(fb) @ world)[:3].astype(int)
        assert float(b[kb, jb, ib]) == float(a[k, j, i])


def test_raw_tensor_maps_back_onto_the_original_frames(
    built: tuple[Path, LakePaths, Any],
) -> None:
    """Slice k of an un-resampled tensor is frame ``frame_numbers[k]`` of the object whose
    pseudonym is ``sop_instance_uids[k]``: the original pixel values, rescaled, come back."""
    import pydicom

    from pipeline.tensors.decode import decode_frames

    archive, lake, _result = built
    vault = {r["sop_pseudonym"]: r["object_key"] for r in read_table(lake, "vault").to_pylist()}
    index = {r["object_key"]: r["location"] for r in read_table(lake, "index").to_pylist()}
    rows = [
        r
        for r in read_table(lake, "tensors").to_pylist()
        if r["status"] == "ok" and '"orientation":"native"' in r["preprocessing"]
    ]
    assert rows
    for row in rows:
        array = load_tensor(lake, row["path"])
        for k, (sop, frame) in enumerate(
            zip(row["sop_instance_uids"], row["frame_numbers"], strict=True)
        ):
            ds = pydicom.dcmread(archive / index[vault[sop]])
            original = decode_frames(ds)[frame - 1].astype(np.float64)
            slope, intercept = (
                float(ds.get("RescaleSlope", 1)),
                float(ds.get("RescaleIntercept", 0)),
            )
            np.testing.assert_array_equal(array[k], original * slope + intercept)


def test_series_table_carries_the_pixel_verdict_even_after_a_rebuild(
    built: tuple[Path, LakePaths, Any],
) -> None:
    _archive, lake, _result = built

    def verdicts() -> dict[str, tuple[bool, str | None]]:
        return {
            r["SeriesInstanceUID"]: (r["volume_ok"], r["volume_reason"])
            for r in read_table(lake, "series").to_pylist()
        }

    tensors = {
        r["SeriesInstanceUID"]: (r["status"] == "ok", r["reason"])
        for r in read_table(lake, "tensors").to_pylist()
    }
    assert {uid: verdicts()[uid] for uid in tensors} == tensors
    shutil.rmtree(lake.table("series"))  # deid rebuilds the aggregates
    deid_run(_cfg(), lake, key=KEY, run_id="d2")
    assert {uid: verdicts()[uid] for uid in tensors} == tensors
