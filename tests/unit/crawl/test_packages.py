"""Compressed files and packages in a folder archive: crawled member by member, read back
decompressed by the same location, bounded by the ``limits``, bad ones quarantined."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from dicom_factory import make_ct, write

from pipeline.config import PipelineConfig, load_config
from pipeline.connectors import (
    FolderSource,
    decode_location,
    encode_location,
    member_location,
    open_source,
    split_location,
)
from pipeline.crawl import current_index
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.errors import InputError
from pipeline.lake import LakePaths, read_table

KEY = b"k" * 32


def _cfg(**limits: object) -> PipelineConfig:
    return load_config(overrides={"compute": {"partition_size": 2}, "limits": limits}, environ={})


def _dicom(number: int) -> bytes:
    buf = io.BytesIO()
    make_ct(number=number).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _packed_archive(root: Path) -> dict[str, int]:
    """Every kind of compressed file and package; location -> InstanceNumber."""
    root.mkdir(parents=True)
    (root / "a.dcm.gz").write_bytes(gzip.compress(_dicom(1)))
    (root / "b.dcm.bz2").write_bytes(bz2.compress(_dicom(2)))
    (root / "c.dcm.xz").write_bytes(lzma.compress(_dicom(3)))
    # named .dcm, but gzip: found by its bytes
    (root / "d.dcm").write_bytes(gzip.compress(_dicom(4)))
    (root / "p.zip").write_bytes(_zip({"dir/m5.dcm": _dicom(5), "m6": _dicom(6)}))
    (root / "q.tar.gz").write_bytes(gzip.compress(_tar({"s/m7.dcm": _dicom(7)})))
    (root / "r.tgz").write_bytes(_tar({"m8": _dicom(8)}, "w:gz"))
    (root / "t.tar").write_bytes(_tar({"m9.dcm.gz": gzip.compress(_dicom(9))}))
    (root / "u.tar.bz2").write_bytes(_tar({"m10": _dicom(10)}, "w:bz2"))
    (root / "v.tar.xz").write_bytes(_tar({"m11": _dicom(11)}, "w:xz"))
    # nested: a zip holding a tar.gz holding a gzip file (depth 4: zip, gzip, tar, gzip)
    inner = gzip.compress(_tar({"deep.dcm.gz": gzip.compress(_dicom(12))}))
    (root / "w.zip").write_bytes(_zip({"in/x.tar.gz": inner}))
    write(make_ct(number=13), root / "plain.dcm")
    return {
        "a.dcm.gz": 1,
        "b.dcm.bz2": 2,
        "c.dcm.xz": 3,
        "d.dcm": 4,
        "p.zip!/dir/m5.dcm": 5,
        "p.zip!/m6": 6,
        "q.tar.gz!/s/m7.dcm": 7,
        "r.tgz!/m8": 8,
        "t.tar!/m9.dcm.gz": 9,
        "u.tar.bz2!/m10": 10,
        "v.tar.xz!/m11": 11,
        "w.zip!/in/x.tar.gz!/deep.dcm.gz": 12,
        "plain.dcm": 13,
    }


def _locations(lake: LakePaths) -> dict[str, int]:
    return {
        row["location"]: row["InstanceNumber"]
        for row in current_index(lake).to_pylist()
        if row["state"] != "gone"
    }


def _quarantined(lake: LakePaths) -> dict[str, str]:
    q = read_table(lake, "quarantine")
    return dict(zip(q.column("location").to_pylist(), q.column("reason").to_pylist(), strict=True))


def test_member_locations_round_trip_and_never_meet_a_real_name() -> None:
    assert member_location([b"P1/a.zip", b"dir/m.dcm"]) == "P1/a.zip!/dir/m.dcm"
    # a real folder named "a.zip!" is not a package: its "!" before "/" is escaped
    real = encode_location(b"a.zip!/dir/m.dcm")
    assert real == "a.zip\\x21/dir/m.dcm"
    assert decode_location(real) == b"a.zip!/dir/m.dcm"
    assert split_location(real) == [b"a.zip!/dir/m.dcm"]
    names = [b"a", b"a!", b"!", b"!/", b"a\\!/b", b"a\\", b"\\x21", b"x!!/y!", b"/x", b"\xff!/\n"]
    for first in names:
        for second in names:
            for third in names:
                parts = [first, second, third]
                assert split_location(member_location(parts)) == parts
    # names without "!/" keep the location they always had
    assert encode_location(b"P1/IM!1") == "P1/IM!1"


def test_compressed_files_and_packages_are_crawled_member_by_member(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    expected = _packed_archive(archive)
    lake = LakePaths(tmp_path / "lake")
    cfg = _cfg()
    first = crawl_run(cfg, lake, FolderSource(archive), run_id="r1").counts
    assert _quarantined(lake) == {}
    assert _locations(lake) == expected
    assert (first.seen, first.out, first.quarantined) == (13, 13, 0)
    # every member opens by its location, decompressed, as the crawl read it
    source = open_source(str(archive), cfg.source, limits=cfg.limits)
    for loc in expected:
        with source.open(loc) as fp:
            assert fp.read(132)[128:] == b"DICM", loc
    # a rerun: unchanged packages, unchanged members, no new rows
    again = crawl_run(cfg, lake, FolderSource(archive), run_id="r2").counts
    assert (again.seen, again.out, again.quarantined, again.extra["unchanged"]) == (13, 0, 0, 13)
    assert read_table(lake, "index").num_rows == 13
    # deid reads every member through the same path
    deid = deid_run(cfg, lake, key=KEY, run_id="d1").counts
    assert (deid.out, deid.quarantined) == (13, 0)


def test_a_changed_package_is_read_again_without_duplicates(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    pkg = archive / "p.zip"
    pkg.write_bytes(_zip({"m1": _dicom(1), "m2": _dicom(2)}))
    lake = LakePaths(tmp_path / "lake")
    cfg = _cfg()
    crawl_run(cfg, lake, FolderSource(archive), run_id="r1")
    pkg.write_bytes(_zip({"m1": _dicom(1), "m3": _dicom(3)}))
    os.utime(pkg, ns=(1, 1))
    c = crawl_run(cfg, lake, FolderSource(archive), run_id="r2").counts
    assert (c.out, c.extra["unchanged"], c.extra["gone"]) == (1, 1, 1)
    assert _locations(lake) == {"p.zip!/m1": 1, "p.zip!/m3": 3}


def test_links_devices_and_duplicates_in_packages_are_skipped_and_counted(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("m1", _dicom(1)), ("m1", _dicom(2)), ("m3", _dicom(3))):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name, kind in (("sym", tarfile.SYMTYPE), ("hard", tarfile.LNKTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = kind, "m1"
            tf.addfile(ti)
        ti = tarfile.TarInfo("fifo")
        ti.type = tarfile.FIFOTYPE
        tf.addfile(ti)
        ti = tarfile.TarInfo("dev")
        ti.type = tarfile.CHRTYPE
        tf.addfile(ti)
    (archive / "p.tar").write_bytes(buf.getvalue())
    lake = LakePaths(tmp_path / "lake")
    cfg = _cfg()
    c = crawl_run(cfg, lake, FolderSource(archive), run_id="r1").counts
    assert _locations(lake) == {"p.tar!/m1": 1, "p.tar!/m3": 3}
    assert c.extra["skipped_by_reason"] == {
        "archive_duplicate": 1,
        "archive_link": 2,
        "not_regular_file": 2,
    }
    assert (c.seen, c.out, c.quarantined, c.skipped) == (7, 2, 0, 5)
    assert c.reconciles
    again = crawl_run(cfg, lake, FolderSource(archive), run_id="r2").counts
    assert (again.seen, again.out, again.extra["unchanged"]) == (7, 0, 7)
    with open_source(str(archive)).open("p.tar!/m1") as fp:
        assert fp.read() == _dicom(1)  # the first of a name, as the crawl read it


def _encrypted_zip() -> bytes:
    """A zip whose one member has the encryption flag set (its bytes need no real cipher:
    the flag alone must stop the reader)."""
    data = bytearray(_zip({"secret.dcm": _dicom(1)}))
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.index(sig)
        data[pos + at] |= 0x01
    return bytes(data)


def test_bad_packages_are_quarantined_with_reasons(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    gz = gzip.compress(_dicom(1))
    (archive / "truncated.dcm.gz").write_bytes(gz[: len(gz) // 2])
    bad_crc = bytearray(gz)
    bad_crc[-8] ^= 0xFF
    (archive / "crc.dcm.gz").write_bytes(bytes(bad_crc))
    (archive / "corrupt.zip").write_bytes(b"PK\x03\x04" + os.urandom(600))
    (archive / "encrypted.zip").write_bytes(_encrypted_zip())
    tgz = _tar({"m1": _dicom(2), "m2": _dicom(3)}, "w:gz")
    (archive / "cut.tgz").write_bytes(tgz[: len(tgz) * 3 // 4])
    (archive / "lzh.zip").write_bytes(_zip({"m": _dicom(4)}).replace(b"\x08\x00", b"\x0e\x00"))
    lake = LakePaths(tmp_path / "lake")
    c = crawl_run(_cfg(), lake, FolderSource(archive), run_id="r1").counts
    q = _quarantined(lake)
    assert q["truncated.dcm.gz"] == "truncated"
    assert q["crc.dcm.gz"] == "corrupt_archive"
    assert q["corrupt.zip"] == "corrupt_archive"
    assert q["encrypted.zip!/secret.dcm"] == "encrypted"
    assert q["cut.tgz"] in ("truncated", "corrupt_archive")
    assert c.reconciles
    messages = " ".join(read_table(lake, "quarantine").column("message").to_pylist())
    assert "PAT-001" not in messages  # what a message may name: no identifier of the object


def test_depth_and_member_count_are_bounded(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "two.dcm.gz.gz").write_bytes(gzip.compress(gzip.compress(_dicom(1))))
    (archive / "many.tar").write_bytes(_tar({f"m{i}": _dicom(i) for i in range(1, 5)}))
    lake = LakePaths(tmp_path / "lake")
    c = crawl_run(
        _cfg(max_archive_depth=1, max_archive_members=3), lake, FolderSource(archive), run_id="r"
    ).counts
    q = _quarantined(lake)
    assert q == {"two.dcm.gz.gz": "too_large", "many.tar": "too_large"}
    assert sorted(_locations(lake)) == ["many.tar!/m1", "many.tar!/m2", "many.tar!/m3"]
    assert c.reconciles
    # and a zip with more members than the bound is refused from its end record
    (archive / "many.zip").write_bytes(_zip({f"m{i}": b"x" for i in range(5)}))
    lake2 = LakePaths(tmp_path / "lake2")
    crawl_run(_cfg(max_archive_members=3), lake2, FolderSource(archive), run_id="r")
    assert _quarantined(lake2)["many.zip"] == "too_large"


def test_depth_zero_reads_every_file_as_it_is(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "a.dcm.gz").write_bytes(gzip.compress(_dicom(1)))
    lake = LakePaths(tmp_path / "lake")
    cfg = _cfg(max_archive_depth=0)
    source = open_source(str(archive), cfg.source, limits=cfg.limits)
    crawl_run(cfg, lake, source, run_id="r")
    assert _quarantined(lake) == {"a.dcm.gz": "not_dicom"}


def test_a_member_beyond_the_bound_is_refused_by_open_too(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "big.dcm.gz").write_bytes(gzip.compress(bytes(1 << 20)))
    cfg = _cfg(max_decompressed_bytes=1 << 16)
    source = open_source(str(archive), cfg.source, limits=cfg.limits)
    with pytest.raises(InputError) as err:
        source.open("big.dcm.gz")
    assert err.value.reason.value == "too_large"
    assert "limits.max_decompressed_bytes" in str(err.value)


def test_members_of_a_compressed_tar_are_read_back_without_decompressing_it_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the members of a .tar.gz back (deid, tensors) decompressed the tar from its
    start for each member: the square of its size (130 MR slices: 288 ms a member, 37 s for
    the package; the crawl reads it in 1.6 s). Now once per process, then by offset."""
    from pipeline.connectors import packages

    members = {f"s/{i:03d}.dcm": _dicom(i) for i in range(40)}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "p.tgz").write_bytes(_tar(members, "w:gz"))
    (tmp_path / "a" / "dup.tar.xz").write_bytes(_tar({"x.dcm": _dicom(1)}, "w:xz"))
    starts = []
    real = packages._decompressor

    def counting(kind: str, fp: object) -> object:
        starts.append(kind)
        return real(kind, fp)  # type: ignore[arg-type]

    monkeypatch.setattr(packages, "_decompressor", counting)
    packages.clear_tar_cache()
    source = FolderSource(tmp_path / "a", limits=_cfg().limits)
    for name, data in members.items():
        with source.open(f"p.tgz!/{name}") as fp:
            assert fp.read() == data
    assert len(starts) <= 3  # sniffing and the one copy (was: two per member, 80)
    with source.open("dup.tar.xz!/x.dcm") as fp:
        assert fp.read() == _dicom(1)
    with pytest.raises(InputError, match="not there any more"):
        source.open("p.tgz!/s/999.dcm")
    # a changed package is a new key: read afresh
    (tmp_path / "a" / "p.tgz").write_bytes(_tar({"s/000.dcm": _dicom(7)}, "w:gz"))
    with source.open("p.tgz!/s/000.dcm") as fp:
        assert fp.read() == _dicom(7)
    # bounded: past max_package_cache_bytes each member is streamed as before
    small = FolderSource(tmp_path / "a", limits=_cfg(max_package_cache_bytes=1024).limits)
    packages.clear_tar_cache()
    with small.open("p.tgz!/s/000.dcm") as fp:
        assert fp.read() == _dicom(7)
    assert list(packages._TAR_CACHE.values()) == [None]
    packages.clear_tar_cache()
