"""``pacsflow status`` leads with the lake (issue #24): counts, findings, reviews, runs, key,
audit; fast (no torch, no pydicom, no pandas); versions and codecs behind ``--versions``."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dicom_factory import make_ct, write
from typer.testing import CliRunner

from pipeline.cli.main import app

runner = CliRunner()
HEAVY = ("torch", "monai", "highdicom", "pydicom", "pandas", "pynetdicom", "dicomweb_client")


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, session_key_file: Path) -> Path:
    """A crawled lake with two findings of one model and three review decisions."""
    from pipeline.lake import LakePaths
    from pipeline.lake.io import commit_rows

    root = tmp_path_factory.mktemp("status")
    archive = root / "archive"
    for i in range(1, 4):
        write(make_ct(number=i), archive / f"IM{i}")
    (archive / "junk.bin").write_bytes(b"\x00" * 300)
    lake = root / "lake"
    args = ["crawl", "--source", str(archive), "--lake", str(lake)]
    done = runner.invoke(app, [*args, "--key-file", str(session_key_file)])
    assert done.exit_code == 0, done.output
    paths = LakePaths(lake)
    base = {"SeriesInstanceUID": "2.25.1", "tensor_key": "t1", "model": "m", "model_version": "1"}
    base["weights_sha256"] = "0" * 64
    commit_rows(
        paths,
        "findings",
        [{**base, "finding_key": f"t1/m/{label}", "label": label} for label in ("a", "b")],
    )
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    decisions = [("t1/m/a", "reject", 1), ("t1/m/a", "accept", 2), ("t1/m/b", "uncertain", 3)]
    commit_rows(
        paths,
        "reviews",
        [
            {
                "review_id": f"r{n}",
                "finding_key": key,
                "reviewer": "qa",
                "decision": decision,
                "reviewed_at": t0.replace(hour=n),
            }
            for key, decision, n in decisions
        ],
    )
    return lake


def test_status_leads_with_the_lake(lake: Path) -> None:
    result = runner.invoke(app, ["status", "--lake", str(lake)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"lake: {lake} ")
    assert "versions:" not in result.output
    assert "pixel codecs" not in result.output
    text = result.output
    assert "objects: 4 seen (indexed 3, quarantined 1)" in text
    assert "findings: 2 (m@1: 2 on 1 volume(s))" in text
    # latest decision per finding: a accepted (after a reject), b uncertain
    assert "reviews: 3 decision(s) on 2 finding(s), latest per finding: accept 1, uncertain 1" in (
        text
    )
    runs = lines.index(next(ln for ln in lines if ln.startswith("  runs: 1 in all")))
    assert "crawl" in lines[runs + 1]
    assert "succeeded" in lines[runs + 1]
    assert " s" in lines[runs + 1]  # its duration
    assert "key fingerprint: pfk1:" in text
    assert "audit log:" in text
    assert "chain intact" in text


def test_status_json_has_findings_reviews_and_recent_runs(lake: Path) -> None:
    result = runner.invoke(app, ["status", "--lake", str(lake), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert "environment" not in report
    rep = report["lake"]
    assert rep["findings"] == {"rows": 2, "by_model": {"m@1": {"rows": 2, "volumes": 1}}}
    assert rep["reviews"] == {
        "decisions": 3,
        "findings_reviewed": 2,
        "latest_decision": {"accept": 1, "uncertain": 1},
    }
    (run,) = rep["recent_runs"]
    assert run["command"] == "crawl"
    assert run["status"] == "succeeded"
    assert run["seconds"] is not None


def test_status_of_an_empty_lake_says_none_yet(tmp_path: Path) -> None:
    empty = tmp_path / "archive"
    empty.mkdir()
    lake = tmp_path / "lake"
    assert runner.invoke(app, ["crawl", "--source", str(empty), "--lake", str(lake)]).exit_code == 0
    result = runner.invoke(app, ["status", "--lake", str(lake)])
    assert result.exit_code == 0, result.output
    assert "findings: 0" in result.output
    assert "reviews: none yet (0 finding(s) unreviewed)" in result.output


def test_versions_are_behind_a_flag_with_full_codec_names(lake: Path) -> None:
    result = runner.invoke(app, ["status", "--lake", str(lake), "--versions"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.index("lake: ") < text.index("versions:") < text.index("pixel codecs")
    # names were cut at 60 characters ("...Compressio", "(Pro")
    assert "High-Throughput JPEG 2000 with RPCL Options Image Compression (Lossless Only)" in text
    assert "First-Order Prediction (Process 14 [Selection Value 1])" in text
    report = json.loads(
        runner.invoke(app, ["status", "--lake", str(lake), "--json", "--versions"]).output
    )
    assert report["environment"]["versions"]["pydicom"]


def test_status_imports_only_what_it_needs(lake: Path) -> None:
    code = (
        "import sys, json\n"
        "from pipeline.cli.main import app\n"
        f"try:\n    app(['status', '--lake', {str(lake)!r}])\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    out = done.stdout.strip().splitlines()
    assert out[0].startswith("lake: ")  # the summary comes first
    loaded = set(json.loads(out[-1]))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
