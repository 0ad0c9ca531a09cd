"""The infer stage end to end over a real lake: findings rows and masks, coded from the registry;
a rerun does nothing; a new model version adds rows beside the old; an interrupted run resumes
without duplicates; on a Dask cluster it equals the in-process run; objects become inferred."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import make_bundle, write_registry
from typer.testing import CliRunner

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.errors import ModelError
from pipeline.infer import stage as infer_stage
from pipeline.lake import LakePaths, read_table
from pipeline.lake.arrays import load_tensor
from pipeline.lake.duck import object_states
from pipeline.tensors.stage import run as tensors_run

pytestmark = pytest.mark.integration

KEY = b"i" * 32
SEED = 6160
#: the columns that must agree between two runs of the same model on the same volumes
COLUMNS = (
    "finding_key",
    "SeriesInstanceUID",
    "tensor_key",
    "tensor_checksum",
    "model",
    "model_version",
    "weights_sha256",
    "label",
    "label_value",
    "category_code",
    "type_code",
    "voxel_count",
    "volume_ml",
    "mean_hu",
    "bbox",
    "mask_path",
    "mask_checksum",
)


def _cfg(root: Path, **infer: Any) -> Any:
    overrides = {
        "compute": {"partition_size": 8, "device": "cpu"},
        "infer": {
            "model": "tiny",
            "registry": str(root / "models.yaml"),
            "volumes_per_task": 2,
            "batch_size": 16,
            **infer,
        },
    }
    return load_config(overrides=overrides, environ={})


def _rows(lake: LakePaths) -> list[dict[str, Any]]:
    rows = [{c: r.get(c) for c in COLUMNS} for r in read_table(lake, "findings").to_pylist()]
    return sorted(rows, key=lambda r: r["finding_key"])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LakePaths]:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("infer-it")
    synthesize(
        root / "archive",
        patients=2,
        seed=SEED,
        ct_slices=10,
        rows=48,
        columns=48,
        include_bad=False,
    )
    bundle = make_bundle(root / "bundles" / "tiny")
    write_registry(root / "models.yaml", bundle)
    cfg = _cfg(root)
    lake = LakePaths(root / "lake")
    crawl_run(cfg, lake, FolderSource(root / "archive"), run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    return root, lake


def _copy_lake(lake: LakePaths, to: Path) -> LakePaths:
    shutil.copytree(lake.root, to)
    return LakePaths(to)


def _ct_volumes(lake: LakePaths) -> list[dict[str, Any]]:
    series = {r["SeriesInstanceUID"]: r for r in read_table(lake, "series").to_pylist()}
    return [
        t
        for t in read_table(lake, "tensors").to_pylist()
        if t["status"] == "ok" and series[t["SeriesInstanceUID"]]["Modality"] == "CT"
    ]


def test_findings_and_masks(built: tuple[Path, LakePaths], tmp_path: Path) -> None:
    root, base = built
    lake = _copy_lake(base, tmp_path / "lake")
    result = infer_stage.run(_cfg(root), lake, run_id="i1")
    volumes = _ct_volumes(lake)
    assert volumes, "the synthetic archive has CT volumes"
    assert result.counts.seen == len(volumes)  # MR volumes are not for this model
    rows = read_table(lake, "findings").to_pylist()
    assert len(rows) == 4 * len(volumes)
    assert len({r["finding_key"] for r in rows}) == len(rows)
    by_tensor = {t["tensor_key"]: t for t in volumes}
    for tensor_key in by_tensor:
        mine = sorted(
            (r for r in rows if r["tensor_key"] == tensor_key), key=lambda r: r["label_value"]
        )
        assert [r["label"] for r in mine] == ["soft_tissue", "adipose_tissue", "bone", "lung"]
        tensor = by_tensor[tensor_key]
        mask = load_tensor(lake, mine[0]["mask_path"])
        values = load_tensor(lake, tensor["path"])
        assert mask.shape == tuple(tensor["shape"])
        assert mask.dtype == np.uint8
        voxel_ml = float(np.prod(tensor["spacing"])) / 1000
        for r in mine:
            assert r["mask_path"] == mine[0]["mask_path"]
            assert r["tensor_checksum"] == tensor["checksum"]
            assert r["model_version"] == "0.1.0"
            inside = mask == r["label_value"]
            assert r["voxel_count"] == int(inside.sum())
            assert r["volume_ml"] == pytest.approx(r["voxel_count"] * voxel_ml)
            if r["voxel_count"]:
                assert r["mean_hu"] == pytest.approx(float(values[inside].mean()))
                k0, j0, i0, k1, j1, i1 = r["bbox"]
                ks, js, is_ = np.nonzero(inside)
                assert (k0, j0, i0, k1, j1, i1) == (
                    ks.min(), js.min(), is_.min(), ks.max(), js.max(), is_.max()
                )  # fmt: skip
            assert json.loads(r["measurements"])["volume_ml"]["unit"] == "ml"
        # codes are applied at write-back (issue #22), never frozen into findings
        assert all(r["type_code"] is None and r["category_code"] is None for r in mine)
        assert {r["model_entry"] for r in mine} == {"tiny"}
    # objects of those volumes are now inferred; the MR ones stay tensorised
    states = {r["state"] for r in object_states(lake).to_pylist()}
    assert {"inferred", "tensorised"} <= states


def test_rerun_and_new_version(built: tuple[Path, LakePaths], tmp_path: Path) -> None:
    root, base = built
    lake = _copy_lake(base, tmp_path / "lake")
    first = infer_stage.run(_cfg(root), lake, run_id="i1")
    before = _rows(lake)
    again = infer_stage.run(_cfg(root), lake, run_id="i2")
    assert again.counts.seen == 0
    assert _rows(lake) == before
    # a new version of the model (same folder, new metadata and weights) adds rows beside
    newer = make_bundle(tmp_path / "tiny-0.2", version="0.2.0", seed=1)
    write_registry(tmp_path / "models.yaml", newer)
    cfg = _cfg(root, registry=str(tmp_path / "models.yaml"))
    third = infer_stage.run(cfg, lake, run_id="i3")
    assert third.counts.seen == first.counts.seen
    after = _rows(lake)
    assert len(after) == 2 * len(before)
    assert {r["model_version"] for r in after} == {"0.1.0", "0.2.0"}
    assert [r for r in after if r["model_version"] == "0.1.0"] == before


def test_interrupted_run_resumes_without_duplicates(
    built: tuple[Path, LakePaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, base = built
    lake = _copy_lake(base, tmp_path / "lake")
    real = infer_stage.write_partition
    calls = {"n": 0}

    def dies_on_second(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(infer_stage, "write_partition", dies_on_second)
    infer_stage._SEGMENTERS.clear()
    with pytest.raises(KeyboardInterrupt):
        infer_stage.run(_cfg(root), lake, run_id="i1")
    monkeypatch.setattr(infer_stage, "write_partition", real)
    partial = len(read_table(lake, "findings").to_pylist())
    assert 0 < partial < 4 * len(_ct_volumes(lake))
    infer_stage.run(_cfg(root), lake, run_id="i2")
    rows = read_table(lake, "findings").to_pylist()
    assert len(rows) == 4 * len(_ct_volumes(lake))
    assert len({r["finding_key"] for r in rows}) == len(rows)


def test_dask_cluster_equals_in_process(
    built: tuple[Path, LakePaths], tmp_path: Path, dask_client: Any
) -> None:
    root, base = built
    here = _copy_lake(base, tmp_path / "here")
    there = _copy_lake(base, tmp_path / "there")
    infer_stage.run(_cfg(root), here, run_id="i")
    infer_stage.run(_cfg(root), there, run_id="i", client=dask_client)
    assert _rows(here) == _rows(there)


def test_cuda_without_gpu_workers_is_explained(
    built: tuple[Path, LakePaths], tmp_path: Path, dask_client: Any
) -> None:
    root, base = built
    lake = _copy_lake(base, tmp_path / "lake")
    address = dask_client.scheduler.address  # a cluster: GPU workers declare the resource
    compute = _cfg(root).compute.model_copy(update={"device": "cuda", "scheduler": address})
    cfg = _cfg(root).model_copy(update={"compute": compute})
    with pytest.raises(ModelError, match="--resources GPU=1"):
        infer_stage._gpu_resources(cfg, dask_client)
    del lake


def test_cuda_on_a_torch_without_cuda_says_so_before_any_work(
    built: tuple[Path, LakePaths], tmp_path: Path
) -> None:
    """Issue #20 §2: one machine, no cluster, `--device cuda` with the CPU wheel of torch:
    the error names the torch build and how to install one with CUDA (it said that no Dask
    worker declares the GPU resource)."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is built with CUDA")
    root, base = built
    lake = _copy_lake(base, tmp_path / "lake")
    cfg = _cfg(root).model_copy(
        update={"compute": _cfg(root).compute.model_copy(update={"device": "cuda"})}
    )
    with pytest.raises(ModelError) as err:
        infer_stage.run(cfg, lake, run_id="i")
    message = str(err.value)
    assert f"this torch build ({torch.__version__}) has no CUDA" in message
    assert "--index-url https://download.pytorch.org/whl/cu126" in message
    assert "\n" not in message
    assert not lake.table("findings").exists()


@pytest.mark.gpu
def test_cuda_on_one_machine_needs_no_cluster(
    built: tuple[Path, LakePaths], tmp_path: Path
) -> None:
    """One GPU on one machine: `compute.device: cuda` with no scheduler and no declared
    resources; the stage runs the model in-process (what `pacsflow infer --device cuda`
    does with local workers) on the GPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    root, base = built
    lake = _copy_lake(base, tmp_path / "lake")
    compute = _cfg(root).compute.model_copy(update={"device": "cuda", "workers": 2})
    cfg = _cfg(root).model_copy(update={"compute": compute})
    result = infer_stage.run(cfg, lake, run_id="i")
    assert result.counts.out > 0
    devices = {r["device"] for r in read_table(lake, "findings").to_pylist() if "device" in r}
    assert all(d.startswith("cuda") for d in devices), devices


def test_cli_without_tensors_says_what_to_run(tmp_path: Path) -> None:
    from pipeline.cli.main import app

    lake = str(tmp_path / "empty")
    assert CliRunner().invoke(app, ["init", "--lake", lake]).exit_code == 0
    result = CliRunner().invoke(app, ["infer", "--lake", lake])
    assert result.exit_code == 2
    assert "run `pacsflow tensors --lake" in result.output
