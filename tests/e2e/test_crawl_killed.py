"""A crawl killed with SIGKILL half way, then rerun, equals an uninterrupted crawl."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.crawl import current_index
from pipeline.lake import LakePaths, read_table
from pipeline.lake.keys import LakeKeys, load_key

pytestmark = pytest.mark.slow

EXE = Path(sys.executable).parent / "pacsflow"
_VOLATILE = {"crawl_run", "crawled_at"}


def _stable(table: pa.Table) -> list[dict[str, object]]:
    keep = [c for c in table.column_names if c not in _VOLATILE]
    return sorted(table.select(keep).to_pylist(), key=lambda r: str(r["object_key"]))


def _crawl(archive: Path, lake: Path, key: Path) -> subprocess.Popen[str]:
    if not EXE.exists():
        pytest.skip("the pacsflow console script is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW")}
    env["PACSFLOW__COMPUTE__PARTITION_SIZE"] = "50"
    where = ["--lake", str(lake), "--key-file", str(key), "--workers", "1"]
    return subprocess.Popen(
        [str(EXE), "-q", "crawl", "--source", str(archive), *where],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_killed_crawl_resumes_to_the_same_index(tmp_path: Path, session_key_file: Path) -> None:
    from pipeline.synth import synthesize

    archive = tmp_path / "archive"
    result = synthesize(archive, patients=10, seed=5, small=True, include_mr=False)
    good = result.n_instances

    reference = tmp_path / "reference"
    done = _crawl(archive, reference, session_key_file)
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-2000:]

    lake = tmp_path / "lake"
    proc = _crawl(archive, lake, session_key_file)
    index_dir = lake / "restricted" / "index"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if index_dir.is_dir() and len(list(index_dir.glob("*.parquet"))) >= 8:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the crawl finished before it could be killed; make it bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.communicate()
    keys = LakeKeys(load_key(session_key_file))  # the lake is sealed at rest: reads need it
    partial = LakePaths(lake, keys=keys)
    assert 0 < read_table(partial, "index").num_rows < good

    rerun = _crawl(archive, lake, session_key_file)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert "indexed" in out

    resumed = current_index(partial)
    assert resumed.num_rows == good
    assert read_table(partial, "index").num_rows == good  # no duplicate rows at all
    assert _stable(resumed) == _stable(current_index(LakePaths(reference, keys=keys)))
    assert not list(lake.glob(".crawl-*"))  # the killed run's scratch folder was swept
