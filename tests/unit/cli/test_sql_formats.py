"""Issue #24 §1: `pacsflow sql` for a data scientist.

Findings: NULL printed as NaN and integer sums as floats (the result went through pandas); no
way to get CSV, JSON or Parquet out; `FROM reviews` failed until the first decision."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from security.lakes import Lake, make_lake

from pipeline.lake.duck import RESEARCH_VIEWS

QUERY = (
    "SELECT Modality, sum(n_instances) AS n, CAST(NULL AS INTEGER) AS missing, "
    "avg(n_instances) AS mean FROM series GROUP BY ALL ORDER BY Modality"
)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    return make_lake(tmp_path_factory.mktemp("sqlfmt"), patients=1)


def _expected(lake: Lake) -> dict[str, int]:
    result = lake.run("sql", "--format", "json", "SELECT Modality, n_instances FROM series")
    assert result.exit_code == 0, result.output
    out: dict[str, int] = {}
    for row in json.loads(result.output):
        out[row["Modality"]] = out.get(row["Modality"], 0) + row["n_instances"]
    return out


def test_table_shows_null_as_null_and_integer_sums_as_integers(lake: Lake) -> None:
    result = lake.run("sql", QUERY)
    assert result.exit_code == 0, result.output
    assert "NaN" not in result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["Modality", "n", "missing", "mean"]
    sums = _expected(lake)
    assert len(lines) == 1 + len(sums)
    for line in lines[1:]:
        modality, n, missing, _mean = line.split()
        assert n == str(sums[modality])  # "12", not "12.0"
        assert missing == "NULL"


def test_csv_json_and_parquet(lake: Lake, tmp_path: Path) -> None:
    sums = _expected(lake)
    result = lake.run("sql", "--format", "csv", QUERY)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert {r["Modality"]: r["n"] for r in rows} == {k: str(v) for k, v in sums.items()}
    assert all(r["missing"] == "" for r in rows)

    result = lake.run("sql", "--format", "json", QUERY)
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert {r["Modality"]: r["n"] for r in records} == sums
    assert all(isinstance(r["n"], int) and r["missing"] is None for r in records)

    out = tmp_path / "series.parquet"
    result = lake.run("sql", "--format", "parquet", "--out", out, QUERY)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.schema.field("n").type == "int64"
    assert dict(zip(table.column("Modality").to_pylist(), table.column("n").to_pylist(),
                    strict=True)) == sums  # fmt: skip
    assert table.column("missing").null_count == table.num_rows

    out_csv = tmp_path / "series.csv"
    result = lake.run("sql", "--format", "csv", "--out", out_csv, QUERY)
    assert result.exit_code == 0, result.output
    assert out_csv.read_text().splitlines()[0] == "Modality,n,missing,mean"


def test_parquet_needs_out_and_bad_formats_are_named(lake: Lake) -> None:
    result = lake.run("sql", "--format", "parquet", QUERY)
    assert result.exit_code == 2
    assert "--out FILE" in result.output
    result = lake.run("sql", "--format", "xlsx", QUERY)
    assert result.exit_code == 2
    assert "table, csv, json, parquet" in result.output


@pytest.mark.parametrize("view", RESEARCH_VIEWS)
def test_every_view_the_help_lists_exists_from_the_start(lake: Lake, view: str) -> None:
    # a lake crawled and de-identified only: no tensors, findings, reviews or corrections yet
    result = lake.run("sql", "--format", "json", f"SELECT count(*) AS n FROM {view}")
    assert result.exit_code == 0, (view, result.output)
    help_text = lake.run("sql", "--help").output
    assert view in help_text
