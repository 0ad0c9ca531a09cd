"""The folder crawl: header parsing, quarantine reasons, incremental reruns, reconciliation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from dicom_factory import make_ct, write
from pydicom.uid import RLELossless

from pipeline.config import load_config
from pipeline.connectors import FolderSource, Skipped, Unit, open_source, source_kind
from pipeline.crawl import current_index, object_states, read_header
from pipeline.crawl import run as crawl_run
from pipeline.enums import SkipReason
from pipeline.errors import ConfigError, MissingAttribute, NotDicom
from pipeline.lake import LakePaths, read_table

EXPECTED_BAD = {
    ".hidden": "not_dicom",
    "bad/notes.txt": "not_dicom",
    "bad/empty": "not_dicom",
    "bad/truncated.dcm": "truncated",
    "bad/rle_truncated.dcm": "truncated",
    "bad/no_series_uid.dcm": "missing_attribute",
}


def _crawl(root: Path, lake: LakePaths, run_id: str, **cfg: object):  # type: ignore[no-untyped-def]
    config = load_config(overrides={"compute": {"partition_size": 3}, **cfg}, environ={})
    return crawl_run(config, lake, FolderSource(root), run_id=run_id)


def test_walk_finds_every_file_once_and_survives_a_symlink_loop(archive: Path) -> None:
    entries = list(FolderSource(archive).list_units())
    locations = [r.key for r in entries if isinstance(r, Unit)]
    assert len(locations) == len(set(locations)) == 11
    assert "P1/ST1/SE1/i123.MRDC.4" in locations
    assert ".hidden" in locations
    assert [r for r in entries if isinstance(r, Skipped)] == [
        Skipped("P1/loop", SkipReason.SYMLINK_INSIDE_ROOT)
    ]


def test_crawl_indexes_good_and_quarantines_bad_with_reasons(archive: Path, tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake")
    result = _crawl(archive, lake, "r1")
    c = result.counts
    assert (c.seen, c.out, c.quarantined, c.skipped) == (12, 5, 6, 1)
    assert c.reconciles
    index = read_table(lake, "index")
    assert sorted(index.column("InstanceNumber").to_pylist()) == [1, 2, 3, 4, 5]
    assert set(index.column("PatientID").to_pylist()) == {"PAT-001"}
    syntaxes = dict(
        zip(
            index.column("location").to_pylist(),
            index.column("TransferSyntaxUID").to_pylist(),
            strict=True,
        )
    )
    assert syntaxes["P2/rle.dcm"] == "1.2.840.10008.1.2.5"
    assert syntaxes["P1/noext"] == "1.2.840.10008.1.2"
    q = read_table(lake, "quarantine")
    got = dict(zip(q.column("location").to_pylist(), q.column("reason").to_pylist(), strict=True))
    assert got == EXPECTED_BAD
    for message in q.column("message").to_pylist():
        assert "DOE" not in message
        assert "PAT-001" not in message


def test_rerun_is_incremental_and_picks_up_changes(archive: Path, tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake")
    _crawl(archive, lake, "r1")
    again = _crawl(archive, lake, "r2").counts
    assert (again.seen, again.out, again.quarantined, again.skipped) == (12, 0, 0, 12)
    # a new object, a changed object, and a bad object fixed at the source
    write(make_ct(number=9), archive / "P3" / "new.dcm")
    changed = archive / "P1" / "ST1" / "SE1" / "x.img"
    write(make_ct(number=33), changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    write(make_ct(number=8), archive / "bad" / "no_series_uid.dcm")
    third = _crawl(archive, lake, "r3").counts
    assert (third.seen, third.out, third.quarantined, third.skipped) == (13, 3, 0, 10)
    index = current_index(lake)
    assert index.num_rows == 7  # 5 + new + fixed; the changed one is updated, not duplicated
    numbers = dict(
        zip(
            index.column("location").to_pylist(),
            index.column("InstanceNumber").to_pylist(),
            strict=True,
        )
    )
    assert numbers["P1/ST1/SE1/x.img"] == 33


def test_on_invalid_raise_is_for_development(archive: Path, tmp_path: Path) -> None:
    with pytest.raises(NotDicom):
        _crawl(archive, LakePaths(tmp_path / "lake"), "r1", crawl={"on_invalid": "raise"})


def test_read_header_never_reads_pixel_values(tmp_path: Path) -> None:
    path = write(make_ct(number=3), tmp_path / "a.dcm")
    with open(path, "rb") as fp:
        rec = read_header(fp, path.stat().st_size)
    assert rec.has_pixel_data
    assert rec.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    with open(path, "rb") as fp:
        assert read_header(fp, path.stat().st_size).fingerprint == rec.fingerprint


def test_dicomdir_is_not_an_image() -> None:
    from pydicom.data import get_testdata_file

    dicomdir = Path(get_testdata_file("DICOMDIR", download=False))
    with open(dicomdir, "rb") as fp, pytest.raises(MissingAttribute) as info:
        read_header(fp, dicomdir.stat().st_size)
    assert info.value.reason == "directory_record"


def test_source_uris() -> None:
    assert source_kind("/data/archive") == "folder"
    assert source_kind("dicomweb+https://pacs:443/dicom-web") == "dicomweb"
    assert source_kind("dimse://PACS@pacs:104") == "dimse"
    with pytest.raises(ConfigError, match="unknown source scheme"):
        source_kind("ftp://x")
    with pytest.raises(ConfigError, match="cache folder"):
        open_source("dimse://PACS@pacs:104")


def _rows(lake: LakePaths, name: str) -> int:
    return read_table(lake, name).num_rows


def test_rerun_on_unchanged_archive_adds_zero_rows(archive: Path, tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake")
    _crawl(archive, lake, "r1")
    before = {name: _rows(lake, name) for name in ("index", "quarantine", "units")}
    counts = _crawl(archive, lake, "r2").counts
    assert counts.out == counts.quarantined == 0
    assert {name: _rows(lake, name) for name in before} == before


def test_objects_gone_from_the_source_are_marked(archive: Path, tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake")
    _crawl(archive, lake, "r1")
    (archive / "P2" / "rle.dcm").unlink()
    (archive / "bad" / "notes.txt").unlink()
    counts = _crawl(archive, lake, "r2").counts
    assert counts.extra["gone"] == 2
    assert counts.seen == 10
    states = {r["location"]: r["state"] for r in object_states(lake).to_pylist()}
    assert states["P2/rle.dcm"] == "gone"
    assert states["bad/notes.txt"] == "gone"
    assert states["P1/noext"] == "indexed"
    assert states["bad/empty"] == "quarantined"
    gone_row = next(r for r in current_index(lake).to_pylist() if r["location"] == "P2/rle.dcm")
    assert gone_row["SOPInstanceUID"]  # the gone row keeps what the object was
    # a third run finds nothing new to mark; a file that comes back is indexed again
    assert _crawl(archive, lake, "r3").counts.extra["gone"] == 0
    write(make_ct(number=5, syntax=RLELossless), archive / "P2" / "rle.dcm")
    assert _crawl(archive, lake, "r4").counts.out == 1
    states = {r["location"]: r["state"] for r in object_states(lake).to_pylist()}
    assert states["P2/rle.dcm"] == "indexed"
