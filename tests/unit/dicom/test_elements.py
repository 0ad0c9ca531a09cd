"""pipeline.dicom.elements: the one raw element reader/writer, checked against pydicom."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from pipeline.dicom import elements
from pipeline.dicom.elements import (
    LONG_VRS,
    SEQ_END,
    UNDEFINED,
    MalformedElement,
    encode_element,
    encode_header,
    read_header,
    skip_undefined,
)


def _pydicom(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_data_element(fp, DataElement(tag, vr, value))
    return bytes(fp.getvalue())


def test_long_vrs_are_pydicoms() -> None:
    assert {str(vr) for vr in EXPLICIT_VR_LENGTH_32} == LONG_VRS


@pytest.mark.parametrize("implicit", [True, False])
@pytest.mark.parametrize(
    ("tag", "vr", "value"),
    [
        (0x00080018, "UI", b"1.2.3"),
        (0x00100010, "PN", b"DOE^J"),
        (0x00081030, "LO", b"even"),
        (0x00090010, "UN", b"abcd"),
        (0x00291010, "OB", b"\x01\x02\x03"),
        (0x00180050, "DS", b"1.5"),
        (0x00204000, "LT", b""),
        (0x7FE00010, "OW", b"\x00\x01" * 8),
        (0x00081190, "UR", b"http://x/y"),
    ],
)
def test_encode_element_equals_pydicom(tag: int, vr: str, value: bytes, implicit: bool) -> None:
    assert encode_element(tag, vr, value, implicit=implicit) == _pydicom(tag, vr, value, implicit)


def test_short_vr_too_long() -> None:
    assert encode_header(0x00100010, "LO", 0x10000, implicit=False) is None
    assert encode_header(0x00100010, "LO", 0x10000, implicit=True) is not None
    with pytest.raises(ValueError, match="too long"):
        encode_element(0x00100010, "LO", b"x" * 0x10000, implicit=False)


@pytest.mark.parametrize("implicit", [True, False])
def test_read_header_round_trip(implicit: bool) -> None:
    for tag, vr, value in [(0x00100020, "LO", b"AB"), (0x00291010, "OB", b"\x00" * 6)]:
        data = encode_element(tag, vr, value, implicit=implicit)
        got_tag, got_vr, length, at = read_header(data, 0, implicit)
        assert (got_tag, length, data[at:]) == (tag, len(value), value)
        assert got_vr == (None if implicit else vr.encode())


def test_read_header_cut_short() -> None:
    data = encode_element(0x00291010, "OB", b"\x00\x00", implicit=False)
    with pytest.raises(MalformedElement):
        read_header(data[:10], 0, False)
    with pytest.raises(MalformedElement):
        read_header(data[:7], 0, True)


def _item(body: bytes, undefined: bool) -> bytes:
    if undefined:
        return b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    return b"\xfe\xff\x00\xe0" + len(body).to_bytes(4, "little") + body


@pytest.mark.parametrize("implicit", [True, False])
def test_skip_undefined_nested(implicit: bool) -> None:
    inner = encode_element(0x00080100, "SH", b"T-1", implicit=implicit)
    nested_seq = (
        (encode_header(0x00400260, "SQ", UNDEFINED, implicit=implicit) or b"")
        + _item(inner, True)
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    stream = _item(nested_seq, True) + _item(inner, False) + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    after = b"\x08\x00\x18\x00"
    assert skip_undefined(stream + after, 0, implicit) == len(stream)
    tag, *_ = read_header(stream, len(stream) - 8, True)
    assert tag == SEQ_END
    with pytest.raises(MalformedElement):  # no delimiter: runs off the end
        skip_undefined(stream[:-8], 0, implicit)
    with pytest.raises(MalformedElement):  # not an item
        skip_undefined(inner, 0, implicit)


def test_skip_undefined_depth_limit() -> None:
    body = b""
    for _ in range(elements.MAX_DEPTH + 2):
        seq = (encode_header(0x00400260, "SQ", UNDEFINED, implicit=True) or b"") + body
        body = _item(seq + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", True)
    with pytest.raises(MalformedElement):
        skip_undefined(body + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", 0, True)


_USERS = ("pipeline/deid/encode.py", "pipeline/synth/_part10.py", "pipeline/tensors/fastread.py")


@pytest.mark.parametrize("module", _USERS)
def test_no_own_element_codec(module: str) -> None:
    """The three former hand-written codecs hold no list of VRs of their own: they use the
    core (issue #19: one long-VR list, not three)."""
    root = Path(inspect.getfile(elements)).parents[2]
    tree = ast.parse((root / module).read_text())
    own = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value in ("OV", b"OV", "UV", b"UV", "SV", b"SV")
    ]
    assert not own, f"{module} lists long-length VRs itself"
    assert "pipeline.dicom.elements" in (root / module).read_text()
