"""A byte-level header walker: the few attributes a stage keeps, without pydicom's parse.

``pydicom.dcmread(fp, stop_before_pixels=True)`` builds a raw element for every element of
the header (a few hundred on a real CT) and then decodes the ones asked for; for a crawl that
keeps seven of them, that per-element machinery is most of the time. :func:`scan_header` walks
the element stream of a Part 10 file with :mod:`pipeline.dicom.elements`, decides each element
by its tag (and, in explicit VR, its VR) from the header bytes alone, skips the value of every
element it does not keep, decodes only the kept ones, and stops where ``dcmread`` stops
(before the Pixel Data element) -- so its offset of the end of the header is ``fp.tell()``
after the same ``dcmread``.

It is a fast path, never a second parser of record: anything unusual returns ``None`` and the
caller reads the object with pydicom as before (so errors, warnings and quarantine reasons
stay pydicom's): no ``DICM`` prefix, a file meta that is not explicit VR little endian, a
transfer syntax that is big endian, deflated, private or unknown, a dataset whose first
element contradicts the declared VR encoding, command elements (group 0000), an unknown or
non-uppercase explicit VR, an undefined length anywhere but on a sequence, a value running past
the end of the file, a kept element that is repeated, of another VR than the dictionary's,
multi-valued, not plain printable ASCII (or, for text, under a character set that is not
ASCII-compatible), or an integer string that is not plainly an integer. A test checks it equal
to pydicom on every file of ``../shared/data/dicom`` and on the synthetic archives.

:func:`read_part10_header` is the same walk for a reader that needs the whole header as a
``pydicom.FileDataset`` (the de-identification export): it builds exactly the dataset
``dcmread(fp, stop_before_pixels=True, force=True)`` builds -- raw elements, value offsets,
file meta, encodings -- without pydicom's per-element file reads, and declines (None) on the
same kinds of oddities. Used by ``pipeline.crawl.core`` (``scan_header``) and
``pipeline.deid.stage.read_object`` (``read_part10_header``).
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from pipeline.dicom.elements import (
    KNOWN_VRS,
    LONG_VRS,
    UNDEFINED,
    MalformedElement,
    read_header,
    skip_undefined,
)
from pipeline.errors import TooLarge

__all__ = ["HeaderScan", "read_part10_header", "scan_header"]

_KNOWN_VR_BYTES: Final = frozenset(vr.encode("ascii") for vr in KNOWN_VRS)
#: the VRs a kept element may have, and how its value is decoded
_TEXT_VRS: Final = frozenset({"AE", "CS", "LO", "SH", "UI"})
_DECODED_VRS: Final = _TEXT_VRS | {"IS", "US"}
#: where dcmread(stop_before_pixels=True) stops (pydicom's _at_pixel_data)
_PIXEL_TAGS: Final = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_SPECIFIC_CHARACTER_SET: Final = 0x00080005
_TRANSFER_SYNTAX: Final = 0x00020010
#: character sets in which printable ASCII bytes decode as ASCII (single-byte or UTF-8);
#: ISO 2022 escapes, Shift-JIS (ISO_IR 13) and GB18030/GBK fall back to pydicom
_ASCII_CHARSETS: Final = frozenset(
    {"", "ISO_IR 6", "ISO_IR 192"}
    | {f"ISO_IR {n}" for n in (100, 101, 109, 110, 126, 127, 138, 144, 148, 166, 203)}
)
_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
_PRINTABLE: Final = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but the backslash
_INTEGER: Final = re.compile(r"[+-]?[0-9]{1,9}")
_UID: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_FIRST_READ: Final = 1 << 16
_IMPLICIT_HEAD: Final = struct.Struct("<HHL")
_EXPLICIT_HEAD: Final = struct.Struct("<HH2sH")
_U32: Final = struct.Struct("<L")
_VR_NAMES: Final = {vr.encode("ascii"): vr for vr in KNOWN_VRS}
_LONG_VR_BYTES: Final = frozenset(vr.encode("ascii") for vr in LONG_VRS)


class _Unusual(Exception):
    """Leave this object to pydicom."""


@dataclass(frozen=True)
class HeaderScan:
    """What :func:`scan_header` found in one Part 10 object."""

    #: the dataset's VR encoding (always little endian)
    implicit: bool
    #: Transfer Syntax UID of the file meta
    transfer_syntax: str
    #: kept file meta elements (group 0002) by tag, decoded as their VR
    meta: dict[int, str | int | None]
    #: kept dataset elements by tag, decoded: text without padding (UI: trailing NUL and
    #: space removed, as pydicom; others also leading spaces), IS as int (None when empty)
    values: dict[int, str | int | None]
    #: offset of the Pixel Data (or Float/Double Float Pixel Data) element, or the file size
    header_end: int
    #: the bytes read from the start of the file (at least ``min(header_end, 65536)``)
    head: bytes


def _decode(vr: str, raw: bytes) -> str | int | None:
    if vr == "US":
        if len(raw) != 2:
            raise _Unusual  # empty or multi-valued: pydicom's reading
        return int.from_bytes(raw, "little")
    stripped = raw.rstrip(b"\x00 ")
    if not _PRINTABLE.fullmatch(stripped) or b"\x00" in stripped:
        raise _Unusual
    text = stripped.decode("ascii")
    if vr == "UI":
        if " " in text:
            raise _Unusual
        return text
    if vr == "IS":
        text = text.strip()
        if not text:
            return None
        if not _INTEGER.fullmatch(text):
            raise _Unusual
        return int(text)
    return text.strip()


class _Walker:
    """One walk over ``buf`` (the head of a file of ``size`` bytes)."""

    def __init__(self, buf: bytes, size: int) -> None:
        self.buf = buf
        self.size = size

    def element(self, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
        """(tag, VR, length, value offset); :class:`_Unusual` for an unknown VR; ``EOFError``
        when the header runs past the bytes read."""
        try:
            tag, vr, length, at = read_header(self.buf, pos, implicit)
        except MalformedElement:
            raise EOFError from None
        if vr is None:
            return tag, None, length, at
        if vr not in _KNOWN_VR_BYTES:
            raise _Unusual
        return tag, vr.decode("ascii"), length, at


def _walk(
    buf: bytes, size: int, keep: Mapping[int, str], keep_meta: Mapping[int, str]
) -> HeaderScan:
    """Raises :class:`_Unusual` (leave it to pydicom) or ``EOFError`` (read more)."""
    from pydicom.datadict import DicomDictionary
    from pydicom.uid import UID

    walker = _Walker(buf, size)
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _Unusual
    pos = 132
    meta: dict[int, str | int | None] = {}
    syntax: str | None = None
    while True:
        if pos + 8 > len(buf):
            if len(buf) >= size:
                raise _Unusual  # the file ends in (or right after) its meta
            raise EOFError
        if buf[pos : pos + 2] != b"\x02\x00":
            break
        tag, vr, length, at = walker.element(pos, False)
        if vr is None or length == UNDEFINED:
            raise _Unusual
        if at + length > len(buf):
            if at + length > size:
                raise _Unusual
            raise EOFError
        if tag == _TRANSFER_SYNTAX:
            syntax = str(_decode("UI", buf[at : at + length]))
        elif tag in keep_meta:
            if vr != keep_meta[tag] or tag in meta:
                raise _Unusual
            meta[tag] = _decode(vr, buf[at : at + length])
        pos = at + length
    if not syntax:
        raise _Unusual
    if syntax in (_IMPLICIT_LE, _EXPLICIT_LE):
        implicit = syntax == _IMPLICIT_LE
    else:
        if not _UID.fullmatch(syntax):
            raise _Unusual  # pydicom would warn (quoting it) and guess
        uid = UID(syntax)
        if not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian:
            raise _Unusual  # unknown/private, deflated, big endian
        if uid.is_implicit_VR:
            raise _Unusual
        implicit = False
    if pos + 6 > len(buf):
        raise _Unusual if len(buf) >= size else EOFError
    if buf[pos : pos + 2] == b"\x00\x00":
        raise _Unusual  # a command set
    vr0 = buf[pos + 4 : pos + 6]
    if (not (0x40 < vr0[0] < 0x5B and 0x40 < vr0[1] < 0x5B)) != implicit:
        raise _Unusual  # pydicom would switch encodings (and warn)
    values: dict[int, str | int | None] = {}
    while True:
        if pos >= len(buf):
            if len(buf) >= size:
                break  # no pixel data: dcmread reads to the end
            raise EOFError
        if pos + 8 > len(buf):
            raise _Unusual if len(buf) >= size else EOFError  # a stub at the end
        tag, vr, length, at = walker.element(pos, implicit)
        if tag in _PIXEL_TAGS:
            break
        if tag >> 16 == 0xFFFE:
            raise _Unusual  # an item or delimiter at the top level
        if length == UNDEFINED:
            if implicit:
                entry = DicomDictionary.get(tag)
                sequence = entry[0] == "SQ" if entry else tag >> 16 & 1 == 1
                if not sequence or buf[at : at + 4] != b"\xfe\xff\x00\xe0":
                    raise _Unusual  # pydicom would search for the delimiter bytes
            elif vr not in ("SQ", "UN"):
                raise _Unusual
            if tag in keep:
                raise _Unusual
            try:
                pos = skip_undefined(buf, at, implicit or vr == "UN", strict=True)
            except MalformedElement:
                raise _Unusual if len(buf) >= size else EOFError from None
            continue
        end = at + length
        if end > len(buf):
            if end > size:
                raise _Unusual  # cut short: pydicom says how
            if tag in keep or tag == _SPECIFIC_CHARACTER_SET:
                raise EOFError
        if tag == _SPECIFIC_CHARACTER_SET:
            charset = buf[at:end].rstrip(b"\x00 ").decode("ascii", "replace").strip()
            if charset not in _ASCII_CHARSETS:
                raise _Unusual
        elif tag in keep:
            want = keep[tag]
            if (vr is not None and vr != want) or tag in values:
                raise _Unusual
            values[tag] = _decode(want, buf[at:end])
        pos = end
    return HeaderScan(
        implicit=implicit,
        transfer_syntax=syntax,
        meta=meta,
        values=values,
        header_end=pos,
        head=buf,
    )


def scan_header(
    fp: BinaryIO,
    size: int,
    keep: Mapping[int, str],
    *,
    keep_meta: Mapping[int, str] | None = None,
    max_bytes: int | None = None,
) -> HeaderScan | None:
    """Walk the header of the Part 10 object in ``fp`` and decode the elements of ``keep``.

    Parameters
    ----------
    fp:
        The object, opened for binary reading at its start; left at an unspecified position.
    size:
        Its size in bytes.
    keep:
        ``{tag: VR}`` of the top-level dataset elements to decode; VR one of AE, CS, LO, SH,
        UI (text), IS or US (integer). Elements inside sequences are never kept.
    keep_meta:
        The same for file meta elements (group 0002); the Transfer Syntax UID is always read.
    max_bytes:
        The most bytes of the file read to find the end of the header (None: no bound).

    Returns
    -------
    HeaderScan or None
        None when the object is anything but a plain little-endian Part 10 file whose kept
        elements are plain ASCII (see the module docstring): read it with pydicom then.

    Raises
    ------
    ValueError
        If ``keep`` asks for a VR the walker does not decode.
    TooLarge
        The header runs past ``max_bytes``.
    """
    for vr in (*keep.values(), *(keep_meta or {}).values()):
        if vr not in _DECODED_VRS:
            raise ValueError(f"the header walker does not decode {vr}")
    want = min(size, _FIRST_READ)
    buf = fp.read(want)
    while True:
        try:
            return _walk(buf, size, keep, keep_meta or {})
        except _Unusual:
            return None
        except (MalformedElement, struct.error, IndexError, UnicodeDecodeError):
            return None  # not expected (the walk checks bounds): pydicom says what it is
        except EOFError:
            if len(buf) >= size:
                return None
            if max_bytes is not None and len(buf) >= max_bytes:
                raise TooLarge(
                    f"its header runs past limits.max_header_bytes ({max_bytes} bytes) "
                    "before the pixel data"
                ) from None
            # a long header: read as much again (or the rest) and walk again
            grow = min(size - len(buf), len(buf))
            if max_bytes is not None:
                grow = max(1, min(grow, max_bytes - len(buf)))
            more = fp.read(grow)
            if not more:
                return None
            buf += more


class _NeedMore(Exception):
    """The header runs past the bytes read so far."""


def _part10(fp: BinaryIO, buf: bytes, size: int) -> tuple[Any, int]:
    """``(FileDataset, header end)`` as ``dcmread(fp, stop_before_pixels=True, force=True)``
    builds it from ``buf`` (the head of a file of ``size`` bytes); :class:`_Unusual` or
    :class:`_NeedMore` otherwise."""
    from pydicom import config
    from pydicom.charset import convert_encodings, default_encoding
    from pydicom.datadict import _dictionary_vr_fast
    from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filereader import read_sequence
    from pydicom.tag import BaseTag
    from pydicom.uid import PrivateTransferSyntaxes
    from pydicom.values import convert_string

    complete = len(buf) >= size

    def short() -> Exception:
        return _Unusual() if complete else _NeedMore()

    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise _Unusual
    walker = _Walker(buf, size)
    pos = 132
    meta_elements: dict[BaseTag, Any] = {}
    while True:
        if pos + 8 > len(buf):
            raise short()
        if buf[pos : pos + 2] != b"\x02\x00":
            break
        try:
            tag, vr, length, at = walker.element(pos, False)
        except EOFError:
            raise short() from None
        if vr is None or length == UNDEFINED:
            raise _Unusual
        if at + length > len(buf):
            raise short()
        btag = BaseTag(tag)
        value: Any = buf[at : at + length] if length else empty_value_for_VR(vr, raw=True)
        meta_elements[btag] = RawDataElement(btag, vr, length, value, at, False, True)
        pos = at + length
    syntax_elem = meta_elements.get(BaseTag(_TRANSFER_SYNTAX))
    if syntax_elem is None or not isinstance(syntax_elem.value, bytes):
        raise _Unusual
    syntax = _decode("UI", syntax_elem.value)
    if not isinstance(syntax, str) or not _UID.fullmatch(syntax):
        raise _Unusual
    if syntax == _IMPLICIT_LE:
        implicit = True
    elif syntax == _EXPLICIT_LE:
        implicit = False
    elif syntax in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):
        raise _Unusual  # big endian, deflated
    elif syntax in PrivateTransferSyntaxes:
        raise _Unusual
    else:
        implicit = False  # pydicom: every other syntax is explicit VR little endian
    if pos + 6 > len(buf):
        raise short()
    if buf[pos : pos + 2] == b"\x00\x00":
        raise _Unusual  # a command set
    vr0 = buf[pos + 4 : pos + 6]
    if (not (0x40 < vr0[0] < 0x5B and 0x40 < vr0[1] < 0x5B)) != implicit:
        raise _Unusual
    if not config.settings.infer_sq_for_un_vr:
        raise _Unusual
    encoding: Any = default_encoding
    elements: dict[BaseTag, Any] = {}
    stream: io.BytesIO | None = None
    # the hot loop (a few hundred elements a file): element headers unpacked inline, raw
    # elements made as the named tuples they are, without their constructor's overhead
    n = len(buf)
    unpack_implicit, unpack_explicit = _IMPLICIT_HEAD.unpack_from, _EXPLICIT_HEAD.unpack_from
    u32 = _U32.unpack_from
    vr_names, long_vrs = _VR_NAMES, _LONG_VR_BYTES
    new_raw = tuple.__new__
    while True:
        if pos + 8 > n:
            if pos >= n and complete:
                break
            raise short()
        if implicit:
            group, elem, length = unpack_implicit(buf, pos)
            vr = None
            at = pos + 8
        else:
            group, elem, raw_vr, length = unpack_explicit(buf, pos)
            vr = vr_names.get(raw_vr)
            if group == 0xFFFE or vr is None:
                raise _Unusual  # an item at the top level, an unknown VR
            if raw_vr in long_vrs:
                if pos + 12 > n:
                    raise short()
                length = u32(buf, pos + 8)[0]
                at = pos + 12
            else:
                at = pos + 8
        tag = group << 16 | elem
        if tag in _PIXEL_TAGS:
            break
        if group == 0xFFFE:
            raise _Unusual
        btag = BaseTag(tag)
        if length != UNDEFINED:
            end = at + length
            if end > n:
                raise short()
            value = buf[at:end] if length else empty_value_for_VR(vr, raw=True)
            elements[btag] = new_raw(RawDataElement, (btag, vr, length, value, at, implicit, True))
            if tag == _SPECIFIC_CHARACTER_SET:
                encoding = convert_encodings(convert_string(value or b"", True))
            pos = end
            continue
        if vr == "UN" or vr == "SQ":
            vr = "SQ"
        elif vr is None:
            try:
                vr = _dictionary_vr_fast(tag)
            except KeyError:
                vr = "SQ" if buf[at : at + 4] == b"\xfe\xff\x00\xe0" else None
            if vr != "SQ":
                raise _Unusual  # pydicom reads it to the delimiter's bytes
        else:
            raise _Unusual
        if stream is None:
            stream = io.BytesIO(buf)
        stream.seek(at)
        try:
            seq = read_sequence(stream, implicit, True, UNDEFINED, encoding)
        except Exception:
            raise short() from None
        pos = stream.tell()
        if pos >= len(buf) and not complete:
            raise _NeedMore  # it may have read short at the end of what was read
        elements[btag] = DataElement(btag, vr, seq, at, is_undefined_length=True)
    # the FileDataset over the elements as they are (pydicom's read goes through a Dataset
    # first, whose only lasting part is this same dict: one Dataset less a file)
    file_meta = FileMetaDataset(meta_elements)
    file_meta.set_original_encoding(
        is_implicit_vr=False, is_little_endian=True, character_encoding=default_encoding
    )
    if file_meta._dict:
        file_meta[next(iter(file_meta.elements())).tag]  # converted, as pydicom's check does
    file_meta.get("TransferSyntaxUID")  # converted, as read_partial does
    ds = FileDataset(fp, elements, buf[:128], file_meta, implicit, True)
    ds.set_original_encoding(implicit, True, ds._character_set)
    return ds, pos


def read_part10_header(fp: BinaryIO) -> Any | None:
    """The header of the Part 10 object in ``fp`` (read from its start) as the same
    ``pydicom.FileDataset`` that ``dcmread(fp, stop_before_pixels=True, force=True)`` gives --
    the same raw elements, offsets, sequences, file meta, preamble and encodings -- with
    ``fp`` left, as there, at the Pixel Data element (or the end); None (``fp`` at an
    unspecified position) for anything unusual, which the caller reads with pydicom.

    Each top-level element's header is walked by :mod:`pipeline.dicom.elements` from one read
    of the file's head, without pydicom's per-element file reads; undefined-length sequences
    are still parsed by pydicom's own ``read_sequence``. Warnings (pydicom's, which may quote
    values) are the caller's to silence, as for ``dcmread``.
    """
    if not fp.seekable():
        return None
    start = fp.tell()
    size = fp.seek(0, io.SEEK_END) - start
    fp.seek(start)
    if start != 0:
        return None
    buf = fp.read(min(size, _FIRST_READ))
    while True:
        try:
            ds, end = _part10(fp, buf, size)
        except _Unusual:
            return None
        except _NeedMore:
            more = fp.read(min(size - len(buf), max(len(buf), _FIRST_READ)))
            if not more:
                return None
            buf += more
            continue
        except Exception:  # anything pydicom itself would raise on: let it
            return None
        fp.seek(end)
        return ds
