"""The folder crawl over a hostile tree: byte names, symlinks that leave the archive, dot names,
and every entry counted once (indexed, quarantined, unchanged, or skipped with a reason)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from dicom_factory import make_ct, write
from pydicom import Dataset
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.config import PipelineConfig, load_config
from pipeline.connectors import (
    FolderSource,
    Unit,
    decode_location,
    encode_location,
    open_source,
)
from pipeline.crawl import current_index
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.errors import InputError
from pipeline.lake import LakePaths, read_table

KEY = b"k" * 32

#: file names as the disk holds them (bytes), each a valid object
ODD_NAMES: tuple[bytes, ...] = (
    b"bad\xff\xfename.dcm",  # not UTF-8
    b"caf\xe9.dcm",  # Latin-1
    b"new\nline.dcm",
    b"back\\slash.dcm",
    b"back\\xff.dcm",  # a backslash that looks like an escape
    b"tail\\",  # a trailing backslash
    b"..dcm",
    b".hidden.dcm",
    b"tab\there \xc3\xa9t\xc3\xa9.dcm",  # UTF-8 with a control character
)


def _cfg(**crawl: object) -> PipelineConfig:
    return load_config(overrides={"compute": {"partition_size": 3}, "crawl": crawl}, environ={})


def _write_bytes_name(ds: Dataset, folder: Path, name: bytes) -> bytes:
    """Write ``ds`` under a file name given as bytes; return its root-relative bytes path."""
    tmp = write(ds, folder / "tmp-object")
    target = os.path.join(os.fsencode(folder), name)
    os.rename(os.fsencode(tmp), target)
    return target


def _odd_archive(root: Path) -> dict[bytes, int]:
    """One object per odd name, plus one in a folder whose own name is not UTF-8."""
    expected = {}
    for i, name in enumerate(ODD_NAMES, start=1):
        _write_bytes_name(make_ct(number=i), root, name)
        expected[name] = i
    sub = os.path.join(os.fsencode(root), b"d\xe9p\xf4t")
    os.mkdir(sub)
    n = len(ODD_NAMES) + 1
    _write_bytes_name(make_ct(number=n), Path(os.fsdecode(sub)), b"IM\x80")
    expected[b"d\xe9p\xf4t/IM\x80"] = n
    return expected


def test_locations_are_lossless_text() -> None:
    for raw in (*ODD_NAMES, b"a/b\xff/c", b"\\\\x41", b"x\\", b"plain/P1/IM_0001"):
        text = encode_location(raw)
        text.encode("utf-8")  # storable in Parquet: no lone surrogates
        assert not any(c in text for c in "\n\t\r")  # one line in any log or table
        assert decode_location(text) == raw
    # plain names keep their text (existing lakes keep their object keys)
    assert encode_location(b"P1/ST1/SE1/i123.MRDC.4") == "P1/ST1/SE1/i123.MRDC.4"
    assert encode_location("DICOM\\IM0001 é".encode()) == "DICOM\\IM0001 é"
    assert encode_location(b"bad\xff") == "bad\\xff"
    assert len({encode_location(n) for n in ODD_NAMES}) == len(ODD_NAMES)
    # any bytes at all, from an alphabet made of the tricky ones
    rng = random.Random(20)
    alphabet = [b"\\", b"x", b"f", b"/", b".", b"\n", b"\x7f", b"\xc2\x85", b"\xe9", b"\xff"]
    alphabet.append("é".encode())
    for _ in range(3000):
        raw = b"".join(rng.choices(alphabet, k=rng.randint(0, 12)))
        text = encode_location(raw)
        text.encode("utf-8")
        assert decode_location(text) == raw, raw


def test_odd_file_names_are_indexed_unchanged_on_rerun_and_opened_by_deid(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    expected = _odd_archive(archive)
    lake = LakePaths(tmp_path / "lake")
    cfg = _cfg()
    first = crawl_run(cfg, lake, FolderSource(archive), run_id="r1").counts
    assert (first.seen, first.out, first.quarantined, first.skipped) == (len(expected), 10, 0, 0)
    index = current_index(lake)
    got = {
        decode_location(loc): n
        for loc, n in zip(
            index.column("location").to_pylist(),
            index.column("InstanceNumber").to_pylist(),
            strict=True,
        )
    }
    assert got == expected
    # a rerun sees every one of them as unchanged: no new rows, no duplicates
    again = crawl_run(cfg, lake, FolderSource(archive), run_id="r2").counts
    assert (again.seen, again.out, again.quarantined, again.skipped) == (10, 0, 0, 10)
    assert again.extra["gone"] == 0
    assert read_table(lake, "index").num_rows == 10
    # the connector opens each by its location, and deid de-identifies every one
    source = open_source(str(archive))
    for loc in index.column("location").to_pylist():
        with source.open(loc) as fp:
            assert fp.read(132)[128:] == b"DICM"
    deid = deid_run(cfg, lake, key=KEY, run_id="d1").counts
    assert (deid.out, deid.quarantined) == (10, 0)


def test_an_archive_root_that_cannot_round_trip_is_refused(tmp_path: Path) -> None:
    root = os.path.join(os.fsencode(tmp_path), b"r\xff")
    os.mkdir(root)
    from pipeline.errors import SourceError

    with pytest.raises(SourceError, match="archive root"):
        open_source(os.fsdecode(root))


def _outside_links(tmp_path: Path, *, up: bool = True) -> Path:
    """An archive with objects inside, links to a file and a folder outside, and links inside."""
    outside = tmp_path / "elsewhere"
    write(make_ct(number=90), outside / "secret.dcm")
    write(make_ct(number=91), outside / "dir" / "other.dcm")
    archive = tmp_path / "archive"
    write(make_ct(number=1), archive / "P1" / "IM1")
    (archive / "P1" / "file-link.dcm").symlink_to(outside / "secret.dcm")
    (archive / "dir-link").symlink_to(outside / "dir")
    if up:
        (archive / "up").symlink_to("..")  # relative, and out of the root
    # inside the root: links to what the walk reaches at its own path anyway
    (archive / "P1" / "same.dcm").symlink_to(archive / "P1" / "IM1")
    write(make_ct(number=2), archive / "real" / "IM2")
    (archive / "alias").symlink_to("real")
    return archive


def test_symlinks_leaving_the_root_are_skipped_and_counted(tmp_path: Path) -> None:
    archive = _outside_links(tmp_path)
    lake = LakePaths(tmp_path / "lake")
    c = crawl_run(_cfg(), lake, FolderSource(archive), run_id="r1").counts
    index = current_index(lake)
    # each object once, under its own path: no SOP Instance UID under two locations
    assert sorted(index.column("InstanceNumber").to_pylist()) == [1, 2]
    assert sorted(index.column("location").to_pylist()) == ["P1/IM1", "real/IM2"]
    assert c.extra["skipped_by_reason"] == {"symlink_inside_root": 2, "symlink_outside_root": 3}
    assert (c.seen, c.out, c.quarantined, c.skipped) == (7, 2, 0, 5)
    assert c.reconciles


def test_following_symlinks_out_of_the_root_is_a_config_choice(tmp_path: Path) -> None:
    archive = _outside_links(tmp_path, up=False)
    lake = LakePaths(tmp_path / "lake")
    source = FolderSource(archive, follow_symlinks_outside_root=True)
    c = crawl_run(_cfg(), lake, source, run_id="r1").counts
    assert sorted(current_index(lake).column("InstanceNumber").to_pylist()) == [1, 2, 90, 91]
    assert c.extra["skipped_by_reason"] == {"symlink_inside_root": 2}
    assert c.reconciles
    # and no link at all
    lake = LakePaths(tmp_path / "lake2")
    c = crawl_run(_cfg(), lake, FolderSource(archive, follow_symlinks=False), run_id="r1").counts
    assert sorted(current_index(lake).column("InstanceNumber").to_pylist()) == [1, 2]
    assert c.extra["skipped_by_reason"] == {"symlink_not_followed": 4}


def test_the_crawl_stage_takes_the_symlink_policy_from_the_config(tmp_path: Path) -> None:
    archive = _outside_links(tmp_path, up=False)
    config = tmp_path / "c.yaml"
    config.write_text("source:\n  follow_symlinks_outside_root: true\n")
    lake = tmp_path / "lake"
    args = ["crawl", "--source", str(archive), "--lake", str(lake), "--workers", "1"]
    result = CliRunner().invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "seen 6, indexed 4, quarantined 0, unchanged 0, skipped 2 (" in result.output


def test_a_loop_through_an_outside_folder_ends(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write(make_ct(number=1), archive / "IM1")
    outside = tmp_path / "out"
    write(make_ct(number=2), outside / "IM2")
    (outside / "again").symlink_to(outside)  # outside, back to itself
    (archive / "out").symlink_to(outside)
    source = FolderSource(archive, follow_symlinks_outside_root=True)
    c = crawl_run(_cfg(), LakePaths(tmp_path / "lake"), source, run_id="r1").counts
    assert (c.seen, c.out) == (3, 2)
    assert c.extra["skipped_by_reason"] == {"folder_repeat": 1}


def test_a_location_swapped_for_a_link_out_of_the_root_is_not_read(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    write(make_ct(number=1), archive / "IM1")
    write(make_ct(number=2), archive / "IM2")
    lake = LakePaths(tmp_path / "lake")
    crawl_run(_cfg(), lake, FolderSource(archive), run_id="r1")
    # after the crawl, someone swaps a file for a link to an object outside the archive
    write(make_ct(number=90), tmp_path / "elsewhere" / "secret.dcm")
    (archive / "IM2").unlink()
    (archive / "IM2").symlink_to(tmp_path / "elsewhere" / "secret.dcm")
    deid = deid_run(_cfg(), lake, key=KEY, run_id="d1").counts
    assert (deid.out, deid.quarantined) == (1, 1)
    q = read_table(lake, "quarantine").to_pylist()
    assert [(r["location"], r["stage"], r["reason"]) for r in q] == [("IM2", "deid", "unreadable")]
    assert "leads out of the archive root" in q[0]["message"]


def test_a_file_swapped_for_a_link_after_the_listing_is_quarantined_by_the_crawl(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "archive"
    write(make_ct(number=1), archive / "IM1")
    write(make_ct(number=90), tmp_path / "elsewhere" / "secret.dcm")
    source = FolderSource(archive)
    (unit,) = source.list_units()
    assert isinstance(unit, Unit)
    (archive / "IM1").unlink()
    (archive / "IM1").symlink_to(tmp_path / "elsewhere" / "secret.dcm")
    (raw,) = source.read_unit(unit)
    assert raw.path is None
    assert isinstance(raw.error, InputError)
    assert raw.error.reason == "unreadable"


def test_every_entry_is_counted_once_in_the_summary_and_the_manifest(tmp_path: Path) -> None:
    archive = tmp_path / "a"
    write(make_ct(number=1), archive / "IM1")
    write(make_ct(number=2), archive / "..dcm")  # a dot name is an object like any other
    write(make_ct(number=3), archive / ".dir" / "IM3")
    (archive / "junk.bin").write_bytes(b"\x00" * 300)
    (archive / ".IM1.tmp-0123abcd").write_bytes(b"half written")  # pacsflow's own temporary
    (archive / "dangling").symlink_to(archive / "nowhere")
    (archive / "loop").symlink_to("loop")
    os.mkfifo(archive / "fifo")
    lake = tmp_path / "lake"
    args = ["crawl", "--source", str(archive), "--lake", str(lake), "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "seen 8, indexed 3, quarantined 1, unchanged 0, skipped 4 (" in result.output
    assert "broken_symlink 2" in result.output
    assert "not_regular_file 1" in result.output
    assert "pacsflow_temporary 1" in result.output
    manifest = json.loads(next((lake / "runs").glob("*.json")).read_text())
    crawl = manifest["stages"]["crawl"]
    assert (crawl["seen"], crawl["out"], crawl["quarantined"], crawl["skipped"]) == (8, 3, 1, 4)
    assert crawl["extra"]["unchanged"] == 0
    assert crawl["extra"]["skipped_by_reason"] == {
        "broken_symlink": 2,
        "not_regular_file": 1,
        "pacsflow_temporary": 1,
    }
    again = CliRunner().invoke(app, args)
    assert "seen 8, indexed 0, quarantined 0, unchanged 4, skipped 4 (" in again.output
