"""Issue #20 §2: the review command's faults are one clear line and a documented exit code.

Findings: `pacsflow review --report r.html --run nosuchrun` wrote an empty report, exit 0;
with the port taken it printed "serving" and then uvicorn's Errno 98, exit 3.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_review_support import REPO_ROOT, cli_env, review_settings, shared_lake

from pipeline.lake import LakePaths

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, session_key_file: Path) -> LakePaths:
    return shared_lake(tmp_path_factory, session_key_file)


def _config(path: Path, lake: LakePaths, key_file: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {"lake": str(lake.root), "key_file": str(key_file), "review": review_settings()}
        )
    )
    return path


def _cli(*args: str) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", *args],
        cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_report_of_an_unknown_run_is_refused(
    lake: LakePaths, session_key_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "r.html"
    done = _cli("review", "--lake", str(lake.root), "--report", str(out), "--run", "nosuchrun")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "pacsflow: --run: no run 'nosuchrun' in this lake (see `pacsflow status` for its runs)"
    ]
    assert not out.exists()
    # the run that wrote the findings still gives its report
    done = _cli("review", "--lake", str(lake.root), "--report", str(out), "--run", "i")
    assert done.returncode == 0, done.stderr
    assert out.is_file()


def test_a_busy_port_is_one_line_and_exit_3(
    lake: LakePaths, session_key_file: Path, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "c.yaml", lake, session_key_file)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _cli("review", "--config", str(cfg), "--port", str(port))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "serving" not in done.stdout
    assert done.stderr.strip().splitlines() == [
        f"pacsflow: cannot serve on 127.0.0.1:{port}: the port is in use (another `pacsflow "
        "review`, or another server?): pick another with --port or review.port"
    ]
