"""Decode the pixel data of one DICOM object to a NumPy array of stored values.

:func:`decode_frames` returns every frame of an object as ``(frames, rows, cols)`` or
``(frames, rows, cols, samples)``, holding the *stored* values: no Rescale Slope/Intercept,
no VOI LUT, no palette lookup (another module applies those). Values outside Bits Stored are
masked off (unsigned) or sign-extended from High Bit (signed), as dcm2niix does, because
PS3.5 §8.1.1 lets writers leave garbage in the unused bits (``dcm_qa_12bit``). YBR colour
data are returned as RGB where pydicom's decoders convert them (its default).

Decoding goes through pydicom 3's decoder registry and tries, in order, the plug-ins in
:data:`PLUGIN_ORDER` that are installed for the object's transfer syntax, falling back to the
next on any failure. Two cases pydicom 3.0.2 cannot decode are handled here:

- Deflated Image Frame Compression (``1.2.840.10008.1.2.8.1``, Sup 244): each frame is a raw
  DEFLATE stream of the native frame.
- RLE Lossless with Bits Allocated 1 (e.g. RLE SEG): one RLE segment per frame holding the
  packed bits.

and JPEG baseline/extended falls back to imagecodecs' libjpeg-turbo, which decodes 12-bit
JPEG Extended streams that pylibjpeg's libjpeg rejects (e.g. pydicom's ``JPEG-lossy.dcm``;
within +-1 of the fixed twin, as expected between lossy IDCTs).

When nothing decodes, :class:`UndecodablePixelData` (an :class:`~pipeline.errors.InputError`,
quarantine reason ``undecodable``) names the transfer syntax and the plug-ins tried; its
message never contains header values.

This module must not import torch or monai.
"""

from __future__ import annotations

import importlib
import logging
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from pipeline.errors import MissingAttribute, UndecodablePixelData, UnreadableDicom

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "DEFLATED_IMAGE_FRAME",
    "PLUGIN_ORDER",
    "UndecodablePixelData",
    "decode_frames",
    "decode_frames_detail",
    "expected_shape",
]

#: pydicom decoding plug-ins in the order tried (those not installed for a syntax are skipped;
#: others are never used). pylibjpeg decodes every syntax in the survey that anything decodes;
#: pyjpegls and pydicom's own RLE decoder are fallbacks, pillow the last resort. gdcm
#: (python-gdcm) is left out on purpose: it decodes nothing the others cannot, fails on 12-bit
#: JPEG Extended, and aborts the whole process (an uncaught C++ exception) on a malformed
#: JPEG 2000 stream instead of raising.
PLUGIN_ORDER: Final[tuple[str, ...]] = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")

#: Deflated Image Frame Compression (DICOM Sup 244); not in pydicom 3.0.2.
DEFLATED_IMAGE_FRAME: Final = "1.2.840.10008.1.2.8.1"
_RLE_LOSSLESS: Final = "1.2.840.10008.1.2.5"
_JPEG_BASELINE: Final = "1.2.840.10008.1.2.4.50"
_JPEG_EXTENDED: Final = "1.2.840.10008.1.2.4.51"
_PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_NATIVE_BY_ENCODING: Final = {
    (True, True): "1.2.840.10008.1.2",  # implicit VR little endian
    (False, True): "1.2.840.10008.1.2.1",  # explicit VR little endian
    (False, False): "1.2.840.10008.1.2.2",  # explicit VR big endian
}


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An integer attribute, or :class:`MissingAttribute` / :class:`UnreadableDicom`."""
    value = ds.get(keyword, None)
    if value is None or value == "":
        if default is not None:
            return default
        raise MissingAttribute(f"pixel data needs {keyword}, which is absent or empty")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UnreadableDicom(f"{keyword} is not an integer") from None


def expected_shape(ds: Dataset) -> tuple[int, ...]:
    """``(frames, rows, cols)`` or ``(frames, rows, cols, samples)`` from the header."""
    frames = _int_attr(ds, "NumberOfFrames", 1) or 1
    rows = _int_attr(ds, "Rows")
    cols = _int_attr(ds, "Columns")
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if min(frames, rows, cols, samples) < 1:
        raise UnreadableDicom("Rows, Columns, SamplesPerPixel or NumberOfFrames is below 1")
    return (frames, rows, cols) if samples == 1 else (frames, rows, cols, samples)


def _transfer_syntax(ds: Dataset) -> str:
    """The object's transfer syntax UID; inferred from its encoding when file meta lacks it."""
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID", None) if file_meta is not None else None
    if tsyntax:
        return str(tsyntax)
    encoding = getattr(ds, "original_encoding", (None, None))
    native = _NATIVE_BY_ENCODING.get(tuple(encoding))
    if native is None:
        raise UndecodablePixelData("no Transfer Syntax UID and the encoding is unknown")
    return native


def _ts_name(tsyntax: str) -> str:
    from pydicom.uid import UID

    name = UID(tsyntax).name
    return f"{name} ({tsyntax})" if name != tsyntax else tsyntax


