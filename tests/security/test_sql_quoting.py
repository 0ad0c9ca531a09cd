"""SQL over the lake binds values and quotes paths: a lake folder with a quote, glob
characters and a space works, and config values shaped like SQL inject nothing. A folder with
square brackets, which the Delta Lake library cannot open, is refused in one line."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from dicom_factory import make_ct, write

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.crawl.stage import current_index, object_states
from pipeline.deid.stage import run as deid_run
from pipeline.errors import ConfigError
from pipeline.lake import LakePaths
from pipeline.lake.audit_query import resolve_subject
from pipeline.lake.duck import arrow_table, connect, research_sandbox

KEY = b"k" * 32
SERIES = "1.2.826.0.1.3680043.8.498.4243"
#: a value that closes a string literal and runs a second statement when spliced
EVIL = "x'; CREATE TABLE pwned AS SELECT 42; --"


def _lake(tmp_path: Path, name: str = "o'brien *1? lake") -> LakePaths:
    archive = tmp_path / "archive"
    for i in range(3):
        write(make_ct(number=i + 1, series_uid=SERIES), archive / f"ct{i}.dcm")
    lake = LakePaths(tmp_path / name)
    cfg = load_config(overrides={"compute": {"partition_size": 2}}, environ={})
    crawl_run(cfg, lake, FolderSource(archive), run_id="20260101T000000Z-aaaaaa")
    deid_run(cfg, lake, key=KEY, run_id="20260101T000001Z-bbbbbb")
    return lake


def _tables(con: object) -> set[str]:
    return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}  # type: ignore[attr-defined]


def test_a_lake_under_a_quoted_path_works_end_to_end(tmp_path: Path) -> None:
    """Crawl (listing, spill folder), deid (superseded rows, aggregates), the index, the
    object states, the sandbox views and the audit subject all read the lake at a path holding
    a single quote, glob characters and a space."""
    lake = _lake(tmp_path)
    assert current_index(lake).num_rows == 3
    assert set(object_states(lake).column("state").to_pylist()) == {"deidentified"}
    con = research_sandbox(lake, tmp_path / "spill")
    try:
        assert con.execute("SELECT count(*) FROM instances").fetchall() == [(3,)]
        [(series,)] = con.execute("SELECT SeriesInstanceUID FROM series").fetchall()
    finally:
        con.close()
    assert resolve_subject(lake, series=series).series == frozenset({series})


def test_a_lake_under_square_brackets_is_refused_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    archive = tmp_path / "archive"
    write(make_ct(number=1, series_uid=SERIES), archive / "ct.dcm")
    lake = tmp_path / "o'brien [1] lake"
    done = CliRunner().invoke(app, ["crawl", "--source", str(archive), "--lake", str(lake)])
    assert done.exit_code == 2, done.output
    assert "choose a folder without square brackets" in done.output
    assert len(done.output.strip().splitlines()) == 1
    assert not lake.exists()  # nothing made


def test_values_shaped_like_sql_are_bound(tmp_path: Path) -> None:
    """A destination, a model reference and a subject that close a quote and add a statement
    are compared as values: nothing matches and no statement runs."""
    from pipeline.writeback.stage import _confirmed, _groups

    lake = _lake(tmp_path)
    con = connect()
    try:
        assert _confirmed(con, lake, EVIL) == {}
        assert _groups(con, lake, EVIL) == []
        assert "pwned" not in _tables(con)
    finally:
        con.close()
    assert resolve_subject(lake, patient=EVIL).series == frozenset()


@pytest.mark.parametrize(
    "applies_to",
    [
        # closes the CTE, ends the statement, runs its own and reopens a CTE for the rest
        "true)) SELECT 1; CREATE TABLE pwned AS SELECT 42; "
        "WITH s AS (SELECT 'x' AS SeriesInstanceUID, 'CT' AS Modality WHERE (true",
        "volume_ok; CREATE TABLE pwned AS SELECT 42",
        "volume_ok) --",
    ],
)
def test_a_model_filter_is_one_expression(tmp_path: Path, applies_to: str) -> None:
    """A registry ``applies_to`` that is more than one expression is a config error, and
    nothing of it runs."""
    from pipeline.infer.stage import _todo

    lake = _lake(tmp_path, "lake")  # a plain path: the filter alone is under test
    cfg = load_config(environ={})
    entry = SimpleNamespace(name="m", applies_to=applies_to)
    bundle = SimpleNamespace(name="m", version="1", weights_sha256="0" * 64)
    con = connect()
    try:
        with pytest.raises(ConfigError, match="applies_to"):
            list(_todo(con, lake, cfg, entry, bundle, 4))
        assert "pwned" not in _tables(con)
    finally:
        con.close()


def test_a_model_filter_still_filters(tmp_path: Path) -> None:
    """A filter with quotes, casts and comments runs as written."""
    from pipeline.lake.queries import filter_expression

    lake = _lake(tmp_path)
    expr = filter_expression("Modality IN ('CT', 'o''brien') -- CT only", what="t")
    con = connect()
    try:
        from pipeline.lake.queries import scan_sql

        n = arrow_table(con, f"SELECT count(*) AS n FROM {scan_sql(lake, 'series')} WHERE {expr}")
        assert n.column("n").to_pylist() == [1]
    finally:
        con.close()
