"""De-identification on a real Dask cluster equals the in-process run, row for row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.lake import LakePaths, read_table

pytestmark = pytest.mark.integration

KEY = b"d" * 32


def _rows(table: pa.Table, key: str) -> list[dict[str, object]]:
    return sorted(table.to_pylist(), key=lambda r: str(r[key]))


def test_deid_on_the_cluster_equals_local(tmp_path: Path, dask_client) -> None:  # type: ignore[no-untyped-def]
    from pipeline.synth import synthesize

    archive = tmp_path / "archive"
    synthesize(archive, patients=2, seed=4242, ct_slices=8, rows=64, columns=64)
    cfg = load_config(overrides={"compute": {"partition_size": 10}}, environ={})
    lakes = {}
    for name, client in (("local", None), ("cluster", dask_client)):
        lake = LakePaths(tmp_path / name)
        crawl_run(cfg, lake, FolderSource(archive), run_id="c", client=client)
        result = deid_run(cfg, lake, key=KEY, run_id="d", client=client)
        assert result.counts.out > 0
        lakes[name] = lake
    for table, key in (
        ("instances", "SOPInstanceUID"),
        ("series", "SeriesInstanceUID"),
        ("studies", "StudyInstanceUID"),
        ("patients", "patient_token"),
    ):
        local = _rows(read_table(lakes["local"], table), key)
        cluster = _rows(read_table(lakes["cluster"], table), key)
        assert local == cluster, table
