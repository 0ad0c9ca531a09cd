"""Lossless pixel encoders for the synthetic archive, each checked to round-trip through pydicom.

Seven transfer syntaxes, each used only where it works here:

========================  ===============================================================
Explicit / Implicit VR LE native, always
RLE Lossless              pydicom's RLE encoder (the pylibjpeg-rle plug-in when installed,
                          else pydicom's own; both give the same bytes)
JPEG-LS Lossless          pydicom + pyjpegls
JPEG 2000 Lossless        pydicom + pylibjpeg-openjpeg; images under 32 pixels (too small for
                          its 6 resolution levels) go through ``imagecodecs.jpeg2k_encode``
JPEG Lossless SV1         ``imagecodecs.jpeg8_encode(lossless=True, predictor=1)``
HTJ2K Lossless            ``imagecodecs.htj2k_encode(reversible=True)``
========================  ===============================================================

A codec is *available* when its encoder imports and a probe frame (unsigned 12-bit and signed
16-bit) decodes bit-exactly through ``pydicom`` ``pixel_array`` with warnings as errors; the
result is cached per process. ``imagecodecs`` is imported lazily and may be absent.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_SYNTAXES",
    "available_syntaxes",
    "encode_frame",
    "is_encapsulated",
]

#: Every transfer syntax the generator can write, in a fixed order.
ALL_SYNTAXES: tuple[str, ...] = (
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    str(RLELossless),
    str(JPEGLSLossless),
    str(JPEG2000Lossless),
    str(JPEGLosslessSV1),
    str(HTJ2KLossless),
)

_NATIVE = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
_OPENJPEG_MIN_SIZE = 32  # pylibjpeg-openjpeg always uses 6 resolution levels


def is_encapsulated(transfer_syntax: str) -> bool:
    """Whether Pixel Data is encapsulated (compressed) in ``transfer_syntax``."""
    return transfer_syntax not in _NATIVE


@functools.cache
def _imagecodecs() -> ModuleType | None:
    from pipeline._deps import optional_import

    try:
        return optional_import("imagecodecs", feature="synthetic JPEG lossless and HTJ2K")
    except ImportError as exc:
        logger.debug("imagecodecs unavailable: %s", exc)
        return None


def _pydicom_kwargs(frame: NDArray[np.integer], bits_stored: int, signed: bool) -> dict[str, Any]:
    return {
        "rows": frame.shape[0],
        "columns": frame.shape[1],
        "samples_per_pixel": 1,
        "bits_allocated": 16,
        "bits_stored": bits_stored,
        "pixel_representation": int(signed),
        "photometric_interpretation": "MONOCHROME2",
        "number_of_frames": 1,
    }


@functools.cache
def _rle_plugin() -> str:
    from pydicom.pixels import get_encoder

    plugins = get_encoder(RLELossless).available_plugins
    return "pylibjpeg" if "pylibjpeg" in plugins else "pydicom"


def _encode_pydicom(uid: str, frame: NDArray[np.integer], bits_stored: int, signed: bool) -> bytes:
    from pydicom.pixels import get_encoder

    kwargs = _pydicom_kwargs(frame, bits_stored, signed)
    if uid == RLELossless:
        kwargs["encoding_plugin"] = _rle_plugin()
    return bytes(get_encoder(uid).encode(frame, **kwargs))


def _encode_imagecodecs(
    uid: str, frame: NDArray[np.integer], bits_stored: int, signed: bool
) -> bytes:
    ic = _imagecodecs()
    if ic is None:  # pragma: no cover - guarded by available_syntaxes
        raise RuntimeError("imagecodecs is not installed")
    if uid == JPEGLosslessSV1:
        # the lossless JPEG codestream holds the stored bit pattern; signed data is 16-bit
        return bytes(
            ic.jpeg8_encode(
                frame.view(np.uint16), lossless=True, predictor=1, bitspersample=bits_stored
            )
        )
    if uid == HTJ2KLossless:
        return bytes(ic.htj2k_encode(frame, reversible=True))
    if uid == JPEG2000Lossless:
        levels = max(1, min(6, int(np.log2(min(frame.shape))) - 1))
        return bytes(
            ic.jpeg2k_encode(
                frame,
                codecformat="J2K",
                reversible=True,
                resolutions=levels,
                bitspersample=bits_stored,
            )
        )
    raise ValueError(f"imagecodecs encodes no {uid}")  # pragma: no cover


def _encoder(
    uid: str, rows: int, columns: int
) -> Callable[[NDArray[np.integer], int, bool], bytes]:
    if uid in (JPEGLosslessSV1, HTJ2KLossless):
        return functools.partial(_encode_imagecodecs, uid)
    if uid == JPEG2000Lossless and min(rows, columns) < _OPENJPEG_MIN_SIZE:
        return functools.partial(_encode_imagecodecs, uid)
    return functools.partial(_encode_pydicom, uid)


def encode_frame(
    transfer_syntax: str, frame: NDArray[np.integer], *, bits_stored: int, signed: bool
) -> bytes:
    """Encode one frame of stored values for ``transfer_syntax``.

    Parameters
    ----------
    transfer_syntax:
        One of :data:`ALL_SYNTAXES`.
    frame:
        ``(rows, columns)`` stored values, ``uint16`` or ``int16`` (``signed``).
    bits_stored:
        BitsStored of the series (12 or 16).
    signed:
        PixelRepresentation 1.

    Returns
    -------
    bytes
        Native little-endian bytes, or one compressed codestream (not yet encapsulated).

    Raises
    ------
    ValueError
        If the transfer syntax is not one the generator writes.
    """
    if transfer_syntax in _NATIVE:
        return frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes()
    if transfer_syntax not in ALL_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax}")
    encode = _encoder(transfer_syntax, frame.shape[0], frame.shape[1])
    return encode(frame, bits_stored, signed)


def _round_trips(uid: str, rows: int, columns: int) -> str | None:
    """Return ``None`` when ``uid`` encodes and decodes bit-exactly, else why not."""
    from pydicom.pixels import get_decoder

    if not get_decoder(uid).is_available:
        return "pydicom has no decoder plug-in for it"
    if uid in (JPEGLosslessSV1, HTJ2KLossless) or (
        uid == JPEG2000Lossless and min(rows, columns) < _OPENJPEG_MIN_SIZE
    ):
        if _imagecodecs() is None:
            return "imagecodecs is not installed"
    else:
        from pydicom.pixels import get_encoder

        encoder = get_encoder(uid)
        if not encoder.is_available:
            return f"no pydicom encoder plug-in: {encoder.missing_dependencies}"
    rng = np.random.default_rng(0)
    shape = (rows, columns)
    unsigned = rng.integers(0, 4096, shape).astype(np.uint16)
    signed = (rng.integers(0, 4096, shape) - 3024).astype(np.int16)
    for arr, bits, is_signed in ((unsigned, 12, False), (signed, 16, True)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                data = encode_frame(uid, arr, bits_stored=bits, signed=is_signed)
                ds = Dataset()
                ds.file_meta = FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = UID(uid)
                ds.SOPClassUID = CTImageStorage
                ds.Rows, ds.Columns = shape
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.BitsAllocated = 16
                ds.BitsStored = bits
                ds.HighBit = bits - 1
                ds.PixelRepresentation = int(is_signed)
                ds.PixelData = encapsulate([data], has_bot=True)
                ds["PixelData"].VR = "OB"
                ds["PixelData"].is_undefined_length = True
                decoded = ds.pixel_array
        except Exception as exc:  # any failure means: do not use this codec here
            return f"{type(exc).__name__}: {exc}"
        if decoded.dtype != arr.dtype or not np.array_equal(decoded, arr):
            return "decoded pixels differ from the encoded ones"
    return None


@dataclass(frozen=True)
class _Availability:
    usable: tuple[str, ...]
    unavailable: dict[str, str]


@functools.cache
def _availability(sizes: tuple[tuple[int, int], ...]) -> _Availability:
    usable: list[str] = []
    unavailable: dict[str, str] = {}
    for uid in ALL_SYNTAXES:
        if uid in _NATIVE:
            usable.append(uid)
            continue
        reason = None
        for rows, columns in sizes:
            reason = _round_trips(uid, rows, columns)
            if reason is not None:
                break
        if reason is None:
            usable.append(uid)
        else:
            unavailable[uid] = reason
            logger.info("synth: %s not used (%s)", UID(uid).name, reason)
    return _Availability(tuple(usable), unavailable)


def available_syntaxes(
    sizes: tuple[tuple[int, int], ...],
) -> tuple[tuple[str, ...], dict[str, str]]:
    """Return the transfer syntaxes usable for every image size in ``sizes``.

    Parameters
    ----------
    sizes:
        The ``(rows, columns)`` of the images the archive will hold.

    Returns
    -------
    tuple
        ``(usable UIDs in ALL_SYNTAXES order, {unusable UID: reason})``.
    """
    result = _availability(tuple(sorted(set(sizes))))
    return result.usable, dict(result.unavailable)
