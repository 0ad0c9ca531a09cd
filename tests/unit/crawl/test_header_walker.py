"""The crawl's byte-level header walker (pipeline.dicom.header) against pydicom.

``read_header(fast=True)`` (the walker, falling back to pydicom on anything unusual) must give
exactly what ``read_header(fast=False)`` (pydicom only) gives -- the same record, or the same
error class, quarantine reason and message -- on every file of ``../shared/data/dicom``, on a
synthetic archive with its deliberately broken objects, and on hostile variations made here.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicom_factory import make_ct
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from pipeline.crawl import core
from pipeline.dicom.header import scan_header


def _outcome(data: bytes, *, fast: bool) -> Any:
    try:
        return core.read_header(io.BytesIO(data), len(data), fast=fast)
    except Exception as exc:  # the class, reason and message must match too
        return (type(exc).__name__, getattr(exc, "reason", None), str(exc))


def _same(data: bytes) -> bool:
    """Whether both readers agree on ``data``; also returns whether the walker took it."""
    fast, slow = _outcome(data, fast=True), _outcome(data, fast=False)
    assert fast == slow
    return (
        scan_header(io.BytesIO(data), len(data), core._KEEP, keep_meta=core._KEEP_META) is not None
    )


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_equal_to_pydicom_on_every_shared_file(shared_data: Path) -> None:
    root = shared_data / "dicom"
    if not root.is_dir():
        pytest.skip(f"{root} not found: the real-corpus check of the header walker is skipped")
    files = _files(root)
    taken = dicm = 0
    for path in files:
        data = path.read_bytes()
        dicm += data[128:132] == b"DICM"
        try:
            taken += _same(data)
        except AssertionError:
            pytest.fail(f"walker and pydicom differ on {path.relative_to(root)}")
    assert len(files) > 700
    assert taken >= 0.9 * dicm - 40, f"the walker took only {taken} of {dicm} Part 10 files"


def test_values_and_header_end_equal_pydicom(shared_data: Path) -> None:
    """Every kept value and the end of the header, element by element, where the walker reads."""
    root = shared_data / "dicom"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    keywords = {tag: pydicom.datadict.keyword_for_tag(tag) for tag in core._KEEP}
    warnings.simplefilter("ignore")  # pydicom's, on values it converts (restored by pytest)
    for path in _files(root):
        data = path.read_bytes()
        scan = scan_header(io.BytesIO(data), len(data), core._KEEP, keep_meta=core._KEEP_META)
        if scan is None:
            continue
        fp = io.BytesIO(data)
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        where = path.relative_to(root)
        assert scan.header_end == fp.tell(), where
        assert scan.implicit == ds.original_encoding[0], where
        assert scan.transfer_syntax == ds.file_meta.TransferSyntaxUID, where
        for tag, keyword in keywords.items():
            want = ds.get(keyword)
            got = scan.values.get(tag)
            if want is None or want == "":
                assert got in (None, ""), (where, keyword)
            elif core._KEEP[tag] in ("IS", "US"):  # InstanceNumber and the pixel sizes
                assert got == int(want), (where, keyword)
            else:
                assert got == str(want).strip(), (where, keyword)


def test_equal_to_pydicom_on_a_synthetic_archive_with_its_bad_objects(tmp_path: Path) -> None:
    from pipeline.synth import synthesize

    synthesize(tmp_path, patients=2, seed=3, small=True, include_bad=True)
    files = _files(tmp_path)
    taken = sum(_same(p.read_bytes()) for p in files)
    assert taken >= len(files) // 2


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ct(syntax: str = "1.2.840.10008.1.2.1") -> Dataset:
    ds = make_ct(syntax=syntax)
    ds.InstanceNumber = 7
    return ds


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_plain_objects_take_the_fast_path(syntax: str) -> None:
    assert _same(_encode(_ct(syntax)))


def _variants() -> list[tuple[str, Dataset]]:
    out: list[tuple[str, Dataset]] = []
    for value in (b"", b" 12 ", b"1.0", b"abc", b"+3", b"12\\13", b"99999999999", b"7\x00"):
        ds = _ct()
        tag = BaseTag(0x00200013)
        ds._dict[tag] = RawDataElement(tag, None, len(value), value, 0, True, True)
        out.append((f"InstanceNumber {value!r}", ds))
    ds = _ct()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID = "MÜLLER"
    out.append(("latin-1 PatientID", ds))
    ds = _ct()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    out.append(("ISO 2022 character set", ds))
    ds = _ct()
    ds.PatientID = "  PAD  "
    out.append(("padded PatientID", ds))
    ds = _ct()
    ds.Modality = ["CT", "PT"]
    out.append(("two modalities", ds))
    ds = _ct()
    del ds.SeriesInstanceUID
    out.append(("no series UID", ds))
    ds = _ct()
    ds.SOPClassUID = "1.2.840.10008.1.3.10"
    out.append(("DICOMDIR class", ds))
    ds = _ct()
    item = Dataset()
    item.add_new(0x00090010, "LO", "ACME")
    item.add_new(0x00091001, "LO", "private")
    ds.add_new(0x00091002, "SQ", Sequence([item, item]))
    ds[0x00091002].is_undefined_length = True
    ds.add_new(0x00090010, "LO", "ACME")
    out.append(("private undefined-length sequence", ds))
    ds = _ct()
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    ds.ReferencedImageSequence.is_undefined_length = True
    out.append(("undefined-length sequence", ds))
    return out


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(("name", "ds"), _variants(), ids=[n for n, _ in _variants()])
def test_hostile_values(name: str, ds: Dataset, implicit: bool) -> None:
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    _same(_encode(ds))


def _splice(data: bytes, tag: int, new: bytes) -> bytes:
    """``data`` with ``new`` inserted just before the element ``tag`` (explicit VR)."""
    at = data.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF), 132)
    return data[:at] + new + data[at:]


def _command(data: bytes) -> bytes:
    """``data`` with a command element (0000,0002), implicit VR, before its dataset."""
    (meta_length,) = struct.unpack("<I", data[140:144])
    at = 144 + meta_length
    return data[:at] + b"\x00\x00\x02\x00\x06\x00\x00\x001.2.3\x00" + data[at:]


def test_hostile_bytes() -> None:
    base = _encode(_ct())
    uid = b"1.2.3.4\x00"
    cases = {
        "repeated SOP UID": _splice(
            base, 0x00080018, b"\x08\x00\x18\x00UI" + struct.pack("<H", 8) + uid
        ),
        "UID written as LO": base.replace(b"\x08\x00\x18\x00UI", b"\x08\x00\x18\x00LO", 1),
        "unknown VR": base.replace(b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00QQ", 1),
        "lower-case VR": base.replace(b"\x08\x00\x60\x00CS", b"\x08\x00\x60\x00cs", 1),
        "odd UID length": _splice(base, 0x00080018, b"\x08\x00\x17\x00UI\x05\x001.2.3"),
        "NUL inside PatientID": base.replace(b"PAT-001", b"PAT\x00001", 1),
        "tab in PatientID": base.replace(b"PAT-001", b"PAT\t001", 1),
        "command group": _command(base),
        "big endian meta": base.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.2\x00", 1),
        "deflated": base.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.1.99", 1),
        "private syntax": base.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9\x00", 1),
        "no DICM": base[:128] + b"DICX" + base[132:],
        "implicit labelled explicit": _encode(_ct(ImplicitVRLittleEndian)).replace(
            b"1.2.840.10008.1.2\x00", b"1.2.840.10008.1.2.1", 1
        ),
        "RLE syntax": base.replace(b"1.2.840.10008.1.2.1\x00", RLELossless.encode() + b"\x00", 1),
    }
    for name, data in cases.items():
        try:
            _same(data)
        except AssertionError:
            pytest.fail(f"walker and pydicom differ on: {name}")


@pytest.mark.parametrize("implicit", [False, True])
def test_every_truncation(implicit: bool) -> None:
    ds = _ct(ImplicitVRLittleEndian if implicit else "1.2.840.10008.1.2.1")
    data = _encode(ds)
    for cut in range(0, len(data) + 1):
        try:
            _same(data[:cut])
        except AssertionError:
            pytest.fail(f"walker and pydicom differ when cut at {cut} of {len(data)} bytes")


def test_random_byte_damage() -> None:
    """Single bytes of the header overwritten at random: never a different answer."""
    rng = random.Random(19)
    for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"):
        ds = _ct(syntax)
        ds.ReferencedImageSequence = Sequence([Dataset()])
        ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3"
        ds.ReferencedImageSequence.is_undefined_length = True
        data = bytearray(_encode(ds))
        end = data.index(b"\xe0\x7f\x10\x00")
        for _ in range(400):
            damaged = bytearray(data)
            at = rng.randrange(128, end + 12)
            damaged[at] = rng.randrange(256)
            try:
                _same(bytes(damaged))
            except AssertionError:
                pytest.fail(f"walker and pydicom differ with byte {at} set to {damaged[at]}")
