"""Issue #19 §4: the research tables are versioned (Delta Lake).

Findings: a reader could see half of a batch (a batch's instances were one Parquet file per
Modality, renamed into place one after another); superseded rows were dropped by rewriting part
files in place; no run could be read as it was (``--as-of``), and nothing was pinned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.errors import LakeError
from pipeline.lake import LakePaths, delta, list_manifests, read_table, write_partitioned
from pipeline.lake.duck import connect, scan_sql
from pipeline.lake.io import commit_rows, table_exists
from pipeline.lake.keys import generate_key_file
from pipeline.lake.manifest import pinned_versions, versions_of_run

REPO = Path(__file__).resolve().parents[3]
runner = CliRunner()


def _inst(i: int, modality: str = "CT", batch: str = "b0", **extra: Any) -> dict[str, Any]:
    return {
        "SOPInstanceUID": f"2.25.{i}",
        "SeriesInstanceUID": f"2.25.9{i % 3}",
        "StudyInstanceUID": "2.25.7",
        "patient_token": "TOKEN",
        "Modality": modality,
        "BodyPartExamined": batch,
        "deid_version": "test",
        **extra,
    }


def test_a_batch_is_one_version_and_an_object_that_comes_again_replaces_its_row(
    tmp_path: Path,
) -> None:
    lake = LakePaths(tmp_path / "lake").create()
    assert delta.current_version(lake, "instances") is None
    assert not table_exists(lake, "instances")
    write_partitioned(
        lake, "instances", [_inst(1), _inst(2, "MR"), _inst(3, None)], part="r1-0", by="Modality"
    )
    assert delta.current_version(lake, "instances") == 0
    assert sorted(p.name for p in lake.table("instances").iterdir()) == [
        "Modality=CT",
        "Modality=MR",
        "Modality=UNKNOWN",
        "_delta_log",
        "_pacsflow_checksums.jsonl",  # each added file's SHA-256 (pipeline.lake.integrity)
    ]
    # the same objects again, one of them changed, plus a new one: one commit, no duplicate
    again = commit_rows(lake, "instances", [_inst(2, "MR", "b1"), _inst(4, "CT", "b1")])
    assert (again.version, again.added, again.replaced) == (1, 1, 1)
    rows = {r["SOPInstanceUID"]: r for r in read_table(lake, "instances").to_pylist()}
    assert sorted(rows) == ["2.25.1", "2.25.2", "2.25.3", "2.25.4"]
    assert rows["2.25.2"]["BodyPartExamined"] == "b1"
    # version 0 is still there as it was
    old = read_table(lake, "instances", version=0).to_pylist()
    assert sorted(r["SOPInstanceUID"] for r in old) == ["2.25.1", "2.25.2", "2.25.3"]
    con = connect()
    n = con.execute(f"SELECT count(*) FROM {scan_sql(lake, 'instances', 0)}").fetchall()
    assert n == [(3,)]
    # one object twice in one batch: the last row wins
    twice = commit_rows(lake, "instances", [_inst(5, batch="x"), _inst(5, batch="y")])
    assert twice.added == 1
    assert read_table(lake, "instances", filter=None).num_rows == 5
    with pytest.raises(LakeError, match="no version 99"):
        read_table(lake, "instances", version=99)


def test_replacing_rows_keeps_plain_string_files_that_filtered_reads_can_prune(
    tmp_path: Path,
) -> None:
    """Seen in CI: a MERGE (DataFusion) wrote its files with string_view columns; the next
    upsert's key check, a filtered pyarrow read, then failed on every batch with "Function
    'greater_equal' has no kernel matching input types (string, string_view)" (row-group
    statistics of two different values in one file)."""
    import pyarrow.compute as pc

    lake = LakePaths(tmp_path / "lake").create()
    commit_rows(lake, "instances", [_inst(1), _inst(2)])
    replaced = commit_rows(lake, "instances", [_inst(2, batch="b1"), _inst(3, batch="b1")])
    assert (replaced.added, replaced.replaced) == (1, 1)
    for path in delta.data_files(lake, "instances"):
        types = {str(field.type) for field in pq.read_schema(path)}
        assert not any("view" in t for t in types), (path, types)
    again = commit_rows(lake, "instances", [_inst(3, batch="b2"), _inst(4, batch="b2")])
    assert (again.added, again.replaced) == (1, 1)
    got = read_table(
        lake, "instances", filter=pc.field("SOPInstanceUID") >= "2.25.2", columns=["SOPInstanceUID"]
    )
    assert sorted(got.column(0).to_pylist()) == ["2.25.2", "2.25.3", "2.25.4"]
    rows = {
        r["SOPInstanceUID"]: r["BodyPartExamined"]
        for r in read_table(lake, "instances").to_pylist()
    }
    assert rows == {"2.25.1": "b0", "2.25.2": "b1", "2.25.3": "b2", "2.25.4": "b2"}
    # a key holding a quote is matched exactly, not read as SQL
    odd = _inst(5) | {"SOPInstanceUID": "2.25.5') OR (1=1"}
    commit_rows(lake, "instances", [odd])
    commit_rows(lake, "instances", [odd | {"BodyPartExamined": "b3"}])
    assert read_table(lake, "instances").num_rows == 5


def test_rows_two_concurrent_batches_both_added_are_deduplicated_in_one_commit(
    tmp_path: Path,
) -> None:
    lake = LakePaths(tmp_path / "lake").create()
    # what two workers committing at once can leave: both checked the version before the other
    delta.commit(lake, "instances", _table([_inst(1, batch="old"), _inst(2)]), mode="append")
    time.sleep(0.01)
    delta.commit(lake, "instances", _table([_inst(1, "MR", batch="new")]), mode="append")
    before = delta.current_version(lake, "instances")
    assert delta.dedupe(lake, "instances") == 1
    assert delta.current_version(lake, "instances") == before + 1  # type: ignore[operator]
    rows = {r["SOPInstanceUID"]: r for r in read_table(lake, "instances").to_pylist()}
    assert len(rows) == 2
    assert read_table(lake, "instances").num_rows == 2
    assert (rows["2.25.1"]["BodyPartExamined"], rows["2.25.1"]["Modality"]) == ("new", "MR")
    assert delta.dedupe(lake, "instances") == 0  # nothing to do: no new version
    assert delta.current_version(lake, "instances") == before + 1  # type: ignore[operator]


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    from pipeline.lake.io import conform

    return conform(rows, "instances")


def test_a_table_written_before_delta_is_read_and_then_adopted(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake").create()
    folder = lake.table("instances") / "Modality=CT"
    folder.mkdir(parents=True)
    legacy = _table([_inst(1), _inst(2)]).drop_columns(["Modality"])
    pq.write_table(legacy, folder / "r0-00000.parquet")
    assert read_table(lake, "instances").num_rows == 2  # read as it is
    commit_rows(lake, "instances", [_inst(2, batch="new"), _inst(3)])
    assert delta.current_version(lake, "instances") == 1  # adopted as 0, then the batch
    assert read_table(lake, "instances", version=0).num_rows == 2  # the same files
    rows = {r["SOPInstanceUID"]: r for r in read_table(lake, "instances").to_pylist()}
    assert sorted(rows) == ["2.25.1", "2.25.2", "2.25.3"]
    assert rows["2.25.2"]["BodyPartExamined"] == "new"


_WRITER = textwrap.dedent(
    """
    import sys
    from pipeline.lake import LakePaths, write_partitioned

    lake = LakePaths(sys.argv[1])
    for b in range(int(sys.argv[2])):
        rows = [
            {"SOPInstanceUID": f"2.25.{b}{i:04d}", "SeriesInstanceUID": "2.25.1",
             "StudyInstanceUID": "2.25.2", "patient_token": "T", "deid_version": "t",
             "Modality": ("CT", "MR", "US")[i % 3], "header_json": "x" * 2000}
            for i in range(60)
        ]
        write_partitioned(lake, "instances", rows, part=f"w-{b:05d}", by="Modality")
    """
)


def test_a_reader_during_a_write_sees_the_previous_version_or_the_next_never_half(
    tmp_path: Path,
) -> None:
    lake = LakePaths(tmp_path / "lake").create()
    batches = 12
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(lake.root), str(batches)], env=env
    )
    seen: set[int] = set()
    reads = 0
    con = connect()
    try:
        while True:
            done = writer.poll() is not None
            table = read_table(lake, "instances", columns=["Modality"])
            counts = table.group_by("Modality").aggregate([("Modality", "count")]).to_pylist()
            per = {r["Modality"]: r["Modality_count"] for r in counts}
            assert table.num_rows % 60 == 0, per  # whole batches only
            assert len(set(per.values())) <= 1, per  # never CT without its MR and US
            n = con.execute(f"SELECT count(*) FROM {scan_sql(lake, 'instances')}").fetchall()
            assert n[0][0] % 60 == 0, n
            seen.add(table.num_rows)
            reads += 1
            if done:
                break
    finally:
        con.close()
        writer.wait(timeout=60)
    assert writer.returncode == 0
    assert max(seen) == batches * 60
    assert len(seen) >= 2, f"the reader only ever saw {seen} in {reads} reads"


def _cli(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def test_as_of_reads_the_earlier_cohort_and_survives_vacuum(tmp_path: Path) -> None:
    from pipeline.synth import synthesize

    key = generate_key_file(tmp_path / "lake.key")
    lake = LakePaths(tmp_path / "lake")
    common = ["--lake", lake.root, "--key-file", key, "--workers", "1"]
    counts = []
    for seed in (1, 2):  # two runs, each adding a patient
        archive = tmp_path / f"archive{seed}"
        synthesize(
            archive, patients=1, seed=seed, ct_slices=4, rows=16, columns=16, include_bad=False
        )
        done = _cli("crawl", "--source", archive, *common)
        assert done.exit_code == 0, done.output
        done = _cli("deid", *common)
        assert done.exit_code == 0, done.output
        counts.append(read_table(lake, "instances").num_rows)
    assert 0 < counts[0] < counts[1]
    deids = [m for m in list_manifests(lake) if m.command == "deid"]
    first, second = deids
    assert set(first.table_versions) == {"instances", "series", "studies", "patients"}
    assert first.table_versions["instances"] < second.table_versions["instances"]
    assert versions_of_run(lake, first.run_id[:-2])[0] == first.run_id  # a unique prefix

    def sql(query: str, *extra: str) -> str:
        result = _cli("sql", query, "--lake", lake.root, "--key-file", key, *extra)
        assert result.exit_code == 0, result.output
        return str(result.output)

    query = "SELECT count(*) AS n, count(DISTINCT patient_token) AS p FROM instances"
    assert sql(query, "--as-of", first.run_id).split() == ["n", "p", str(counts[0]), "1"]
    assert sql(query).split() == ["n", "p", str(counts[1]), "2"]
    patients = "SELECT count(*) AS n FROM patients"
    assert sql(patients, "--as-of", first.run_id).split() == ["n", "1"]
    # a table the run did not know yet is an empty view
    assert sql("SELECT count(*) AS n FROM tensors", "--as-of", first.run_id).split() == ["n", "0"]
    bad = _cli("sql", query, "--lake", lake.root, "--key-file", key, "--as-of", "nope")
    assert bad.exit_code == 2
    assert "no run 'nope'" in bad.output
    # the sandbox holds with --as-of too
    escape = f"SELECT * FROM read_parquet('{lake.root}/restricted/vault/**/*.parquet')"
    refused = _cli("sql", escape, "--lake", lake.root, "--key-file", key, "--as-of", first.run_id)
    assert refused.exit_code == 2, refused.output
    audit = [json.loads(line) for line in (lake.audit / "audit.jsonl").read_text().splitlines()]
    pinned_calls = [r["event"] for r in audit if r["details"].get("as_of") == first.run_id]
    assert pinned_calls == ["sql"] * 3 + ["sql_failed"], pinned_calls

    status = _cli("status", "--lake", lake.root, "--key-file", key, "--json")
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)["lake"]
    assert report["table_versions"] == second.table_versions == delta.table_versions(lake)
    last = versions_of_run(lake, report["last_run"]["run_id"])[1]
    assert report["last_run"]["table_versions"] == last

    # what vacuum may remove: a file no version holds (a killed writer's), and files of
    # versions no manifest records (two overwrites made outside any run)
    orphan = lake.table("instances") / "Modality=CT" / "part-killed-writer.parquet"
    pq.write_table(_table([_inst(1)]).drop_columns(["Modality"]), orphan)
    review = {"finding_key": "f", "reviewer": "r", "decision": "accept"}
    for i in range(2):
        row = {**review, "review_id": f"r{i}", "reviewed_at": pa.scalar(0, pa.timestamp("us"))}
        delta.commit(lake, "reviews", pa.Table.from_pylist([row]), mode="overwrite")
    unpinned = delta.vacuum(lake, retention_hours=0, dry_run=True)  # what pins protect
    assert unpinned["series"], "the first run's series were replaced by the second's"
    pins = pinned_versions(lake)
    assert first.table_versions["series"] in pins["series"]

    dry = _cli("vacuum", "--lake", lake.root, "--key-file", key, "--retention-hours", "0",
               "--dry-run")  # fmt: skip
    assert dry.exit_code == 0, dry.output
    assert orphan.exists()
    result = _cli("vacuum", "--lake", lake.root, "--key-file", key, "--retention-hours", "0")
    assert result.exit_code == 0, result.output
    assert "removed 2 file(s) (instances 1, reviews 1)" in result.output, result.output
    assert not orphan.exists()
    # the pinned versions still read, whole
    assert sql(query, "--as-of", first.run_id).split() == ["n", "p", str(counts[0]), "1"]
    assert sql(patients, "--as-of", first.run_id).split() == ["n", "1"]
    assert sql(query).split() == ["n", "p", str(counts[1]), "2"]
    assert read_table(lake, "reviews").column("review_id").to_pylist() == ["r1"]
    with pytest.raises(LakeError, match="vacuum"):
        read_table(lake, "reviews", version=0)  # unpinned: gone, as asked