def _mask_to_bits_stored(arr: np.ndarray[Any, Any], ds: Dataset) -> np.ndarray[Any, Any]:
    """Mask off (unsigned) or sign-extend (signed) the bits above Bits Stored."""
    if arr.dtype.kind not in "iu":
        return arr
    nbits = arr.dtype.itemsize * 8
    stored = _int_attr(ds, "BitsStored", nbits)
    if stored >= nbits or stored < 1:
        return arr
    if _int_attr(ds, "PixelRepresentation", 0) == 1:
        signed = arr.astype(arr.dtype.newbyteorder("=").str.replace("u", "i"), copy=True)
        shift = nbits - stored
        np.left_shift(signed, shift, out=signed)
        np.right_shift(signed, shift, out=signed)
        return signed
    unsigned = arr.astype(arr.dtype.newbyteorder("=").str.replace("i", "u"), copy=True)
    np.bitwise_and(unsigned, (1 << stored) - 1, out=unsigned)
    return unsigned


def _frames(ds: Dataset, nframes: int) -> Iterator[bytes]:
    from pydicom.encaps import generate_frames

    yield from generate_frames(ds.PixelData, number_of_frames=nframes)


_NATIVE_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def _native_le(ds: Dataset, tsyntax: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any] | None:
    """The common case straight from the bytes: native little-endian integer Pixel Data of
    one sample per pixel and 8/16/32 bits allocated (a view, no copy); None otherwise (the
    plug-ins take it)."""
    if tsyntax not in _NATIVE_LE or "PixelData" not in ds or len(shape) != 3:
        return None
    try:
        allocated = _int_attr(ds, "BitsAllocated")
        signed = _int_attr(ds, "PixelRepresentation", 0) == 1
    except Exception:
        return None
    if allocated not in (8, 16, 32):
        return None
    data = ds.PixelData
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    count = int(np.prod(shape))
    if not isinstance(data, bytes) or len(data) < count * dtype.itemsize:
        return None  # the plug-ins, and the truncation check, take it from here
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def _native_frame(buf: bytes, ds: Dataset, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """One native (uncompressed, little endian) frame from ``buf``, shaped ``shape[1:]``."""
    rows, cols = shape[1], shape[2]
    samples = shape[3] if len(shape) == 4 else 1
    npixels = rows * cols * samples
    allocated = _int_attr(ds, "BitsAllocated")
    if allocated == 1:
        bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
        if bits.size < npixels:
            raise ValueError("frame shorter than Rows x Columns")
        return bits[:npixels].reshape(shape[1:])
    if allocated not in (8, 16, 32, 64):
        raise ValueError("unsupported Bits Allocated")
    signed = _int_attr(ds, "PixelRepresentation", 0) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    if len(buf) < npixels * dtype.itemsize:
        raise ValueError("frame shorter than Rows x Columns")
    flat = np.frombuffer(buf, dtype=dtype, count=npixels)
    if samples > 1 and _int_attr(ds, "PlanarConfiguration", 0) == 1:
        return flat.reshape(samples, rows, cols).transpose(1, 2, 0)
    return flat.reshape(shape[1:])


def _decode_deflated_frames(ds: Dataset, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """Deflated Image Frame Compression: raw DEFLATE per frame (zlib-wrapped accepted too)."""
    out = []
    # a frame inflates to at most its declared size (checked against the limits before
    # decoding): never further, whatever its ratio
    size = int(np.prod(shape[1:])) * max(_int_attr(ds, "BitsAllocated"), 1)
    cap = (size + 7) // 8
    for buf in _frames(ds, shape[0]):
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            raw = inflater.decompress(buf, cap)
        except zlib.error:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(buf, cap)
        if inflater.unconsumed_tail:
            raise ValueError("a frame inflates past its declared size")
        out.append(_native_frame(raw, ds, shape))
    return np.stack(out)


def _decode_rle_1bit(ds: Dataset, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """RLE Lossless with Bits Allocated 1: one segment of packed bits per frame."""
    from pydicom.pixels.decoders.rle import _rle_decode_segment, _rle_parse_header

    if _int_attr(ds, "BitsAllocated") != 1 or len(shape) != 3:
        raise ValueError("only single-sample Bits Allocated 1 is handled here")
    out = []
    for buf in _frames(ds, shape[0]):
        offsets = _rle_parse_header(buf[:64])
        if len(offsets) != 1:
            raise ValueError("expected one RLE segment per 1-bit frame")
        segment = _rle_decode_segment(buf[offsets[0] :])
        out.append(_native_frame(bytes(segment), ds, shape))
    return np.stack(out)


def _decode_imagecodecs_jpeg(ds: Dataset, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    """JPEG baseline/extended via imagecodecs' libjpeg-turbo (8 and 12 bit)."""
    imagecodecs = importlib.import_module("imagecodecs")
    frames = [np.asarray(imagecodecs.jpeg8_decode(buf)) for buf in _frames(ds, shape[0])]
    return np.stack(frames)


#: Decoders of pacsflow's own, by transfer syntax, tried after pydicom's plug-ins.
_OWN_DECODERS: Final[
    dict[str, tuple[tuple[str, Callable[[Dataset, tuple[int, ...]], np.ndarray[Any, Any]]], ...]]
] = {
    DEFLATED_IMAGE_FRAME: (("pacsflow-deflate", _decode_deflated_frames),),
    _RLE_LOSSLESS: (("pacsflow-rle-1bit", _decode_rle_1bit),),
    _JPEG_BASELINE: (("imagecodecs", _decode_imagecodecs_jpeg),),
    _JPEG_EXTENDED: (("imagecodecs", _decode_imagecodecs_jpeg),),
}


def _pydicom_attempts(
    tsyntax: str,
) -> list[tuple[str, Callable[[Dataset, tuple[int, ...]], np.ndarray[Any, Any]]]]:
    """pydicom decoding attempts for ``tsyntax``, in :data:`PLUGIN_ORDER`."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(tsyntax)
    except (NotImplementedError, ValueError):  # no pydicom decoder / not a transfer syntax
        return []
    if not decoder.is_encapsulated and decoder.is_available:
        plugins = [""]  # native: no plug-in needed
    else:
        available = set(decoder.available_plugins)
        plugins = [p for p in PLUGIN_ORDER if p in available]

    def attempt(plugin: str) -> Callable[[Dataset, tuple[int, ...]], np.ndarray[Any, Any]]:
        def run(ds: Dataset, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
            arr, _meta = decoder.as_array(ds, decoding_plugin=plugin)
            return arr

        return run

    return [(plugin or "pydicom-native", attempt(plugin)) for plugin in plugins]


def _is_truncated_native(ds: Dataset, tsyntax: str, shape: tuple[int, ...]) -> bool:
    """Whether native Pixel Data holds fewer bytes than the header promises."""
    from pydicom.uid import UID

    uid = UID(tsyntax)
    if not uid.is_transfer_syntax or uid.is_compressed or "PixelData" not in ds:
        return False
    allocated = _int_attr(ds, "BitsAllocated", 8)
    expected_bits = int(np.prod(shape)) * allocated
    return len(ds.PixelData) * 8 < expected_bits


def decode_frames(ds: Dataset) -> np.ndarray[Any, Any]:
    """Decode all frames of ``ds`` to stored values; see :func:`decode_frames_detail`."""
    return decode_frames_detail(ds)[0]


def decode_frames_detail(ds: Dataset) -> tuple[np.ndarray[Any, Any], str]:
    """Decode all frames of ``ds`` to stored values, and name the decoder that did it.

    Parameters
    ----------
    ds:
        A dataset read with pixel data (``pydicom.dcmread`` without ``stop_before_pixels``).

    Returns
    -------
    tuple[numpy.ndarray, str]
        ``(frames, rows, cols)`` for one sample per pixel, ``(frames, rows, cols, samples)``
        otherwise; integer dtypes hold stored values with the bits above Bits Stored masked
        (unsigned) or sign-extended (signed); Float/Double Float Pixel Data stay float. And
        the decoder's name: a pydicom plug-in, ``pydicom-native`` or one of this module's.

    Raises
    ------
    MissingAttribute
        No pixel data, or Rows/Columns/Bits Allocated missing.
    UndecodablePixelData
        No installed codec decodes it, or the decoded size does not match the header; the
        message names the transfer syntax and the decoders tried, never a header value.
    UnreadableDicom
        A header value needed for decoding is malformed, or (reason ``truncated``) native
        pixel data is shorter than the header says.
    """
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise MissingAttribute("the object has no pixel data")
    tsyntax = _transfer_syntax(ds)
    shape = expected_shape(ds)
    fast = _native_le(ds, tsyntax, shape)
    if fast is not None:
        return _mask_to_bits_stored(fast, ds), "pacsflow-native"
    attempts = _pydicom_attempts(tsyntax) + list(_OWN_DECODERS.get(tsyntax, ()))
    tried: list[str] = []
    for name, run in attempts:
        tried.append(name)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                arr = run(ds, shape)
        except Exception as exc:
            logger.debug("decoder %s failed on %s: %s", name, tsyntax, type(exc).__name__)
            continue
        for w in caught:
            logger.debug("decoder %s warned: %s", name, w.category.__name__)
        if arr.size != int(np.prod(shape)):
            logger.debug("decoder %s returned %d values, expected %s", name, arr.size, shape)
            tried[-1] = f"{name} (wrong size)"
            continue
        return _mask_to_bits_stored(arr.reshape(shape), ds), name
    message = (
        f"cannot decode pixel data in {_ts_name(tsyntax)}: "
        f"tried {', '.join(tried) if tried else 'no decoder (none installed for it)'}"
    )
    if _is_truncated_native(ds, tsyntax, shape):
        raise UnreadableDicom(message + "; the pixel data is truncated", reason="truncated")
    raise UndecodablePixelData(message)
