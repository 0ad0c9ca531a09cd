"""Checksums recorded at commit (pipeline.lake.integrity): issue #20 §2."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.lake import LakePaths, delta, write_partition
from pipeline.lake.integrity import CHECKSUMS, check
from pipeline.lake.io import commit_rows


def _inst(i: int, modality: str = "CT") -> dict[str, Any]:
    return {
        "SOPInstanceUID": f"2.25.{i}",
        "SeriesInstanceUID": "2.25.90",
        "StudyInstanceUID": "2.25.7",
        "patient_token": "TOKEN",
        "Modality": modality,
        "deid_version": "test",
    }


def _overwrite(path: Path, at: int, data: bytes, *, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(data)
    if keep_mtime:  # bit rot: the bytes change, the inode's times do not
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_every_committed_file_is_recorded_and_damage_is_found(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake").create()
    commit_rows(lake, "instances", [_inst(1), _inst(2, "MR")])
    commit_rows(lake, "instances", [_inst(3)])
    write_partition(lake, "quarantine", [], part="q-0")
    files = [Path(f) for f in delta.data_files(lake, "instances")]
    assert len(files) == 3
    records = (lake.table("instances") / CHECKSUMS).read_text().splitlines()
    assert len(records) == 3
    assert (lake.table("quarantine") / CHECKSUMS).is_file()
    assert check(lake) == []
    assert check(lake, full=True) == []

    _overwrite(files[0], 10, b"\xa5" * 20)  # an overwrite in place changes the mtime
    (found,) = check(lake)
    assert found.table == "instances"
    assert found.path == files[0].relative_to(lake.root).as_posix()
    assert "checksum" in found.why

    _overwrite(files[1], 10, b"\x5a" * 20, keep_mtime=True)  # only the full check sees it
    assert [d.path for d in check(lake)] == [found.path]
    assert len(check(lake, full=True)) == 2

    with open(files[2], "ab") as fh:
        fh.write(b"x")
    assert any("size" in d.why for d in check(lake))


def test_a_torn_record_line_leaves_that_file_unrecorded(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake").create()
    commit_rows(lake, "instances", [_inst(1)])
    record = lake.table("instances") / CHECKSUMS
    record.write_text(record.read_text()[:-20])  # a crash tore the last line
    (file,) = delta.data_files(lake, "instances")
    _overwrite(Path(file), 10, b"\xa5" * 20)
    assert check(lake) == []  # unrecorded: nothing to compare with
    assert check(lake, full=True)  # but its footer is read, and it is damaged


def test_vacuum_keeps_the_record(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake").create()
    commit_rows(lake, "instances", [_inst(1)])
    commit_rows(lake, "instances", [_inst(1)])  # replaces the first file
    delta.vacuum(lake, retention_hours=0)
    assert (lake.table("instances") / CHECKSUMS).is_file()
    assert check(lake, full=True) == []


def test_a_partition_rewritten_under_its_name_is_vouched_for(tmp_path: Path) -> None:
    """A retried task rewrites a restricted partition of the same name: its new record is
    written before the rename, and any record of the path vouches for the file."""
    lake = LakePaths(tmp_path / "lake").create()
    import datetime as dt

    row = {
        **dict.fromkeys(("object_key", "source", "location", "unit_key", "stage"), "x"),
        **dict.fromkeys(("reason", "error_class", "message", "run_id"), "x"),
        "quarantined_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    }
    write_partition(lake, "quarantine", [row], part="q-0")
    write_partition(lake, "quarantine", [row, {**row, "object_key": "k2"}], part="q-0")
    assert len((lake.table("quarantine") / CHECKSUMS).read_text().splitlines()) == 2
    assert check(lake, full=True) == []
