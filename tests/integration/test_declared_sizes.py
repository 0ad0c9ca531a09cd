"""Declared sizes are bounded before anything is allocated or inflated (issue #20).

A 1 MB Deflated Explicit VR Little Endian object declaring 23170 x 23170 16-bit pixels
(1.07 GB of zeros) was indexed, de-identified and read whole: peak RSS 2.3 GB in the crawl
and in deid, 3.4 GB in tensors. Each stage now quarantines it as ``too_large`` with flat
memory; each is measured in its own subprocess (``VmHWM`` of the child).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage

REPO = Path(__file__).resolve().parents[2]
DEFLATED = "1.2.840.10008.1.2.1.99"
#: a generous bound that the 1 GB bomb would break many times over (the interpreter with
#: pyarrow, DuckDB and deltalake loaded is about 200 MB)
RSS_BOUND_MB = 500


def _header(rows: int, cols: int, syntax: str) -> tuple[bytes, bytes]:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.2020.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2020.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2020.3"
    ds.PatientID = "BOMB-1"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return head.getvalue(), body.getvalue()


def deflate_bomb(path: Path, rows: int = 23170, cols: int = 23170) -> Path:
    """A Deflated Explicit VR Little Endian object whose Pixel Data is ``rows x cols`` 16-bit
    zeros: about 1 MB on disk for 1.07 GB inflated. Built in well under a second: after a
    full flush a deflate stream compresses a repeated chunk to the same bytes."""
    meta, body = _header(rows, cols, DEFLATED)
    n = rows * cols * 2
    body += b"\xe0\x7f\x10\x00OW\x00\x00" + n.to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [meta, deflater.compress(body), deflater.flush(zlib.Z_FULL_FLUSH)]
    chunk = bytes(1 << 24)
    block = deflater.compress(chunk) + deflater.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(n, len(chunk))
    parts += [block] * full
    parts += [deflater.compress(bytes(rest)), deflater.flush()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(parts))
    return path


def _in_child(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter (this checkout first on the path); its last line
    printed is JSON, to which the child's peak RSS (MB) is added."""
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json as _json
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so this child
        # of a 1 GB test session reported 1011 MB in CI whatever it did itself
        _hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
        result["rss_mb"] = int(_hwm[0].split()[1]) // 1024
        print(_json.dumps(result, default=str))
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_bomb_inflates_to_a_gigabyte(tmp_path: Path) -> None:
    """The fixture is what it claims (counted in steps, never held)."""
    data = deflate_bomb(tmp_path / "bomb.dcm").read_bytes()
    assert len(data) < 2 << 20
    start = data.index(b"DICM") + 4
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    meta_len = int.from_bytes(data[start + 8 : start + 12], "little") + 12
    total, pending = 0, data[start + meta_len :]
    while pending:
        total += len(inflater.decompress(pending, 1 << 24))
        pending = inflater.unconsumed_tail
    assert total > 23170 * 23170 * 2


