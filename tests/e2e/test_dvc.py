"""dvc.yaml: `dvc repro` runs every pipeline stage through the CLI on the demo config in a fresh
git repository; a second `dvc repro` runs nothing; a changed parameter reruns its stage and
those downstream of it only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bundle_factory import make_bundle

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _sh(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def test_dvc_repro_runs_the_pipeline_and_only_what_changed(tmp_path: Path) -> None:
    if not (BIN / "dvc").exists():
        pytest.fail("dvc is a dev dependency (pip install -e '.[dev]')")
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "configs", repo / "configs", ignore=shutil.ignore_patterns("local"))
    shutil.copytree(REPO / "models", repo / "models")
    bundle = make_bundle(tmp_path / "tiny", seed=3)
    registry = yaml.safe_load((REPO / "configs" / "models.yaml").read_text())
    registry["models"]["ct_body_composition"]["bundle"] = str(bundle)  # small and fast
    (repo / "configs" / "models.yaml").write_text(yaml.safe_dump(registry))
    demo = yaml.safe_load((repo / "configs" / "demo.yaml").read_text())
    demo["synth"].update(patients=1, ct_slices=8, rows=40, columns=40)
    demo["compute"]["workers"] = 1
    demo["infer"]["registry"] = str(repo / "configs" / "models.yaml")
    (repo / "configs" / "demo.yaml").write_text(yaml.safe_dump(demo))
    for argv in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert _sh(argv, repo).returncode == 0
    first = _sh(["dvc", "repro"], repo)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _ran(first.stdout) == {
        "synth",
        "keygen",
        "crawl",
        "deid",
        "verify",
        "tensors",
        "infer",
        "writeback",
        "fhir",
    }
    lake = repo / "demo-out" / "lake"
    assert any((lake / "research" / "tables" / "findings").rglob("*.parquet"))
    assert any((repo / "demo-out" / "results").rglob("*.dcm"))
    second = _sh(["dvc", "repro"], repo)
    assert second.returncode == 0, second.stderr[-2000:]
    assert _ran(second.stdout) == set()
    # a tensors parameter changes: tensors and what follows it rerun, nothing before
    demo["tensors"]["dtype"] = "float32"
    (repo / "configs" / "demo.yaml").write_text(yaml.safe_dump(demo))
    third = _sh(["dvc", "repro"], repo)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "tensors" in _ran(third.stdout)
    assert not _ran(third.stdout) & {"synth", "keygen", "crawl", "deid"}
