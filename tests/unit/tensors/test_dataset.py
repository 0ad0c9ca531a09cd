"""Training access: a cohort by SQL or pandas, loaded as MONAI dicts through a DataLoader with
worker processes; the image's affine puts the phantom's lesions where the ground truth says;
a corrupted file is caught by its checksum."""

from __future__ import annotations

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
from pipeline.lake import LakePaths
from pipeline.tensors.dataset import (
    ChecksumMismatch,
    TensorDataset,
    cohort,
    monai_affine,
    monai_dataset,
)
from pipeline.tensors.stage import run as tensors_run

KEY = b"d" * 32
SLICES, SIZE = 16, 64


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LakePaths]:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("dataset")
    archive = root / "archive"
    synthesize(
        archive, patients=1, seed=0, ct_slices=SLICES, rows=SIZE, columns=SIZE, include_bad=False
    )
    lake = LakePaths(root / "lake")
    cfg = load_config(overrides={"compute": {"partition_size": 64}}, environ={})
    crawl_run(cfg, lake, FolderSource(archive), run_id="c1")
    deid_run(cfg, lake, key=KEY, run_id="d1")
    tensors_run(cfg, lake, run_id="t1")
    return archive, lake


def _corners(affine: Any, shape: Any) -> set[tuple[float, ...]]:
    """The world points of a grid's 8 corner voxels (invariant to flipping its axes)."""
    a, b, c = (int(n) - 1 for n in shape)
    return {
        tuple(np.round((np.asarray(affine) @ [x, y, z, 1.0])[:3], 3))
        for x in (0, a)
        for y in (0, b)
        for z in (0, c)
    }


def test_cohort_by_where_sql_and_pandas(built: tuple[Path, LakePaths]) -> None:
    _archive, lake = built
    everything = cohort(lake)
    assert len(everything) >= 2
    assert (everything["status"] == "ok").all()
    assert {"Modality", "BodyPartExamined", "SliceThickness", "path"} <= set(everything.columns)
    assert everything["Modality"].notna().all()  # every volume found its series row
    ct = cohort(lake, where="Modality = 'CT'")
    assert len(ct) >= 1
    assert set(ct["Modality"]) == {"CT"}
    by_sql = cohort(
        lake,
        sql="SELECT SeriesInstanceUID, SliceThickness AS thick FROM series "
        "WHERE Modality = 'CT' ORDER BY SeriesInstanceUID",
    )
    assert sorted(by_sql["tensor_key"]) == sorted(ct["tensor_key"])
    assert "thick" in by_sql.columns
    assert "affine" in by_sql.columns
    by_pandas = everything[everything["Modality"] == "CT"]
    assert sorted(by_pandas["tensor_key"]) == sorted(ct["tensor_key"])
    assert cohort(lake, where="Modality = 'no such'").empty
    with pytest.raises(ValueError, match="tensor_key or SeriesInstanceUID"):
        cohort(lake, sql="SELECT Modality FROM series")


