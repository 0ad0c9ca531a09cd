"""Bounds on what an object declares, checked before anything of that size exists.

A DICOM header declares sizes that readers trust: Rows x Columns x frames x bits to allocate
the decoded pixels, the length of every element, and, for the Deflated Explicit VR Little
Endian transfer syntax (``1.2.840.10008.1.2.1.99``), a dataset that inflates to whatever it
inflates to (pydicom inflates the whole file in one ``zlib.decompress``: 1 MB of deflated zeros
become 1 GB). Every stage checks here, against the configuration's ``limits``
(:class:`pipeline.config.LimitsConfig`), before it allocates or inflates, and quarantines what
is beyond a bound as ``too_large``:

- :func:`check_pixels`: the decoded size of one frame and of all frames;
- :func:`deflated_header`: a deflated object's header, inflated in steps only as far as the
  Pixel Data element (never past ``max_header_bytes``), handed back as a small deflated
  stream that ``pydicom.dcmread(stop_before_pixels=True)`` reads exactly as the original;
- :func:`check_inflated_size`: how far a whole deflated object inflates, counted in bounded
  steps without keeping the bytes, before a reader inflates it for good;
- :func:`read_capped`: read one object whole, refusing one bigger than a header and its pixel
  data may be.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from pipeline.config import LimitsConfig
from pipeline.dicom.elements import UNDEFINED, MalformedElement, read_header, skip_undefined
from pipeline.errors import TooLarge

__all__ = [
    "DEFLATED",
    "DeflatedHeader",
    "check_inflated_size",
    "check_pixels",
    "deflated_header",
    "object_cap",
    "read_capped",
]

#: Deflated Explicit VR Little Endian: the one syntax whose whole dataset is deflated
DEFLATED: Final = "1.2.840.10008.1.2.1.99"
_PIXEL_TAGS: Final = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
_READ: Final = 1 << 16  # compressed bytes read per step
_STEP: Final = 1 << 20  # inflated bytes made per step
_MiB: Final = 1 << 20


def _mib(n: int) -> str:
    return f"{n / _MiB:.0f} MiB" if n >= _MiB else f"{n} bytes"


def _value(ds: Any, keyword: str) -> Any:
    """``ds.get(keyword)``, but a still-raw element of a pydicom ``Dataset`` is converted on
    the side and left raw in ``ds``: the export encoder writes raw elements as their bytes,
    and a converted one through pydicom (four such elements made the export's encoding of a
    CT slice 40% slower)."""
    from pydicom import Dataset
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement, convert_raw_data_element
    from pydicom.tag import BaseTag

    if not isinstance(ds, Dataset):
        return ds.get(keyword, None)
    tag = tag_for_keyword(keyword)
    elem = ds._dict.get(BaseTag(tag)) if tag is not None else None
    if isinstance(elem, RawDataElement):
        return convert_raw_data_element(elem, ds=ds).value
    return None if elem is None else elem.value


def _int(ds: Any, keyword: str, default: int) -> int | None:
    """An integer attribute; ``default`` when absent or empty, None when not an integer (the
    readers that need it say so; a size check has nothing to check then)."""
    try:
        value = _value(ds, keyword)
    except Exception:  # a value pydicom cannot convert
        return None
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def check_pixels(ds: Any, limits: LimitsConfig) -> None:
    """Refuse an object whose declared decoded pixel data is beyond ``limits``.

    ``ds`` is a ``pydicom.Dataset`` or anything with its ``get(keyword, default)``. Rows x
    Columns x Samples per Pixel x Bits Allocated / 8 is one frame; times Number of Frames
    the whole. Values that are absent or not integers are left to the readers that need them.

    Raises
    ------
    TooLarge
        One frame is beyond ``max_frame_bytes`` or all of them beyond ``max_pixel_bytes``.
    """
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    samples, bits = _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated", 8)
    frames = _int(ds, "NumberOfFrames", 1)
    if rows is None or cols is None or samples is None or bits is None:
        return
    frame = (max(rows, 0) * max(cols, 0) * max(samples, 1) * max(bits, 1) + 7) // 8
    if frame > limits.max_frame_bytes:
        raise TooLarge(
            f"declares frames of {_mib(frame)} (Rows x Columns x Samples x Bits Allocated), "
            f"beyond limits.max_frame_bytes ({_mib(limits.max_frame_bytes)})"
        )
    total = frame * max(frames or 1, 1)
    if total > limits.max_pixel_bytes:
        raise TooLarge(
            f"declares {_mib(total)} of pixel data ({frames} frames), beyond "
            f"limits.max_pixel_bytes ({_mib(limits.max_pixel_bytes)})"
        )


def object_cap(limits: LimitsConfig) -> int:
    """The most bytes one object (its header and its pixel data) may hold or inflate to."""
    return limits.max_header_bytes + limits.max_pixel_bytes


def read_capped(fp: BinaryIO, limits: LimitsConfig) -> bytes:
    """Read an object whole (from where ``fp`` is), refusing one beyond :func:`object_cap`.

    Raises
    ------
    TooLarge
        The object holds more bytes than a header and pixel data within ``limits`` can.
    """
    cap = object_cap(limits)
    data = fp.read(cap + 1)
    if len(data) > cap:
        raise TooLarge(
            f"holds more than {_mib(cap)}, beyond limits.max_header_bytes + limits.max_pixel_bytes"
        )
    return data


def check_inflated_size(data: bytes | memoryview, limits: LimitsConfig) -> None:
    """Refuse deflated ``data`` (a raw DEFLATE stream) that inflates past :func:`object_cap`.

    The stream is inflated in steps of 1 MiB and each step dropped: memory stays flat whatever
    the ratio. A stream that is corrupt is left to the reader (it fails there, and says so).

    Raises
    ------
    TooLarge
        It inflates past the bound.
    """
    cap = object_cap(limits)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending: bytes | memoryview = data
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, _STEP))
            pending = inflater.unconsumed_tail
            if total > cap:
                raise TooLarge(
                    f"its deflated dataset inflates past {_mib(cap)} (limits.max_header_bytes "
                    "+ limits.max_pixel_bytes)"
                )
    except zlib.error:
        return


@dataclass(frozen=True)
class DeflatedHeader:
    """The header of a deflated object, as :func:`deflated_header` found it."""

    #: a stream ``pydicom.dcmread(stream, stop_before_pixels=True)`` reads as the original:
    #: the object's preamble and file meta, then its dataset up to the Pixel Data element's
    #: header, deflated again
    stream: BinaryIO
    #: offset of the deflated dataset in the object (after the file meta)
    dataset_offset: int
    #: the Pixel Data element's declared length (``0xFFFFFFFF``: encapsulated), or None when
    #: the dataset has none
    pixel_length: int | None


def _file_meta_end(fp: BinaryIO) -> tuple[int, str] | None:
    """(offset of the dataset, Transfer Syntax UID) by pydicom's own meta reader; None when
    it does not parse (pydicom says why when the caller reads it)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    try:
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        syntax = meta.get("TransferSyntaxUID")
    except Exception:
        return None
    return fp.tell(), str(syntax or "")


