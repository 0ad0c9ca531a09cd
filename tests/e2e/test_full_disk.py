"""Issue #20 §2: a full disk is named, exits 4, and the lake stays usable once space is freed.

Finding: `pacsflow deid` on a full disk said "unexpected OSError (a bug: please report it)";
with the export folder on a full disk, every object whose export failed was quarantined as
`unreadable` (and the run succeeded). Here a small tmpfs is mounted in a private mount
namespace (``unshare -m``, root only), filled, and the CLI run on it: one line names the
filesystem and what the stage needed, exit 4, nothing quarantined for it; the disk is grown
(``mount -o remount,size=...``) and the same command rerun completes: every object
de-identified once, none lost, none twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.compute as pc
import pytest

from pipeline.lake import LakePaths, read_table
from pipeline.lake.keys import LakeKeys, load_key

if TYPE_CHECKING:
    from conftest import PrivateTmpfs

pytestmark = pytest.mark.slow

EXE = Path(sys.executable).parent / "pacsflow"

# $1 mount point, $2 pacsflow, $3 archive, $4 lake, $5 "export" or "lake", $6 out folder
SCRIPT = r"""
set -u
mnt=$1 exe=$2 archive=$3 lake=$4 where=$5 out=$6
mount -t tmpfs -o size=2m tmpfs "$mnt" || exit 97
extra=""
if [ "$where" = export ]; then extra="--export-dicom $mnt/export"; fi
"$exe" -q crawl --source "$archive" --lake "$lake" --workers 1 > "$out/crawl.out" 2>&1 \
  || exit 98
free=$(df -B1 --output=avail "$mnt" | tail -1)
head -c $((free - 40960)) /dev/zero > "$mnt/filler" 2>/dev/null
"$exe" -q deid --lake "$lake" --workers 1 $extra > "$out/full.out" 2> "$out/full.err"
echo $? > "$out/full.rc"
mount -o remount,size=16m "$mnt"
"$exe" -q deid --lake "$lake" --workers 1 $extra > "$out/again.out" 2> "$out/again.err"
echo $? > "$out/again.rc"
if [ "$where" = export ]; then find "$mnt/export" -name '*.dcm' | wc -l > "$out/exported"; fi
if [ "$where" = lake ]; then cp -a "$lake" "$out/lake"; fi
"""


def _run(tmp_path: Path, disk: PrivateTmpfs, where: str, key_file: Path) -> dict[str, str]:
    if not EXE.exists():
        pytest.skip("the pacsflow console script is not installed (pip install -e .)")
    unshare, mnt = disk.unshare, disk.mount_point
    from pipeline.synth import synthesize

    archive = tmp_path / "archive"
    made = synthesize(archive, patients=1, seed=20, small=True, ct_slices=10, include_mr=False)
    lake = (mnt if where == "lake" else tmp_path) / "lake"
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "full.sh"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW")}
    env.update(PACSFLOW_KEY_FILE=str(key_file), PACSFLOW__AUDIT__WITNESS="none")
    done = subprocess.run(
        [unshare, "-m", "bash", str(script), str(mnt), str(EXE), str(archive), str(lake),
         where, str(out)],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    got = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    got["instances"] = str(made.n_instances)
    return got


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("pacsflow: ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_deid_on_a_full_lake_disk_says_so_and_resumes(
    tmp_path: Path, private_tmpfs: PrivateTmpfs, session_key_file: Path
) -> None:
    got = _run(tmp_path, private_tmpfs, "lake", session_key_file)
    assert got["full.rc"].strip() == "4", got["full.err"][-2000:]
    line = _error_line(got["full.err"])
    assert "no space left on tmpfs (mounted at " in line, line
    assert "needed more than ~" in line, line
    assert "MB free now" in line, line
    assert "unexpected" not in got["full.err"]
    assert got["again.rc"].strip() == "0", got["again.err"][-2000:]
    lake = LakePaths(tmp_path / "out" / "lake", keys=LakeKeys(load_key(session_key_file)))
    vault = read_table(lake, "vault")
    instances = read_table(lake, "instances")
    quarantine = read_table(lake, "quarantine")
    good = int(got["instances"])
    assert len(set(vault.column("object_key").to_pylist())) == good  # none lost
    assert instances.num_rows == good  # none twice
    assert len(pc.unique(instances.column("SOPInstanceUID"))) == good
    assert "deid" not in set(quarantine.column("stage").to_pylist())  # none blamed


def test_deid_export_to_a_full_disk_quarantines_nothing_and_resumes(
    tmp_path: Path, private_tmpfs: PrivateTmpfs, session_key_file: Path
) -> None:
    got = _run(tmp_path, private_tmpfs, "export", session_key_file)
    assert got["full.rc"].strip() == "4", got["full.err"][-2000:]
    line = _error_line(got["full.err"])
    assert "no space left on tmpfs (mounted at " in line, line
    assert "/disk)" in line, line
    assert got["again.rc"].strip() == "0", got["again.err"][-2000:]
    lake = LakePaths(tmp_path / "lake", keys=LakeKeys(load_key(session_key_file)))
    quarantine = read_table(lake, "quarantine")
    assert "deid" not in set(quarantine.column("stage").to_pylist())
    vault = read_table(lake, "vault")
    instances = read_table(lake, "instances")
    good = int(got["instances"])
    assert len(set(vault.column("object_key").to_pylist())) == good
    assert instances.num_rows == good
    assert int(got["exported"]) == good  # every object's de-identified file is there
