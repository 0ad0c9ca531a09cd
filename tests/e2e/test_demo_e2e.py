"""The CLI as a user runs it: `pacsflow demo`, `status` and `crawl` as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXE = Path(sys.executable).parent / "pacsflow"


def _pacsflow(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    if not EXE.exists():
        pytest.skip("the pacsflow console script is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW")}
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def small_demo(small_demo_run: tuple[Path, str]) -> tuple[Path, str]:
    """The session's small demo (``tests/e2e/conftest.py``): its output folder and stdout."""
    work, stdout = small_demo_run
    return work / "demo-out", stdout


def test_demo_synthesises_crawls_and_checks_against_ground_truth(
    small_demo: tuple[Path, str],
) -> None:
    out, stdout = small_demo
    assert "every bad object of the ground truth is quarantined, nothing else" in stdout
    truth = json.loads((out / "archive" / "ground_truth.json").read_text())
    n = sum(len(s["files"]) for s in truth["series"])
    assert f"{n} instances indexed" in stdout
    assert (out / "lake" / "restricted" / "index").is_dir()
    assert len(list((out / "lake" / "runs").glob("*.json"))) == 1  # one run, every stage
    assert "leaks found = 0" in stdout
    assert (out / "lake" / "research" / "tables" / "instances").is_dir()
    # the whole pipeline: volumes, the default model's findings, SEG + SR written back
    assert any((out / "lake" / "research" / "tables" / "findings").rglob("*.parquet"))
    results = list((out / "results").rglob("*.dcm"))
    assert results
    assert f"({len(results)} SEG/SR objects confirmed)" in stdout
    # every lung lesion of the phantoms is a lung_nodule finding
    lesions = sum(len(s.get("lesions") or []) for s in truth["series"])
    assert lesions > 0
    assert f"{lesions} of {lesions} synthesised lung lesions found" in stdout


def test_demo_rerun_reads_nothing_new(small_demo: tuple[Path, str]) -> None:
    out, _ = small_demo
    cfg = out.parent / "small.yaml"
    # the first run was given `--out demo-out` in its folder; this one the absolute path: the
    # same archive, lake and results folder (write-back once sent all again: 12 objects)
    done = _pacsflow("demo", "--out", str(out), "--config", str(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reusing the archive" in done.stdout
    assert ", indexed 0, quarantined 0, unchanged " in done.stdout
    assert "deid: seen 0, de-identified 0," in done.stdout
    assert "0 objects built" in done.stdout


def test_status_on_the_demo_lake(small_demo: tuple[Path, str]) -> None:
    out, _ = small_demo
    done = _pacsflow("status", "--lake", str(out / "lake"), "--json")
    assert done.returncode == 0, done.stderr
    lake = json.loads(done.stdout)["lake"]
    assert lake["audit"]["ok"]
    assert lake["objects"]["quarantined"] >= 1
    assert lake["quarantine_by_reason"]["not_dicom"] >= 1


def test_logs_carry_no_phi(small_demo: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = small_demo
    truth = json.loads((out / "archive" / "ground_truth.json").read_text())
    done = _pacsflow(
        "-v", "crawl", "--source", str(out / "archive"), "--lake", str(tmp_path / "lake"),
        "--key-file", str(out / "demo.key"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logs = done.stdout + done.stderr
    for patient in truth["patients"]:
        for key in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(patient.get(key, "")).strip()
            if len(value) >= 4:
                assert value not in logs, key
    for series in truth["series"]:
        assert series["StudyInstanceUID"] not in logs


def test_a_cohort_in_one_query_on_the_demo_lake(small_demo: tuple[Path, str]) -> None:
    """Issue #24 §1: lung nodules per patient without a join, each nodule once although the
    studies have a soft-tissue and a lung-kernel reconstruction of one acquisition."""
    out, _ = small_demo
    truth = json.loads((out / "archive" / "ground_truth.json").read_text())
    per_study: dict[str, int] = {}
    for s in truth["series"]:
        n = len(s.get("lesions") or [])
        per_study[s["StudyInstanceUID"]] = max(per_study.get(s["StudyInstanceUID"], 0), n)
    query = (
        "SELECT patient_token, count(DISTINCT lesion_id) AS nodules, count(*) AS n_rows "
        "FROM findings WHERE label = 'lung_nodule' AND Modality = 'CT' GROUP BY ALL"
    )
    done = _pacsflow(
        "sql", "--lake", str(out / "lake"), "--key-file", str(out / "demo.key"),
        "--format", "json", query,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    assert sum(r["nodules"] for r in rows) == sum(per_study.values())
    assert sum(r["n_rows"] for r in rows) > sum(r["nodules"] for r in rows)  # two kernels
    assert all(isinstance(r["nodules"], int) for r in rows)