def deflated_header(fp: BinaryIO, limits: LimitsConfig) -> DeflatedHeader | None:
    """The header of a Deflated Explicit VR Little Endian object, inflated only as far as it
    goes; None (``fp`` back at its start) for any other object.

    The dataset is inflated 1 MiB at a time and its top-level elements walked as they arrive
    (:mod:`pipeline.dicom.elements`) until the Pixel Data element's header, or the end of the
    stream. What a walk cannot follow (a malformed element) inflates on to the end of the
    stream or the bound, and pydicom then says what is wrong with it.

    Raises
    ------
    TooLarge
        The header inflates past ``limits.max_header_bytes``, or the Pixel Data element
        declares more than ``limits.max_pixel_bytes``.
    """
    start = fp.tell()
    found = _file_meta_end(fp)
    if found is None or found[1] != DEFLATED:
        fp.seek(start)
        return None
    offset = found[0]
    fp.seek(start)
    prefix = fp.read(offset - start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    buf = bytearray()
    pos = 0
    pending = b""
    pixel_length: int | None = None
    end: int | None = None
    walk_at = 0  # walk again once this much is inflated (a sequence cut short: twice as much)
    while end is None:
        if len(buf) >= walk_at:
            try:
                while pos + 8 <= len(buf):
                    tag, vr, length, at = read_header(buf, pos, False)
                    if tag in _PIXEL_TAGS:
                        end, pixel_length = at, length
                        break
                    if length == UNDEFINED:
                        pos = skip_undefined(buf, at, vr == b"UN")
                    elif at + length > len(buf):
                        break
                    else:
                        pos = at + length
            except (MalformedElement, struct.error):
                # cut short in what is inflated so far (or malformed): inflate on, and walk
                # that sequence again only when twice as much is there (linear, not quadratic)
                walk_at = 2 * len(buf)
            if end is not None:
                break
        if len(buf) > limits.max_header_bytes:
            raise TooLarge(
                f"its deflated header inflates past limits.max_header_bytes "
                f"({_mib(limits.max_header_bytes)}) before the pixel data"
            )
        if inflater.eof:
            end = len(buf)
            break
        if not pending:
            pending = fp.read(_READ)
            if not pending:
                end = len(buf)
                break
        try:
            buf += inflater.decompress(pending, _STEP)
        except zlib.error:
            end = len(buf)  # corrupt: pydicom reads what there is and says what is wrong
            break
        pending = inflater.unconsumed_tail
    if end > limits.max_header_bytes:  # found in the last step, but past the bound
        raise TooLarge(
            f"its deflated header inflates past limits.max_header_bytes "
            f"({_mib(limits.max_header_bytes)}) before the pixel data"
        )
    if pixel_length is not None and UNDEFINED != pixel_length > limits.max_pixel_bytes:
        raise TooLarge(
            f"its Pixel Data element declares {_mib(pixel_length)}, beyond "
            f"limits.max_pixel_bytes ({_mib(limits.max_pixel_bytes)})"
        )
    # up to the Pixel Data value, its element header included: dcmread stops there
    head = bytes(buf[:end])
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflater.compress(head) + deflater.flush()
    return DeflatedHeader(io.BytesIO(prefix + body), offset - start, pixel_length)
