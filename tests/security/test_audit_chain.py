"""Issue #18 §4: an audit log that proves who saw what.

Findings: deleting the records after the last run's head left `status` at "chain intact"; the
whole chain could be rewritten without a key (recompute the hashes, patch `audit_head` in
`runs/*.json`) and still read intact; after a full disk tore the last line, `deid` and
`verify` refused forever and `status` reported a broken chain, indistinguishable from
tampering; CLI records carried no OS user or host."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import duckdb
import pytest
from security.lakes import Lake, make_lake

from pipeline.lake import LakePaths
from pipeline.lake.audit import AuditLog, Witness, verify_chain
from pipeline.lake.keys import LakeKeys, load_key


@pytest.fixture
def lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lake:
    monkeypatch.setenv("PACSFLOW__AUDIT__WITNESS", str(tmp_path / "witness" / "heads.log"))
    return make_lake(tmp_path)


def _log(lake: Lake) -> Path:
    return lake.root / "restricted" / "audit" / "audit.jsonl"


def _records(lake: Lake) -> list[dict[str, object]]:
    return [json.loads(line) for line in _log(lake).read_text().splitlines()]


def test_records_say_who_where_and_which_process(lake: Lake) -> None:
    for rec in _records(lake):
        assert rec["os_user"]
        assert rec["host"] == socket.gethostname()
        assert isinstance(rec["pid"], int)
        assert rec["user"]
        assert len(str(rec["mac"])) == 64


def test_deleting_the_records_after_the_last_run_is_detected(lake: Lake) -> None:
    assert lake.run("sql", "SELECT 1").exit_code == 0  # a record after the last run's head
    assert lake.run("status").exit_code == 0
    lines = _log(lake).read_text().splitlines(keepends=True)
    _log(lake).write_text("".join(lines[:-1]))
    result = lake.run("status")
    assert result.exit_code == 1, result.output
    assert "BROKEN" in result.output
    assert "truncated" in result.output


def test_rewriting_the_whole_chain_without_the_key_is_detected(lake: Lake) -> None:
    """The attacker recomputes every link with SHA-256 (what the old chain used) and patches
    the heads in the run manifests: every link and head agrees, but no MAC does."""
    records = _records(lake)
    prev = "0" * 64
    for rec in records:
        if rec["event"] == "run_started":
            rec["command"] = "nothing-to-see"
        rec["prev"] = prev
        body = {k: v for k, v in rec.items() if k != "mac"}
        canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        rec["mac"] = hashlib.sha256(canon).hexdigest()
        prev = str(rec["mac"])
    _log(lake).write_text("".join(json.dumps(r) + "\n" for r in records))
    by_seq = {r["seq"]: r["mac"] for r in records}
    for manifest in (lake.root / "runs").glob("*.json"):
        data = json.loads(manifest.read_text())
        data["audit_head"]["mac"] = by_seq[data["audit_head"]["seq"]]
        manifest.write_text(json.dumps(data))
    result = lake.run("status")
    assert result.exit_code == 1, result.output
    assert "MAC mismatch" in result.output
    # another key cannot forge it either
    forged = AuditLog(LakePaths(lake.root), LakeKeys(b"f" * 32), witness="none")
    assert not verify_chain(LakePaths(lake.root), LakeKeys(load_key(lake.key))).ok
    assert forged.path == _log(lake)


def test_a_torn_last_record_is_torn_not_tampering_and_repair_is_audited(lake: Lake) -> None:
    whole = _log(lake).read_bytes()
    torn = b'{"details":{"command":"deid"},"event":"run_sta'
    with open(_log(lake), "ab") as fh:  # what a full disk leaves of the last write
        fh.write(torn)
    status = lake.run("status")
    assert status.exit_code == 1
    assert "TORN (not tampering)" in status.output
    refused = lake.run("deid", "--workers", "1")
    assert refused.exit_code == 1
    assert "torn" in refused.output
    assert "pacsflow audit repair" in refused.output

    repaired = lake.run("audit", "repair")
    assert repaired.exit_code == 0, repaired.output
    assert f"removed {len(torn)} torn bytes" in repaired.output
    kept = list((lake.root / "restricted" / "audit").glob("torn-*.bin"))
    assert [p.read_bytes() for p in kept] == [torn]
    assert oct(kept[0].stat().st_mode & 0o777) == "0o600"
    assert _log(lake).read_bytes().startswith(whole)
    last = _records(lake)[-1]
    assert last["event"] == "audit_repaired"
    assert last["details"]["removed_sha256"] == hashlib.sha256(torn).hexdigest()
    assert lake.run("status").exit_code == 0
    assert lake.run("deid", "--workers", "1").exit_code == 0
    again = lake.run("audit", "repair")
    assert again.exit_code == 1
    assert "not torn" in again.output


def test_repair_refuses_a_log_broken_elsewhere(lake: Lake) -> None:
    lines = _log(lake).read_text().splitlines(keepends=True)
    rec = json.loads(lines[0])
    rec["details"]["command"] = "forged"
    _log(lake).write_text(json.dumps(rec) + "\n" + "".join(lines[1:]) + '{"seq":')
    result = lake.run("audit", "repair")
    assert result.exit_code == 1
    assert "broken, not torn" in result.output


def test_the_witness_catches_a_log_rolled_back_to_an_older_copy(lake: Lake) -> None:
    older = _log(lake).read_bytes()
    assert lake.run("verify").exit_code == 0
    _log(lake).write_bytes(older)
    result = lake.run("status")
    assert result.exit_code == 1
    assert "truncated" in result.output
    witness = Witness(os.environ["PACSFLOW__AUDIT__WITNESS"])
    assert oct(witness.path.stat().st_mode & 0o777) == "0o600"  # type: ignore[union-attr]


def test_the_audit_table_answers_who_touched_a_patient(lake: Lake) -> None:
    series = duckdb.sql(
        "SELECT patient_token, SeriesInstanceUID FROM "
        f"read_parquet('{lake.root}/research/tables/series/**/*.parquet', "
        "hive_partitioning = true) ORDER BY 1, 2"
    ).fetchall()
    token, series_uid = series[0]
    other = next(t for t, _ in series if t != token)
    paths = LakePaths(lake.root)
    log = AuditLog(paths, LakeKeys(load_key(lake.key)), witness="none")
    log.append("review_finding_viewed", user="dr_a", finding_key=f"{series_uid}/k/m/lung")
    other_series = next(s for t, s in series if t == other)
    log.append("review_finding_viewed", user="dr_b", finding_key=f"{other_series}/k/m/lung")

    result = lake.run("audit", "--patient", token, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    events = [(r["event"], r["user"]) for r in rows]
    assert ("review_finding_viewed", "dr_a") in events
    assert ("review_finding_viewed", "dr_b") not in events
    assert any(e == "restricted_read" for e, _ in events)  # the deid run that read them
    table = lake.run("audit", "--patient", token)
    assert "dr_a" in table.output
    assert "review_finding_viewed" in table.output
    assert _records(lake)[-1]["event"] == "audit_queried"
    by_user = lake.run("audit", "--user", "dr_b", "--json")
    assert [json.loads(line)["user"] for line in by_user.output.splitlines()] == ["dr_b"]


def test_the_default_witness_catches_truncation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no witness configured, the head still goes to a file outside the lake (the user's
    state folder), which `status` reads back."""
    monkeypatch.delenv("PACSFLOW__AUDIT__WITNESS")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    lake = make_lake(tmp_path)
    assert lake.run("sql", "SELECT 1").exit_code == 0
    ok = lake.run("status")
    assert ok.exit_code == 0, ok.output
    assert "end matches it" in ok.output
    assert (tmp_path / "state" / "pacsflow" / "audit-witness.log").is_file()
    lines = _log(lake).read_text().splitlines(keepends=True)
    _log(lake).write_text("".join(lines[:-1]))
    result = lake.run("status")
    assert result.exit_code == 1
    assert "truncated" in result.output
