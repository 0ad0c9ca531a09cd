"""Issue #20 §2: a damaged research Parquet file is found, named, and rebuilt where it can be.

Finding: with 2,000 bytes of an `instances` file overwritten, `status` exited 0 and said
nothing; `verify` and `run` failed with "unexpected OSError" naming no file; a `deid` rerun
processed 0 objects. Now every file a commit adds has its SHA-256 recorded; `status` (sizes and
times) and `status --check` (every checksum) name the file and exit 1, every stage checks the
tables it reads before it starts, and `pacsflow repair` rebuilds the `instances` rows of the
file's objects from the restricted zone, then the aggregates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pytest

from pipeline.lake import LakePaths, read_table
from pipeline.lake.delta import data_files

pytestmark = pytest.mark.slow

EXE = Path(sys.executable).parent / "pacsflow"


def _cli(*args: str, key: Path) -> subprocess.CompletedProcess[str]:
    if not EXE.exists():
        pytest.skip("the pacsflow console script is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW")}
    env.update(PACSFLOW_KEY_FILE=str(key), PACSFLOW__AUDIT__WITNESS="none")
    return subprocess.run(
        [str(EXE), "-q", *args], capture_output=True, text=True, timeout=300, check=False, env=env
    )


def _one_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("pacsflow: ")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "unexpected" not in done.stderr
    return lines[0]


@pytest.fixture
def damaged(tmp_path: Path, session_key_file: Path) -> tuple[Path, str, int]:
    """A lake after crawl and deid whose first `instances` file has 2,000 bytes overwritten;
    the file (relative to the lake) and the number of instances."""
    from pipeline.synth import synthesize

    made = synthesize(tmp_path / "archive", patients=1, seed=21, small=True, ct_slices=10)
    lake = tmp_path / "lake"
    for args in (
        ("crawl", "--source", str(tmp_path / "archive"), "--lake", str(lake), "--workers", "1"),
        ("deid", "--lake", str(lake), "--workers", "1"),
    ):
        done = _cli(*args, key=session_key_file)
        assert done.returncode == 0, done.stderr[-2000:]
    victim = Path(data_files(LakePaths(lake), "instances")[0])
    with open(victim, "r+b") as fh:
        fh.seek(victim.stat().st_size // 3)
        fh.write(b"\xa5" * 2000)
    return lake, victim.relative_to(lake).as_posix(), made.n_instances


def test_status_verify_and_deid_name_the_damaged_file(
    damaged: tuple[Path, str, int], session_key_file: Path
) -> None:
    lake, victim, _ = damaged
    config = lake.parent / "run.yaml"
    config.write_text(
        f"lake: {lake}\nsource: {{uri: {lake.parent / 'archive'}}}\n"
        "compute: {workers: 1}\nrun: {tensors: false, infer: false}\n"
    )
    for args in (
        ("status", "--lake", str(lake)),
        ("run", str(config)),
        ("status", "--lake", str(lake), "--check"),
        ("verify", "--lake", str(lake)),
        ("deid", "--lake", str(lake), "--workers", "1"),
    ):
        done = _cli(*args, key=session_key_file)
        assert done.returncode == 1, (args, done.stdout[-1000:], done.stderr[-2000:])
        line = _one_error(done)
        assert f"{victim} is damaged" in line, (args, line)
        assert "pacsflow repair" in line, line


def test_repair_rebuilds_instances_from_the_restricted_zone(
    damaged: tuple[Path, str, int], session_key_file: Path
) -> None:
    lake, victim, n = damaged
    done = _cli("repair", "--lake", str(lake), key=session_key_file)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "de-identified again from the restricted zone" in done.stdout, done.stdout
    assert (lake / "restricted" / "damaged" / victim).is_file()  # kept aside, out of research/
    for args in (
        ("status", "--lake", str(lake), "--check"),
        ("verify", "--lake", str(lake)),
        ("deid", "--lake", str(lake), "--workers", "1"),
    ):
        again = _cli(*args, key=session_key_file)
        assert again.returncode == 0, (args, again.stderr[-2000:])
    paths = LakePaths(lake)
    instances = read_table(paths, "instances")
    assert instances.num_rows == n  # every object back, once
    assert len(pc.unique(instances.column("SOPInstanceUID"))) == n
    assert sum(read_table(paths, "series").column("n_instances").to_pylist()) == n


def test_repair_says_what_it_cannot_rebuild(
    damaged: tuple[Path, str, int], session_key_file: Path
) -> None:
    lake, victim, _ = damaged
    index = sorted((lake / "restricted" / "index").rglob("*.parquet"))[0]
    with open(index, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\x00" * 64)
    done = _cli("repair", "--lake", str(lake), key=session_key_file)
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    rel = index.relative_to(lake).as_posix()
    assert f"repair: cannot rebuild {rel} (table index): crawl the archive" in done.stdout
    assert (
        f"repair: cannot rebuild {victim} (table instances) while the restricted table(s) "
        "index it is rebuilt from are damaged"
    ) in done.stdout
    assert _one_error(done) == (
        "pacsflow: repair: 2 damaged file(s) could not be rebuilt (see above)"
    )
