"""crawl and status through the CLI, in-process: summaries, reconciliation, audit checks."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_factory import make_ct, write
from typer.testing import CliRunner

from pipeline.cli.main import app

runner = CliRunner()


def _archive(root: Path) -> Path:
    for i in range(1, 4):
        write(make_ct(number=i), root / f"IM{i}")
    (root / "junk.bin").write_bytes(b"\x00" * 300)
    return root


def test_crawl_then_status(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "a")
    lake = tmp_path / "lake"
    args = ["crawl", "--source", str(archive), "--lake", str(lake), "--workers", "1"]  # in-process
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "seen 4, indexed 3, quarantined 1, unchanged 0" in first.output
    second = runner.invoke(app, args)
    assert "seen 4, indexed 0, quarantined 0, unchanged 4" in second.output

    result = runner.invoke(app, ["status", "--lake", str(lake), "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)["lake"]
    assert rep["objects"] == {"seen": 4, "indexed": 3, "quarantined": 1}
    assert rep["quarantine_by_reason"] == {"not_dicom": 1}
    assert rep["runs"] == 2
    assert rep["last_run"]["status"] == "succeeded"
    assert rep["audit"]["ok"]
    assert rep["audit"]["records"] == 6  # per crawl: started, read of identified data, finished
    assert rep["key_fingerprint"].startswith("pfk1:")


def test_status_fails_on_a_tampered_or_truncated_audit_log(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "a")
    lake = tmp_path / "lake"
    assert (
        runner.invoke(
            app, ["crawl", "--source", str(archive), "--lake", str(lake), "--workers", "1"]
        ).exit_code
        == 0
    )
    log = lake / "restricted" / "audit" / "audit.jsonl"
    lines = log.read_text().splitlines()

    log.write_text("\n".join(lines[:-1]) + "\n")  # drop the last record: chain still links
    result = runner.invoke(app, ["status", "--lake", str(lake)])
    assert result.exit_code == 1
    assert "BROKEN" in result.output
    assert "truncated" in result.output

    rec = json.loads(lines[0])
    rec["details"]["command"] = "forged"
    log.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n")
    result = runner.invoke(app, ["status", "--lake", str(lake)])
    assert result.exit_code == 1
    assert "MAC mismatch" in result.output
