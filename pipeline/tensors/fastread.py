"""A fast reader for the common case: one classic single-frame image in native little endian.

Reading a 512x512 CT slice with ``pydicom.dcmread`` costs about 1 ms, almost all of it in
pydicom's per-element Python machinery for the ~100 header elements the tensors stage never
looks at; a compiled converter (dcm2niix) does the whole series in that time per file. This
module walks the element stream of a Part 10 file held in memory with ``struct`` only, keeps
the few top-level elements :mod:`pipeline.tensors.volume` and :mod:`pipeline.tensors.decode`
read (:data:`WANTED`, converted by their dictionary VR the way pydicom converts them), and
views the Pixel Data in place (no copy). Elements are parsed by the raw element reader of
:mod:`pipeline.dicom.elements`.

:func:`read_classic` returns ``None`` -- and the caller falls back to ``dcmread`` and the
codec plug-ins -- for anything outside the fast path: an object of a modality that may be 2D
(:mod:`pipeline.tensors.planar` reads attributes this reader does not keep), no ``DICM``
preamble, a transfer syntax other than Implicit/Explicit VR Little Endian, multi-frame or
enhanced objects (functional groups), no or encapsulated Pixel Data, Pixel Data shorter than
the header promises, colour or 1-bit or 64-bit pixels, or any element that does not parse.
It never raises on bad input.
The tests check it against ``dcmread`` + :func:`~pipeline.tensors.decode.decode_frames` on
every file of the shared corpus it accepts.
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import Any, Final, get_args

import numpy as np

from pipeline.config import LimitsConfig
from pipeline.config.models import PlanarModality
from pipeline.dicom.elements import (
    PIXEL_DATA,
    UNDEFINED,
    MalformedElement,
    read_header,
    skip_undefined,
)
from pipeline.dicom.limits import check_inflated_size, check_pixels, deflated_header

__all__ = ["WANTED", "Header", "read_classic", "read_image"]

#: top-level elements kept: what volume.py and decode.py read from a classic image, by tag,
#: with the keyword and VR (PS3.6) their values are converted by
WANTED: Final[dict[int, tuple[str, str]]] = {
    0x00080008: ("ImageType", "CS"),
    0x00080016: ("SOPClassUID", "UI"),
    0x00080018: ("SOPInstanceUID", "UI"),
    0x00080032: ("AcquisitionTime", "TM"),
    0x00080060: ("Modality", "CS"),
    0x00180086: ("EchoNumbers", "IS"),
    0x00181060: ("TriggerTime", "DS"),
    0x00189087: ("DiffusionBValue", "FD"),
    0x00189089: ("DiffusionGradientOrientation", "FD"),
    0x00200012: ("AcquisitionNumber", "IS"),
    0x00200013: ("InstanceNumber", "IS"),
    0x00200032: ("ImagePositionPatient", "DS"),
    0x00200037: ("ImageOrientationPatient", "DS"),
    0x00200100: ("TemporalPositionIdentifier", "IS"),
    0x00200105: ("NumberOfTemporalPositions", "IS"),
    0x00201002: ("ImagesInAcquisition", "IS"),
    0x00280002: ("SamplesPerPixel", "US"),
    0x00280006: ("PlanarConfiguration", "US"),
    0x00280008: ("NumberOfFrames", "IS"),
    0x00280010: ("Rows", "US"),
    0x00280011: ("Columns", "US"),
    0x00280030: ("PixelSpacing", "DS"),
    0x00280100: ("BitsAllocated", "US"),
    0x00280101: ("BitsStored", "US"),
    0x00280102: ("HighBit", "US"),
    0x00280103: ("PixelRepresentation", "US"),
    0x00281052: ("RescaleIntercept", "DS"),
    0x00281053: ("RescaleSlope", "DS"),
}

#: modalities left to ``dcmread``: their objects may become 2D tensors
#: (:mod:`pipeline.tensors.planar`), which read attributes this reader does not keep
_PLANAR: Final = frozenset(get_args(PlanarModality))

_IMPLICIT_LE: Final = b"1.2.840.10008.1.2"
_EXPLICIT_LE: Final = b"1.2.840.10008.1.2.1"
#: any of these makes the object enhanced/multi-frame: left to dcmread
_FUNCTIONAL_GROUPS: Final = frozenset({0x52009229, 0x52009230})
#: private groups where MR vendors keep diffusion directions and b-values (Siemens/GE 0019,
#: GE 0043, UIH 0065, Philips 2001/2005; :mod:`pipeline.tensors._diffusion`) or UIH's GRID
#: layout: an MR image carrying one is left to dcmread, which keeps them
_MR_PRIVATE_GROUPS: Final = frozenset({0x0019, 0x0043, 0x0065, 0x2001, 0x2005})
_MODALITY: Final = 0x00080060

_u16 = struct.Struct("<H").unpack_from

#: the raw element reader's error: the stream does not parse the way the fast path expects
_Bad = MalformedElement


def _parse(buf: bytes) -> tuple[bool, dict[int, tuple[bytes | None, int, int]], int, int] | None:
    """(implicit, kept elements {tag: (VR, length, offset)}, pixel offset, pixel length)."""
    if len(buf) < 144 or buf[128:132] != b"DICM":
        return None
    pos, tsyntax = 132, None
    while pos + 8 <= len(buf) and _u16(buf, pos)[0] == 0x0002:
        tag, _vr, length, vpos = read_header(buf, pos, False)
        if length == UNDEFINED:
            return None
        if tag == 0x00020010:
            tsyntax = buf[vpos : vpos + length].rstrip(b"\x00 ")
        pos = vpos + length
    if tsyntax not in (_IMPLICIT_LE, _EXPLICIT_LE):
        return None
    implicit = tsyntax == _IMPLICIT_LE
    kept: dict[int, tuple[bytes | None, int, int]] = {}
    mr = False
    while pos < len(buf):
        tag, vr, length, vpos = read_header(buf, pos, implicit)
        if mr and tag >> 16 in _MR_PRIVATE_GROUPS:
            return None
        if tag == _MODALITY:
            mr = buf[vpos : vpos + length].strip(b"\x00 ") == b"MR"
        if tag == PIXEL_DATA:
            if length == UNDEFINED or vpos + length > len(buf):
                return None  # encapsulated, or truncated: decode.py says which
            return implicit, kept, vpos, length
        if tag in _FUNCTIONAL_GROUPS:
            return None
        if length == UNDEFINED:
            pos = skip_undefined(buf, vpos, implicit or vr == b"UN", 1)
            continue
        if tag in WANTED:
            kept[tag] = (vr, length, vpos)
        pos = vpos + length
    return None  # no Pixel Data


class Header:
    """The :data:`WANTED` elements of one object, converted as ``pydicom`` converts them
    (``DS`` -> float, ``IS``/``US`` -> int, several values -> list, empty numeric -> None),
    read through the subset of the :class:`pydicom.Dataset` interface that
    :mod:`pipeline.tensors.volume` and :mod:`pipeline.tensors.decode` use: ``keyword in h``,
    ``h.get(keyword, default)``, ``h.Keyword``, ``h.file_meta`` and ``h.original_encoding``."""

    __slots__ = ("_values", "file_meta", "original_encoding")

    def __init__(self, values: dict[str, Any], implicit: bool) -> None:
        self._values = values
        ts = (_IMPLICIT_LE if implicit else _EXPLICIT_LE).decode()
        self.file_meta = {"TransferSyntaxUID": ts}
        self.original_encoding = (implicit, True)

    def __contains__(self, keyword: object) -> bool:
        return keyword in self._values

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)

    def __getattr__(self, keyword: str) -> Any:
        try:
            return self._values[keyword]
        except KeyError:
            raise AttributeError(keyword) from None

    def __repr__(self) -> str:  # keywords only: values may be identifying
        return f"Header({sorted(self._values)})"


def _convert(vr: str, raw: bytes) -> Any:
    """One value as pydicom gives it; :class:`_Bad` for anything not plainly well formed (the
    caller falls back to pydicom, which handles and warns about it)."""
    if vr == "US":
        if len(raw) % 2:
            raise _Bad
        ints = list(struct.unpack(f"<{len(raw) // 2}H", raw))
        return None if not ints else ints[0] if len(ints) == 1 else ints
    if vr == "FD":
        if len(raw) % 8:
            raise _Bad
        floats = list(struct.unpack(f"<{len(raw) // 8}d", raw))
        return None if not floats else floats[0] if len(floats) == 1 else floats
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _Bad from None
    text = text.rstrip("\x00 ")  # as pydicom: trailing padding only, components kept as they are
    if not text:
        return None if vr in ("DS", "IS") else ""
    parts = text.split("\\")
    values: list[Any]
    if vr in ("DS", "IS"):
        if not all(p.strip() for p in parts):
            raise _Bad  # pydicom keeps an empty component as ''
        try:
            values = [float(p) for p in parts] if vr == "DS" else [int(p) for p in parts]
        except ValueError:
            raise _Bad from None
    else:
        values = parts
    return values[0] if len(values) == 1 else values


def read_classic(buf: bytes) -> tuple[Header, np.ndarray[Any, Any]] | None:
    """``(header, frames)`` for a classic single-frame native little-endian image held in
    ``buf`` (a whole Part 10 file), or None when it is not one (see the module docstring).

    ``header`` holds the :data:`WANTED` elements present (:class:`Header`); ``frames`` is
    ``(1, rows, cols)`` of stored values as :func:`~pipeline.tensors.decode.decode_frames`
    returns them (a view of ``buf`` when Bits Stored fills Bits Allocated).
    """
    from pipeline.tensors.decode import _mask_to_bits_stored, expected_shape
    from pipeline.tensors.volume import is_mosaic

    try:
        parsed = _parse(buf)
        if parsed is None:
            return None
        implicit, kept, pixel_offset, pixel_length = parsed
        values: dict[str, Any] = {}
        for tag, (vr, length, vpos) in kept.items():
            keyword, dict_vr = WANTED[tag]
            if vr is not None and vr.decode("ascii", "replace") != dict_vr:
                return None
            values[keyword] = _convert(dict_vr, buf[vpos : vpos + length])
    except (_Bad, struct.error):
        return None
    header = Header(values, implicit)
    try:
        if (header.get("NumberOfFrames") or 1) != 1 or is_mosaic(header):  # type: ignore[arg-type]
            return None  # the mosaic's layout is in a private header this reader skips
        if str(header.get("Modality") or "").strip().upper() in _PLANAR:
            return None
        shape = expected_shape(header)  # type: ignore[arg-type]  # the Dataset subset it reads
        allocated = int(header.BitsAllocated)
        signed = (header.get("PixelRepresentation") or 0) == 1
    except Exception:
        return None
    if len(shape) != 3 or allocated not in (8, 16, 32):
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    count = shape[1] * shape[2]
    if pixel_length < count * dtype.itemsize:
        return None
    frames = np.frombuffer(buf, dtype=dtype, count=count, offset=pixel_offset).reshape(shape)
    try:
        return header, _mask_to_bits_stored(frames, header)  # type: ignore[arg-type]
    except Exception:
        return None


def read_image(buf: bytes, limits: LimitsConfig | None = None) -> tuple[Any, np.ndarray[Any, Any]]:
    """``(header, frames)`` of one Part 10 object held in ``buf``: :func:`read_classic` when it
    takes it, else ``pydicom.dcmread`` and :func:`~pipeline.tensors.decode.decode_frames`
    (every codec; the header is then a full :class:`pydicom.Dataset`).

    Declared sizes are checked against ``limits`` before pixels are decoded, and a deflated
    object's header is read, and its size counted, in bounded steps before it is inflated.

    Raises:
        InputError: the object cannot be parsed or its pixels decoded (see ``decode_frames``).
        TooLarge: a declared size is beyond ``limits``.
    """
    limits = limits or LimitsConfig()
    fast = read_classic(buf)  # a view of ``buf`` (bounded by it), or a copy of that size
    if fast is not None:
        check_pixels(fast[0], limits)
        return fast
    import pydicom

    from pipeline.tensors.decode import decode_frames

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings quote header values
        deflated = deflated_header(io.BytesIO(buf), limits)
        if deflated is not None:  # dcmread inflates the whole dataset at once: bound it first
            header = pydicom.dcmread(deflated.stream, stop_before_pixels=True, force=True)
            check_pixels(header, limits)
            check_inflated_size(memoryview(buf)[deflated.dataset_offset :], limits)
        ds = pydicom.dcmread(io.BytesIO(buf), force=True)
        check_pixels(ds, limits)
        return ds, decode_frames(ds)