def test_dataloader_with_workers_and_monai_transforms(built: tuple[Path, LakePaths]) -> None:
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Compose, Resized, ScaleIntensityRanged

    _archive, lake = built
    ct = cohort(lake, where="Modality = 'CT'")
    transform = Compose(
        [
            ScaleIntensityRanged("image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
            Resized("image", spatial_size=(8, 32, 32)),
        ]
    )
    ds = TensorDataset(lake, ct, transform=transform, columns=["Modality"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    seen = 0
    for batch in loader:
        image = batch["image"]
        n = image.shape[0]
        assert tuple(image.shape) == (n, 1, 8, 32, 32)
        assert image.dtype == torch.float32
        assert float(image.min()) >= 0.0
        assert float(image.max()) <= 1.0
        assert isinstance(image, MetaTensor)
        assert tuple(batch["spacing"].shape) == (n, 3)
        assert list(batch["Modality"]) == ["CT"] * n
        seen += n
    assert seen == len(ct)

    raw = TensorDataset(lake, ct)[0]
    row = ct.iloc[0]
    assert tuple(raw["image"].shape) == (1, *row["shape"])
    assert str(raw["image"].dtype).removeprefix("torch.") == row["dtype"]
    assert raw["series_uid"] == row["SeriesInstanceUID"]


def test_affine_in_meta_maps_voxels_to_their_world_position(
    built: tuple[Path, LakePaths],
) -> None:
    archive, lake = built
    df = cohort(lake)
    truth = json.loads((archive / "ground_truth.json").read_text())
    checked = 0
    for space in ("RAS", "LPS"):
        ds = TensorDataset(lake, df, space=space)
        for index in range(len(ds)):
            item = ds[index]
            image = item["image"]
            affine = image.affine.numpy()
            assert image.meta["space"] == space
            np.testing.assert_allclose(affine, monai_affine(df.iloc[index]["affine"], space))
            stored = np.reshape(df.iloc[index]["affine"], (4, 4))
            # array index (k, j, i) through the meta affine == (i, j, k) through the stored one
            k, j, i = 3, 5, 7
            lps = stored @ [i, j, k, 1.0]
            world = affine @ [k, j, i, 1.0]
            sign = np.array([-1.0, -1.0, 1.0, 1.0]) if space == "RAS" else np.ones(4)
            np.testing.assert_allclose(world, sign * lps, atol=1e-6)
            # the ground truth's grid (i, j, k) -> LPS has the same corners in the world
            for s in truth["series"]:
                if s["affine"] is None or len(s["shape"]) != 3:
                    continue
                k_, j_, i_ = s["shape"]
                expected = _corners(np.diag(sign) @ np.asarray(s["affine"]), (i_, j_, k_))
                if _corners(affine, image.shape[1:]) == expected:
                    checked += 1
    assert checked >= 2 * len(df)  # every volume, in both spaces


def test_monai_dataset_and_mixed_preprocessing(built: tuple[Path, LakePaths]) -> None:
    import torch

    _archive, lake = built
    df = cohort(lake, where="Modality = 'CT'")
    ds = monai_dataset(lake, df, mmap=True)
    assert isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == len(df)
    assert tuple(ds[0]["image"].shape) == (1, *df.iloc[0]["shape"])
    assert len(ds[0:1]) == 1
    mixed = df.assign(preprocessing_hash=["a", *["b"] * (len(df) - 1)]) if len(df) > 1 else None
    if mixed is not None:
        with pytest.raises(ValueError, match="mixes preprocessings"):
            TensorDataset(lake, mixed)
        assert len(TensorDataset(lake, mixed, preprocessing_hash="a")) == 1
    assert len(TensorDataset(lake, df, preprocessing_hash="none such")) == 0


def test_checksum_catches_a_corrupted_file(built: tuple[Path, LakePaths], tmp_path: Path) -> None:
    _archive, lake = built
    df = cohort(lake).head(1)
    copy = LakePaths(tmp_path / "lake")
    rel = df.iloc[0]["path"]
    (copy.research / rel).parent.mkdir(parents=True)
    shutil.copyfile(lake.research / rel, copy.research / rel)
    ds = TensorDataset(copy, df, verify_checksum=True)
    assert ds[0]["image"].shape[0] == 1  # intact
    data = bytearray((copy.research / rel).read_bytes())
    data[-1] ^= 0xFF  # one voxel's byte: still a valid .npy
    (copy.research / rel).write_bytes(bytes(data))
    assert TensorDataset(copy, df)[0]["image"].shape[0] == 1  # unverified: loads silently
    with pytest.raises(ChecksumMismatch, match="sha256"):
        ds[0]


def test_a_cohort_and_a_monai_dataset_pin_the_versions_a_run_recorded(
    built: tuple[Path, LakePaths], tmp_path: Path
) -> None:
    """Issue #19 §4: training reads the cohort as it was, whatever was committed since."""
    from pipeline.lake.delta import table_versions
    from pipeline.lake.io import commit_rows, read_table

    _archive, built_lake = built
    shutil.copytree(built_lake.root, tmp_path / "lake")
    lake = LakePaths(tmp_path / "lake")
    pinned = table_versions(lake)  # what a run manifest records
    before = cohort(lake)
    assert len(before) >= 1
    # a stored volume's row (the table also holds refused series; file order is not row order)
    row = next(r for r in read_table(lake, "tensors").to_pylist() if r["status"] == "ok")
    commit_rows(lake, "tensors", [{**row, "status": "refused", "reason": "re-read"}])
    assert len(cohort(lake)) == len(before) - 1
    again = cohort(lake, as_of=pinned)
    assert list(again["tensor_key"]) == list(before["tensor_key"])
    assert len(monai_dataset(lake, as_of=pinned)) == len(before)
    assert len(monai_dataset(lake)) == len(before) - 1
    with pytest.raises(ValueError, match="not both"):
        monai_dataset(lake, before, as_of=pinned)
