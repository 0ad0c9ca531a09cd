"""Lake paths, schemas, atomic writes, manifests and the keyed, chained audit log."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.lake import (
    RESEARCH_TABLES,
    RESTRICTED_TABLES,
    SCHEMA_VERSION,
    SCHEMAS,
    AuditLog,
    LakePaths,
    RunRecorder,
    StageCounts,
    list_manifests,
    read_table,
    sweep_temporaries,
    verify_chain,
    write_partition,
)
from pipeline.lake.identity import open_lake
from pipeline.lake.io import conform
from pipeline.lake.keys import LakeKeys

KEYS = LakeKeys(b"lake-test-key-32-bytes-long-ok!!")


def _lake(root: Path) -> LakePaths:
    """A lake of KEYS (marker written) at ``root``."""
    lake = LakePaths(root)
    open_lake(lake, KEYS, create=True)
    return lake


def test_every_table_has_a_schema_and_a_zone(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path)
    assert set(SCHEMAS) == set(RESTRICTED_TABLES) | set(RESEARCH_TABLES)
    for name in RESTRICTED_TABLES:
        assert lake.zone_of(lake.table(name)) == "restricted"
    for name in RESEARCH_TABLES:
        assert lake.zone_of(lake.table(name)) == "research"
    with pytest.raises(KeyError, match="no table"):
        lake.table("nope")


def test_research_schemas_hold_no_identifying_columns() -> None:
    identifying = {"PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "location"}
    for name in RESEARCH_TABLES:
        assert not identifying & set(SCHEMAS[name].names), name


def _index_row(i: int, run: str = "r1") -> dict[str, object]:
    return {
        "object_key": f"k{i}",
        "source": "/a",
        "source_kind": "folder",
        "location": f"f{i}",
        "unit_key": f"f{i}",
        "StudyInstanceUID": "1.2",
        "SeriesInstanceUID": "1.2.3",
        "SOPInstanceUID": f"1.2.3.{i}",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "size_bytes": 10,
        "mtime_ns": 1,
        "crawl_run": run,
        "state": "indexed",
        "crawled_at": datetime.now(UTC),
    }


def test_write_partition_round_trip_and_schema(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path).create()
    path = write_partition(lake, "index", [_index_row(i) for i in range(3)], part="r1-00000")
    assert path.parent == lake.table("index")
    back = read_table(lake, "index")
    assert back.num_rows == 3
    assert back.schema.equals(SCHEMAS["index"], check_metadata=False)
    assert pq.read_schema(path).metadata[b"pacsflow.schema_version"] == str(SCHEMA_VERSION).encode()
    # the same part again replaces, never duplicates (idempotent retries)
    write_partition(lake, "index", [_index_row(i) for i in range(2)], part="r1-00000")
    assert read_table(lake, "index").num_rows == 2


def test_conform_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="undeclared"):
        conform(pa.table({"object_key": ["x"], "bogus": [1]}), "quarantine")
    with pytest.raises(ValueError, match="required column"):
        conform(pa.table({"object_key": ["x"]}), "quarantine")
    assert conform([], "index").num_rows == 0


def test_empty_table_reads_with_schema(tmp_path: Path) -> None:
    t = read_table(LakePaths(tmp_path), "series")
    assert t.num_rows == 0
    assert t.schema.names == SCHEMAS["series"].names


def test_no_partial_file_is_ever_visible(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path).create()
    folder = lake.table("index")
    folder.mkdir(parents=True)
    # what a writer killed mid-write leaves behind: a hidden temporary, ignored by readers
    (folder / ".r9-00000.parquet.tmp-dead").write_bytes(b"PAR1 half a file")
    write_partition(lake, "index", [_index_row(1)], part="r1-00000")
    assert read_table(lake, "index").num_rows == 1
    assert sweep_temporaries(lake) == 1
    assert not list(folder.glob(".*"))


def test_unsafe_part_names_are_refused(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path)
    with pytest.raises(ValueError, match="unsafe"):
        write_partition(lake, "index", [], part="../escape")


def test_restricted_zone_is_owner_only(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake").create()
    assert oct(lake.restricted.stat().st_mode & 0o777) == "0o700"


def test_audit_chain_detects_edits_deletions_and_reordering(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    log = AuditLog(lake, KEYS, witness="none")
    for i in range(5):
        log.append("read", run_id="r", count=i, pseudonym=f"2.25.{i}")
    check = verify_chain(lake, KEYS)
    assert check.ok
    assert check.records == 5
    lines = log.path.read_text().splitlines()

    edited = lines.copy()
    rec = json.loads(edited[2])
    rec["details"]["count"] = 99
    edited[2] = json.dumps(rec)
    log.path.write_text("\n".join(edited) + "\n")
    assert not verify_chain(lake, KEYS).ok

    log.path.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    assert "sequence" in verify_chain(lake, KEYS).reason

    log.path.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    assert not verify_chain(lake, KEYS).ok

    log.path.write_text("\n".join(lines) + "\n")
    assert verify_chain(lake, KEYS).ok


def test_audit_refuses_identifying_details(tmp_path: Path) -> None:
    log = AuditLog(_lake(tmp_path), KEYS, witness="none")
    with pytest.raises(ValueError, match="identifying"):
        log.append("read", PatientID="12345")
    with pytest.raises(ValueError, match="identifying"):
        log.append("read", nested={"PatientName": "DOE^JOHN"})
    with pytest.raises(ValueError, match="unsupported type"):
        log.append("read", blob=object())


def _append_many(root: str, n: int) -> None:
    log = AuditLog(LakePaths(Path(root)), KEYS, witness="none")
    for i in range(n):
        log.append("worker", count=i, pid=os.getpid())


def test_audit_appends_from_several_processes_keep_the_chain(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), 40)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    check = verify_chain(lake, KEYS)
    assert check.ok, check.reason
    assert check.records == 120


def test_run_manifest_records_counts_versions_and_audit_head(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path)
    with RunRecorder(
        lake, "crawl", keys=KEYS, witness="none", create=True, config_hash="abc", config={"x": 1}
    ) as rec:
        assert json.loads(rec.path.read_text())["status"] == "running"
        rec.stage("crawl", StageCounts(seen=3, out=2, quarantined=1))
    (m,) = list_manifests(lake)
    assert m.status == "succeeded"
    assert m.config_hash == "abc"
    assert m.versions["pydicom"]
    assert m.stages["crawl"].reconciles
    assert m.audit_head is not None
    assert m.key_fingerprint == KEYS.fingerprint
    records = AuditLog(lake, KEYS).records()
    assert [r["event"] for r in records] == ["run_started", "run_finished"]
    assert records[-1]["mac"] == m.audit_head["mac"]


def test_run_manifest_flags_unreconciled_and_failed_runs(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    with RunRecorder(lake, "crawl", keys=KEYS, witness="none") as rec:
        rec.stage("crawl", StageCounts(seen=3, out=1))
    assert list_manifests(lake)[-1].status == "unreconciled"
    with pytest.raises(RuntimeError), RunRecorder(lake, "crawl", keys=KEYS, witness="none"):
        raise RuntimeError("boom")
    failed = [m for m in list_manifests(lake) if m.status == "failed"]
    assert len(failed) == 1
    assert failed[0].error == "RuntimeError"


def test_runs_started_in_one_second_are_listed_in_start_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in CI: run ids sort by the second only (``...T183000Z-<random>``), so two runs of
    one second were listed by their random suffix and the "last run" was sometimes the first."""
    import pipeline.lake.manifest as manifest

    # one second, each suffix sorting before the one before it
    ids = iter(f"20261207T090000Z-{s}" for s in ("ffffff", "aaaaaa", "000000"))
    monkeypatch.setattr(manifest, "new_run_id", lambda now=None: next(ids))
    lake = _lake(tmp_path)
    made = []
    for command in ("crawl", "deid", "tensors"):
        with RunRecorder(lake, command, keys=KEYS, witness="none") as rec:
            made.append(rec.run_id)
    assert sorted(made) == made[::-1]
    assert [m.run_id for m in list_manifests(lake)] == made
    assert list_manifests(lake)[-1].command == "tensors"


