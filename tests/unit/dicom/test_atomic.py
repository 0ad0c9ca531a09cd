"""pipeline.dicom.atomic: the one atomic file writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.dicom.atomic import (
    TEMPORARY_GLOB,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
)


@pytest.mark.parametrize("durable", [True, False])
def test_writes_and_replaces(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "a" / "b" / "f.bin"
    atomic_write_bytes(target, b"one", durable=durable)
    atomic_write_bytes(target, memoryview(b"two"), durable=durable)
    assert target.read_bytes() == b"two"
    atomic_write_text(target, "drei é")
    assert target.read_text("utf-8") == "drei é"
    assert list(tmp_path.rglob(TEMPORARY_GLOB)) == []


def test_error_leaves_target_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def die_open() -> None:
        with atomic_open(target) as fh:
            fh.write(b"half")
            raise RuntimeError("writer died")

    def die_path() -> None:
        with atomic_path(tmp_path / "g.bin") as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        die_open()
    assert target.read_bytes() == b"old"
    with pytest.raises(RuntimeError):
        die_path()
    assert not (tmp_path / "g.bin").exists()
    assert list(tmp_path.rglob(TEMPORARY_GLOB)) == []


def test_temporary_is_hidden_beside_target(tmp_path: Path) -> None:
    target = tmp_path / "x" / "f.parquet"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp.name.startswith(".")
        assert not tmp.name.endswith(".parquet")
        assert tmp.match(TEMPORARY_GLOB)
        tmp.write_bytes(b"")


def test_lake_names_are_the_same_writer() -> None:
    import pipeline.lake as lake
    import pipeline.lake.io as lake_io
    from pipeline.dicom import atomic

    assert lake.atomic_write_bytes is atomic.atomic_write_bytes
    assert lake_io.atomic_write_text is atomic.atomic_write_text
    assert lake_io.sync_filesystem is atomic.sync_filesystem


def test_one_temp_and_rename_writer_in_the_package() -> None:
    """Issue #19: the six temp-file-and-rename writers became this one. The only other rename
    left is infer/bundle.py's, of an unpacked bundle *folder* into the cache."""
    import re

    import pipeline

    root = Path(pipeline.__file__).parent
    users = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"os\.replace\(|\.rename\(|mkstemp\(", p.read_text(encoding="utf-8"))
    )
    assert users == ["dicom/atomic.py", "infer/bundle.py"]


def test_parent_folders_are_made_when_missing(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "new" / "deeper" / "g.bin", durable=False) as fh:
        fh.write(b"y")
    assert (tmp_path / "new" / "deeper" / "g.bin").read_bytes() == b"y"
    assert list(tmp_path.rglob(TEMPORARY_GLOB)) == []
