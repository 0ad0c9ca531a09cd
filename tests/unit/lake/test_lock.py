"""pipeline.lake.lock: one run per lake; a dead holder's lock is taken over, a live one refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.errors import LakeError
from pipeline.lake import LakePaths
from pipeline.lake.lock import lake_lock


def _holder(lake: Path, ready: Path) -> subprocess.Popen[bytes]:
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from pipeline.lake import LakePaths
        from pipeline.lake.lock import lake_lock
        with lake_lock(LakePaths(Path({str(lake)!r})), "holder"):
            Path({str(ready)!r}).write_text("held")
            time.sleep(600)
        """
    )
    return subprocess.Popen([sys.executable, "-c", code])


def _wait(path: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)


def test_a_live_holder_is_refused_and_a_killed_one_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lake = LakePaths(tmp_path / "lake")
    ready = tmp_path / "ready"
    proc = _holder(lake.root, ready)
    try:
        _wait(ready)
        with pytest.raises(LakeError, match=rf"pid {proc.pid} .*holder"), lake_lock(lake, "run"):
            pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # dies holding it: no cleanup runs
        proc.wait(30)
    with caplog.at_level("WARNING"), lake_lock(lake, "run"):
        assert "did not finish" in caplog.text
    # a clean exit leaves no holder behind: the next run takes it silently
    caplog.clear()
    with caplog.at_level("WARNING"), lake_lock(lake, "run"):
        assert "did not finish" not in caplog.text


def test_the_same_process_cannot_nest_two_runs(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake")
    with (
        lake_lock(lake, "outer"),
        pytest.raises(LakeError, match="another pacsflow run"),
        lake_lock(lake, "inner"),
    ):
        pass
