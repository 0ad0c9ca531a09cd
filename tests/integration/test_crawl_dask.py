"""The crawl on a real Dask distributed cluster gives the same index as in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from dicom_factory import make_ct, write

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import current_index
from pipeline.crawl import run as crawl_run
from pipeline.lake import LakePaths, read_table

pytestmark = pytest.mark.integration

_VOLATILE = {"crawl_run", "crawled_at", "quarantined_at", "run_id"}


def _stable(table: pa.Table) -> list[dict[str, object]]:
    keep = [c for c in table.column_names if c not in _VOLATILE]
    return sorted(table.select(keep).to_pylist(), key=lambda r: str(r["object_key"]))


def test_distributed_crawl_equals_local_crawl(tmp_path: Path, dask_client) -> None:  # type: ignore[no-untyped-def]
    archive = tmp_path / "archive"
    for i in range(1, 25):
        write(
            make_ct(number=i, series_uid=f"1.2.826.0.1.3680043.8.498.{i % 3 + 10}"),
            archive / f"S{i % 3}" / f"IM{i:04d}",
        )
    (archive / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    (archive / "readme.txt").write_text("hello")
    cfg = load_config(overrides={"compute": {"partition_size": 4}}, environ={})

    local = LakePaths(tmp_path / "local")
    distributed = LakePaths(tmp_path / "distributed")
    r_local = crawl_run(cfg, local, FolderSource(archive), run_id="local")
    assert r_local.counts.out == 24
    r_dist = crawl_run(cfg, distributed, FolderSource(archive), run_id="dist", client=dask_client)

    assert (r_dist.counts.seen, r_dist.counts.out, r_dist.counts.quarantined) == (26, 24, 2)
    assert r_dist.counts.reconciles
    assert _stable(current_index(distributed)) == _stable(current_index(local))
    assert _stable(read_table(distributed, "quarantine")) == _stable(
        read_table(local, "quarantine")
    )
    # 26 objects in partitions of 4: 7 index files, written by the two worker processes
    assert len(list(distributed.table("index").glob("*.parquet"))) == 7

    # a rerun on the cluster is incremental and writes nothing new
    again = crawl_run(cfg, distributed, FolderSource(archive), run_id="dist2", client=dask_client)
    assert (again.counts.out, again.counts.quarantined, again.counts.skipped) == (0, 0, 26)
    shutil.rmtree(archive / "S0")
    assert current_index(distributed).num_rows == 24  # gone objects are issue #3's to mark
