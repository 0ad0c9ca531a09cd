"""The one raw DICOM element reader/writer: tag, VR, length, value, little endian.

Every place in pacsflow that reads or writes data elements as bytes instead of through
pydicom's ``Dataset`` (the Part 10 encoder of the de-identification export, the synthetic
archive's per-instance writer, the tensors stage's fast image reader, the header walker of the
crawl) goes through these few functions, so the encoding rules live once:

- an element is ``tag group (2) | tag element (2) | [VR (2)] | length | value`` in little
  endian; implicit VR has no VR and a 4-byte length; explicit VR has a 2-byte length except for
  the VRs of :data:`LONG_VRS`, which have two reserved zero bytes and a 4-byte length
  (PS3.5 Table 7.1-1 and 7.1-2);
- item tags (group ``FFFE``) have no VR in either encoding (PS3.5 7.5);
- a length of ``FFFFFFFF`` is undefined: the value runs to a Sequence Delimitation Item
  (sequences, encapsulated Pixel Data) or an Item Delimitation Item (items); an explicit ``UN``
  of undefined length holds implicit VR little endian (PS3.5 6.2.2).

Big-endian and deflated syntaxes are not handled here: callers leave them to pydicom.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "ITEM",
    "ITEM_END",
    "KNOWN_VRS",
    "LONG_VRS",
    "PIXEL_DATA",
    "SEQUENCE_DELIMITER",
    "SEQ_END",
    "UNDEFINED",
    "MalformedElement",
    "encode_element",
    "encode_header",
    "read_header",
    "skip_undefined",
]

#: VRs with two reserved bytes and a 4-byte length in explicit VR (PS3.5 Table 7.1-1)
LONG_VRS: Final = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
_LONG_VRS_BYTES: Final = frozenset(vr.encode("ascii") for vr in LONG_VRS)
#: every VR of PS3.5 Table 6.2-1
KNOWN_VRS: Final = frozenset(
    {
        *LONG_VRS,
        *("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN"),
        *("SH", "SL", "SS", "ST", "TM", "UI", "UL", "US"),
    }
)
_KNOWN_VRS_BYTES: Final = frozenset(vr.encode("ascii") for vr in KNOWN_VRS)
#: Item, Item Delimitation Item and Sequence Delimitation Item tags
ITEM: Final = 0xFFFEE000
ITEM_END: Final = 0xFFFEE00D
SEQ_END: Final = 0xFFFEE0DD
#: the undefined length
UNDEFINED: Final = 0xFFFFFFFF
PIXEL_DATA: Final = 0x7FE00010
#: a whole Sequence Delimitation Item, as it ends undefined-length values
SEQUENCE_DELIMITER: Final = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
#: deepest nesting of undefined-length sequences followed before giving up
MAX_DEPTH: Final = 32

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_tag = struct.Struct("<HH").unpack_from
_pack_tag = struct.Struct("<HH").pack
_pack_u16 = struct.Struct("<H").pack
_pack_u32 = struct.Struct("<I").pack


class MalformedElement(Exception):
    """The bytes do not parse as little-endian elements (cut short, bad item tag, too deep).

    Internal to the fast paths: each caller turns it into its own fallback (pydicom) or error.
    """


def read_header(
    buf: bytes | bytearray | memoryview, pos: int, implicit: bool
) -> tuple[int, bytes | None, int, int]:
    """Parse one element header at ``pos`` of ``buf``.

    Parameters
    ----------
    buf:
        The encoded dataset (or a part of it).
    pos:
        Offset of the element's tag.
    implicit:
        Implicit VR (no VR field) or explicit; item tags (group ``FFFE``) never have a VR.

    Returns
    -------
    tuple
        ``(tag, VR as two bytes or None, value length, offset of the value)``; the length may
        be :data:`UNDEFINED`.

    Raises
    ------
    MalformedElement
        If ``buf`` ends inside the header.
    """
    if pos + 8 > len(buf):
        raise MalformedElement
    group, elem = _tag(buf, pos)
    tag = (group << 16) | elem
    if implicit or group == 0xFFFE:
        return tag, None, _u32(buf, pos + 4)[0], pos + 8
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _LONG_VRS_BYTES:
        if pos + 12 > len(buf):
            raise MalformedElement
        return tag, vr, _u32(buf, pos + 8)[0], pos + 12
    return tag, vr, _u16(buf, pos + 6)[0], pos + 8


def skip_undefined(
    buf: bytes | bytearray | memoryview,
    pos: int,
    implicit: bool,
    depth: int = 1,
    *,
    strict: bool = False,
) -> int:
    """Step over the items of an undefined-length sequence whose first item starts at ``pos``.

    With ``strict``, an explicit VR inside an item that is not one of :data:`KNOWN_VRS` (an
    item switched to implicit VR, a damaged header) is malformed too.

    Returns
    -------
    int
        The offset just after its Sequence Delimitation Item.

    Raises
    ------
    MalformedElement
        On anything but items and the delimiter, a value running past ``buf``, or nesting
        deeper than :data:`MAX_DEPTH`.
    """
    if depth > MAX_DEPTH:
        raise MalformedElement
    while True:
        tag, _vr, length, pos = read_header(buf, pos, True)
        if tag == SEQ_END:
            return pos
        if tag != ITEM:
            raise MalformedElement
        if length != UNDEFINED:
            pos += length
            if pos > len(buf):
                raise MalformedElement
            continue
        while True:  # an undefined-length item: its elements to the Item Delimitation Item
            tag, vr, length, pos = read_header(buf, pos, implicit)
            if tag == ITEM_END:
                break
            if strict and vr is not None and vr not in _KNOWN_VRS_BYTES:
                raise MalformedElement
            if length == UNDEFINED:
                if strict and vr not in (None, b"SQ", b"UN"):
                    raise MalformedElement  # pydicom reads it to the delimiter's bytes
                pos = skip_undefined(buf, pos, implicit or vr == b"UN", depth + 1, strict=strict)
            else:
                pos += length
            if pos > len(buf):
                raise MalformedElement


def encode_header(tag: int, vr: str, length: int, *, implicit: bool) -> bytes | None:
    """The header of one element: tag, (VR,) length.

    ``length`` may be :data:`UNDEFINED` (then only for implicit VR or a VR of
    :data:`LONG_VRS`). Returns None when an explicit VR with a 2-byte length cannot hold
    ``length`` (pydicom then writes the element as ``UN``; callers decide).
    """
    head = _pack_tag(tag >> 16, tag & 0xFFFF)
    if implicit or tag >> 16 == 0xFFFE:
        return head + _pack_u32(length)
    if vr in LONG_VRS:
        return head + vr.encode("ascii") + b"\x00\x00" + _pack_u32(length)
    if length > 0xFFFF:
        return None
    return head + vr.encode("ascii") + _pack_u16(length)


def encode_element(tag: int, vr: str, value: bytes, *, implicit: bool) -> bytes:
    """Encode one little-endian data element of defined length, as pydicom writes it.

    Parameters
    ----------
    tag:
        The element tag as an int, e.g. ``0x00200013``.
    vr:
        Its value representation.
    value:
        The encoded value; padded here to even length (``\\0`` for UI, OB and UN, a space
        for the other, text, VRs).
    implicit:
        Implicit VR (no VR field, 4-byte length) or explicit.

    Returns
    -------
    bytes
        Tag, (VR,) length and value.

    Raises
    ------
    ValueError
        If the value is too long for a 2-byte explicit length.
    """
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    head = encode_header(tag, vr, len(value), implicit=implicit)
    if head is None:
        raise ValueError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr} value too long")
    return head + value
