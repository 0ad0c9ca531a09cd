"""Packed inputs end to end: a real series split across a zip, gzip files and loose files
gives the same tensors as unpacked; a gzip bomb and a zip bomb (10 GiB of zeros) are
quarantined ``too_large`` with the process's peak memory bounded."""

from __future__ import annotations

import gzip
import io
import shutil
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from test_declared_sizes import RSS_BOUND_MB, _in_child

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.lake import LakePaths, read_table
from pipeline.tensors.stage import run as tensors_run

pytestmark = pytest.mark.integration

KEY = b"k" * 32
#: a series the shared corpus took out of a zip (MANIFEST: pm-example-dcm.zip!701-ADCb500/...)
SERIES = Path("dicom/dcmqi/data/paramaps/pm-example-dcm/701-ADCb500")
COLUMNS = ("status", "reason", "shape", "affine", "dtype", "checksum", "sop_instance_uids")
TEN_GIB = 10 << 30


def _tensors(archive: Path, lake: LakePaths) -> tuple[list[dict[str, Any]], Any]:
    cfg = load_config(overrides={"compute": {"partition_size": 4}}, environ={})
    crawl = crawl_run(cfg, lake, FolderSource(archive), run_id="c").counts
    deid_run(cfg, lake, key=KEY, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    rows = [{c: r.get(c) for c in COLUMNS} for r in read_table(lake, "tensors").to_pylist()]
    return sorted(rows, key=lambda r: r["checksum"] or ""), crawl


def test_a_series_split_across_a_zip_gzip_and_loose_files_gives_the_same_tensors(
    shared_data: Path, tmp_path: Path
) -> None:
    files = sorted((shared_data / SERIES).glob("*.dcm"))
    assert len(files) >= 8
    loose = tmp_path / "loose"
    loose.mkdir()
    for f in files:
        shutil.copyfile(f, loose / f.name)
    packed = tmp_path / "packed"
    (packed / "more").mkdir(parents=True)
    third = len(files) // 3
    with zipfile.ZipFile(packed / "pm-example-dcm.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files[:third]:
            zf.write(f, f"701-ADCb500/{f.name}")
    for f in files[third : 2 * third]:
        (packed / "more" / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes(), 1))
    for f in files[2 * third :]:
        shutil.copyfile(f, packed / f.name)

    expected, _ = _tensors(loose, LakePaths(tmp_path / "lake-loose"))
    got, crawl = _tensors(packed, LakePaths(tmp_path / "lake-packed"))
    assert crawl.out == len(files)
    assert [r["status"] for r in expected] == ["ok"]
    assert got == expected
    # a rerun: the package and the files unchanged, nothing read again
    cfg = load_config(environ={})
    again = crawl_run(cfg, LakePaths(tmp_path / "lake-packed"), FolderSource(packed), run_id="c2")
    assert (again.counts.out, again.counts.extra["unchanged"]) == (0, len(files))


def gzip_bomb(path: Path, size: int = TEN_GIB) -> Path:
    """``size`` bytes of zeros as concatenated gzip members of 64 MiB each (about 10 MB on
    disk for 10 GiB): one member compressed once, repeated."""
    block = gzip.compress(bytes(64 << 20), 9)
    with path.open("wb") as fh:
        for _ in range(size // (64 << 20)):
            fh.write(block)
    return path


def zip_bomb(path: Path, declared: int = TEN_GIB) -> Path:
    """A zip (zip64) whose one member declares ``declared`` bytes: its data, 16 MiB of
    deflated zeros, is never reached by a reader that believes the declaration."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = deflater.compress(bytes(16 << 20)) + deflater.flush()
    name = b"bomb.dcm"
    extra = struct.pack("<HHQQ", 1, 16, declared, len(data))
    big = 0xFFFFFFFF
    local = struct.pack(
        "<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 8, 0, 0, 0, big, big, len(name), len(extra)
    )
    central = struct.pack(
        "<4sHHHHHHIIIHHHHHII",
        b"PK\x01\x02",
        45,
        45,
        0,
        8,
        0,
        0,
        0,
        big,
        big,
        len(name),
        len(extra),
        0,
        0,
        0,
        0,
        0,
    )
    head = local + name + extra + data
    cd = central + name + extra
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(cd), len(head), 0)
    path.write_bytes(head + cd + end)
    return path


def test_the_bombs_are_what_they_claim(tmp_path: Path) -> None:
    info = zipfile.ZipFile(io.BytesIO(zip_bomb(tmp_path / "b.zip").read_bytes())).infolist()
    assert [(i.filename, i.file_size) for i in info] == [("bomb.dcm", TEN_GIB)]
    small = gzip_bomb(tmp_path / "b.gz", 128 << 20)
    assert small.stat().st_size < 1 << 20
    total = 0
    with gzip.open(small) as fh:
        while chunk := fh.read(1 << 24):
            total += len(chunk)
    assert total == 128 << 20
    assert gzip_bomb(tmp_path / "big.gz").stat().st_size < 16 << 20


@pytest.mark.slow
def test_gzip_and_zip_bombs_are_quarantined_with_flat_memory(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    gzip_bomb(archive / "bomb.dcm.gz")
    zip_bomb(archive / "bomb.zip")
    result = _in_child(
        f"""
        from pathlib import Path
        from pipeline.config import load_config
        from pipeline.connectors import FolderSource
        from pipeline.crawl import run as crawl_run
        from pipeline.lake import LakePaths, read_table
        cfg = load_config(overrides={{"compute": {{"workers": 1}}}}, environ={{}})
        lake = LakePaths(Path({str(tmp_path / "lake")!r}))
        source = FolderSource(Path({str(archive)!r}))
        crawl = crawl_run(cfg, lake, source, run_id="c").counts
        rows = read_table(lake, "quarantine").to_pylist()
        opened = []
        for loc in ("bomb.dcm.gz", "bomb.zip!/bomb.dcm"):
            try:
                source.open(loc).close()
                opened.append("read")
            except Exception as exc:
                opened.append(f"{{type(exc).__name__}}:{{getattr(exc, 'reason', '')}}")
        result = {{
            "crawl": [crawl.seen, crawl.out, crawl.quarantined],
            "quarantine": sorted((r["location"], r["reason"], r["message"]) for r in rows),
            "opened": opened,
        }}
        """
    )
    assert result["crawl"] == [2, 0, 2]
    (gz, gz_reason, gz_message), (zp, zip_reason, zip_message) = result["quarantine"]  # type: ignore[misc]
    assert (gz, gz_reason) == ("bomb.dcm.gz", "too_large")
    assert "limits.max_decompressed_bytes" in gz_message
    assert (zp, zip_reason) == ("bomb.zip!/bomb.dcm", "too_large")
    assert "declares 10240 MiB" in zip_message
    assert result["opened"] == ["TooLarge:too_large", "TooLarge:too_large"]
    assert result["rss_mb"] < RSS_BOUND_MB, result