def _filler(t: object) -> object:
    import datetime as dt

    import pyarrow as pa

    if pa.types.is_timestamp(t):  # type: ignore[arg-type]
        return dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    if pa.types.is_integer(t):  # type: ignore[arg-type]
        return 0
    return "x"


def test_tables_written_by_an_earlier_release_read_with_every_column(tmp_path: Path) -> None:
    """A lake written before a column existed (the vault's pixel_redactions, the findings'
    box and task columns of issues #21/#22): its queries see the column as NULL. Was: the
    tensors stage over such a lake failed with 'unexpected BinderException (a bug ...)'."""
    import deltalake
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.lake import LakePaths
    from pipeline.lake.queries import scan_sql
    from pipeline.lake.schemas import schema_for

    lake = LakePaths(tmp_path / "lake")
    # the vault (restricted, plain Parquet) as an earlier release wrote it: no pixel_redactions
    old_vault = pa.schema([f for f in schema_for("vault") if f.name != "pixel_redactions"])
    folder = lake.table("vault")
    folder.mkdir(parents=True)
    row = {f.name: (None if f.nullable else _filler(f.type)) for f in old_vault}
    row["object_key"] = "k1"
    pq.write_table(pa.Table.from_pylist([row], schema=old_vault), folder / "part-old.parquet")
    # findings (research, Delta) without the columns added since
    new = {"box_class", "box_voxel", "box_mm", "centre_mm", "size_mm", "task", "predicted",
           "model_entry"}  # fmt: skip
    old_findings = pa.schema([f for f in schema_for("findings") if f.name not in new])
    frow = {f.name: (None if f.nullable else _filler(f.type)) for f in old_findings}
    frow["finding_key"] = "f1"
    deltalake.write_deltalake(
        str(lake.table("findings")), pa.Table.from_pylist([frow], schema=old_findings)
    )
    con = duckdb.connect()
    got = con.execute(
        f"SELECT object_key, pixel_redactions FROM {scan_sql(lake, 'vault')}"
    ).fetchall()
    assert got == [("k1", None)]
    got = con.execute(
        f"SELECT finding_key, box_mm, task, model_entry FROM {scan_sql(lake, 'findings')}"
    ).fetchall()
    assert got == [("f1", None, None, None)]