@pytest.mark.slow
def test_crawl_deid_tensors_quarantine_the_bomb_with_flat_memory(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    deflate_bomb(archive / "bomb.dcm")
    result = _in_child(
        f"""
        from pathlib import Path
        from pipeline.config import load_config
        from pipeline.connectors import FolderSource
        from pipeline.crawl import run as crawl_run
        from pipeline.deid.stage import run as deid_run
        from pipeline.tensors.stage import run as tensors_run
        from pipeline.lake import LakePaths, read_table
        cfg = load_config(overrides={{"compute": {{"workers": 1}}}}, environ={{}})
        lake = LakePaths(Path({str(tmp_path / "lake")!r}))
        crawl = crawl_run(cfg, lake, FolderSource(Path({str(archive)!r})), run_id="c").counts
        deid = deid_run(cfg, lake, key=b"k" * 32, run_id="d").counts
        tensors = tensors_run(cfg, lake, run_id="t").counts
        rows = read_table(lake, "quarantine").to_pylist()
        result = {{
            "crawl": [crawl.seen, crawl.out, crawl.quarantined],
            "deid": deid.seen, "tensors": tensors.seen,
            "quarantine": [(r["stage"], r["reason"], r["message"]) for r in rows],
        }}
        """
    )
    assert result["crawl"] == [1, 0, 1]
    [(stage, reason, message)] = result["quarantine"]  # type: ignore[misc]
    assert (stage, reason) == ("crawl", "too_large")
    assert "limits.max_frame_bytes" in message
    assert result["rss_mb"] < RSS_BOUND_MB, result


@pytest.mark.slow
def test_deid_reads_the_bomb_within_the_bound_on_its_own(tmp_path: Path) -> None:
    """Without the crawl's verdict (e.g. a limit raised between the stages, or the file
    replaced) deid's reader refuses it by itself, header and export alike."""
    path = deflate_bomb(tmp_path / "bomb.dcm")
    result = _in_child(
        f"""
        from pipeline.deid.stage import read_object
        out = []
        for export in (False, True):
            try:
                with open({str(path)!r}, "rb") as fp:
                    read_object(fp, export)
                out.append("read")
            except Exception as exc:
                out.append(f"{{type(exc).__name__}}:{{getattr(exc, 'reason', '')}}")
        result = {{"outcomes": out}}
        """
    )
    assert result["outcomes"] == ["TooLarge:too_large", "TooLarge:too_large"]
    assert result["rss_mb"] < RSS_BOUND_MB, result


@pytest.mark.slow
def test_tensors_reads_the_bomb_within_the_bound_on_its_own(tmp_path: Path) -> None:
    path = deflate_bomb(tmp_path / "bomb.dcm")
    result = _in_child(
        f"""
        from pathlib import Path
        from pipeline.tensors.fastread import read_image
        try:
            read_image(Path({str(path)!r}).read_bytes())
            outcome = "read"
        except Exception as exc:
            outcome = f"{{type(exc).__name__}}:{{getattr(exc, 'reason', '')}}"
        result = {{"outcome": outcome}}
        """
    )
    assert result["outcome"] == "TooLarge:too_large"
    assert result["rss_mb"] < RSS_BOUND_MB, result


def test_a_deflated_header_is_read_as_pydicom_reads_the_whole_file(tmp_path: Path) -> None:
    """The bounded reader gives the same header as pydicom's whole inflate, for an object
    within the limits (64 x 64)."""
    import pydicom

    from pipeline.dicom.limits import deflated_header

    path = deflate_bomb(tmp_path / "small.dcm", rows=64, cols=64)
    from pipeline.config import LimitsConfig

    with open(path, "rb") as fp:
        found = deflated_header(fp, LimitsConfig())
    assert found is not None
    assert found.pixel_length == 64 * 64 * 2
    ours = pydicom.dcmread(found.stream, stop_before_pixels=True)
    theirs = pydicom.dcmread(path, stop_before_pixels=True)
    assert ours == theirs
    assert ours.file_meta == theirs.file_meta
    assert pydicom.dcmread(path).pixel_array.shape == (64, 64)


@pytest.mark.parametrize(
    ("limits", "reason_in"),
    [
        ({"max_frame_bytes": 1 << 16}, "limits.max_frame_bytes"),
        ({"max_pixel_bytes": 1 << 16}, "limits.max_pixel_bytes"),
        ({"max_header_bytes": 1 << 16}, "limits.max_header_bytes"),
    ],
)
def test_each_bound_is_the_configuration_s(
    tmp_path: Path, limits: dict[str, int], reason_in: str
) -> None:
    """Each key of ``limits`` quarantines at crawl what is beyond it, in plain and deflated
    files alike (a 256 x 256 image of 128 KiB; a header of 100 KB of private data)."""
    from pipeline.config import load_config
    from pipeline.connectors import FolderSource
    from pipeline.crawl import run as crawl_run
    from pipeline.lake import LakePaths, read_table

    archive = tmp_path / "a"
    for syntax, name in ((DEFLATED, "deflated.dcm"), ("1.2.840.10008.1.2.1", "plain.dcm")):
        meta, body = _header(256, 256, syntax)
        extra = DicomBytesIO()
        extra.is_little_endian, extra.is_implicit_VR = True, False
        priv = Dataset()
        priv.add_new(0x00090010, "LO", "BIG")
        priv.add_new(0x00091001, "OB", bytes(100_000))
        write_dataset(extra, priv)
        pixels = b"\xe0\x7f\x10\x00OW\x00\x00" + (256 * 256 * 2).to_bytes(4, "little")
        dataset = body + extra.getvalue() + pixels + bytes(256 * 256 * 2)
        if syntax == DEFLATED:
            deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            dataset = deflater.compress(dataset) + deflater.flush()
        archive.mkdir(exist_ok=True)
        (archive / name).write_bytes(meta + dataset)
    cfg = load_config(overrides={"compute": {"workers": 1}, "limits": limits}, environ={})
    lake = LakePaths(tmp_path / "lake")
    counts = crawl_run(cfg, lake, FolderSource(archive), run_id="c").counts
    assert (counts.seen, counts.quarantined) == (2, 2)
    rows = read_table(lake, "quarantine").to_pylist()
    assert {r["reason"] for r in rows} == {"too_large"}
    assert all(reason_in in r["message"] for r in rows), [r["message"] for r in rows]
    # the defaults take both
    cfg = load_config(overrides={"compute": {"workers": 1}}, environ={})
    counts = crawl_run(cfg, LakePaths(tmp_path / "lake2"), FolderSource(archive), run_id="c").counts
    assert (counts.seen, counts.out) == (2, 2)


def test_a_deflated_image_frame_inflates_no_further_than_its_frame(tmp_path: Path) -> None:
    """Deflated Image Frame Compression: a frame that inflates past Rows x Columns is refused
    after inflating one frame's worth, never whole."""
    import numpy as np

    from pipeline.errors import InputError
    from pipeline.tensors.fastread import read_image

    meta, body = _header(64, 64, "1.2.840.10008.1.2.8.1")
    frame = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = frame.compress(bytes(1 << 24)) + frame.flush(zlib.Z_FULL_FLUSH)
    stream = block * 32 + frame.flush()  # 512 MiB for an 8 KiB frame
    item = b"\xfe\xff\x00\xe0" + len(stream).to_bytes(4, "little") + stream
    if len(item) % 2:
        item += b"\x00"
    pixels = (
        b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
        + item
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    data = meta + body + pixels
    with pytest.raises(InputError):
        read_image(data)
    # a good frame decodes
    good = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    raw = np.arange(64 * 64, dtype="<u2").tobytes()
    stream = good.compress(raw) + good.flush()
    item = b"\xfe\xff\x00\xe0" + len(stream).to_bytes(4, "little") + stream
    if len(item) % 2:
        item = b"\xfe\xff\x00\xe0" + (len(stream) + 1).to_bytes(4, "little") + stream + b"\x00"
    pixels = (
        b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
        + item
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    _ds, frames = read_image(meta + body + pixels)
    assert frames.shape == (1, 64, 64)
    assert int(frames[0, 1, 0]) == 64
