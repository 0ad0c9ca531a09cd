"""``pipeline.synth._codecs``: every transfer syntax round-trips bit-exactly through pydicom."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import UID, CTImageStorage, RLELossless

from pipeline.synth._codecs import ALL_SYNTAXES, available_syntaxes, encode_frame, is_encapsulated

HAS_IMAGECODECS = importlib.util.find_spec("imagecodecs") is not None
#: Every codec library the full install has (pacsflow's dependencies).
FULL_INSTALL = all(
    importlib.util.find_spec(m) is not None
    for m in ("imagecodecs", "pylibjpeg", "libjpeg", "openjpeg", "rle", "jpeg_ls")
)


def _decode(uid: str, data: bytes, shape: tuple[int, int], bits: int, signed: bool) -> np.ndarray:
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
    ds.PixelRepresentation = int(signed)
    if is_encapsulated(uid):
        ds.PixelData = encapsulate([data], has_bot=True)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = data
        ds["PixelData"].VR = "OW"
    return ds.pixel_array


def _phantom_like(shape: tuple[int, int], signed: bool) -> np.ndarray:
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    body = ((xx - shape[1] / 2) / (shape[1] / 2.5)) ** 2 + (
        (yy - shape[0] / 2) / (shape[0] / 3)
    ) ** 2 <= 1
    hu = np.where(body, 40, -1000) + rng.integers(-9, 10, shape)
    if signed:
        hu[0, :] = -3024  # padding
        return (hu + 1024).astype(np.int16)
    return np.clip(hu + 1024, 0, 4095).astype(np.uint16)


@pytest.mark.parametrize("shape", [(16, 16), (64, 48)])
def test_all_syntaxes_usable_here(shape: tuple[int, int]) -> None:
    usable, unavailable = available_syntaxes((shape,))
    assert set(usable) | set(unavailable) == set(ALL_SYNTAXES)
    assert all(reason for reason in unavailable.values())
    if FULL_INSTALL:
        assert not unavailable, unavailable
    if not HAS_IMAGECODECS:  # pragma: no cover - the minimal install tier
        assert "1.2.840.10008.1.2.4.70" in unavailable


@pytest.mark.parametrize("uid", ALL_SYNTAXES, ids=lambda u: UID(u).keyword or u)
@pytest.mark.parametrize("shape", [(16, 16), (64, 48)])
@pytest.mark.parametrize("signed", [False, True])
def test_round_trip_is_bit_exact(uid: str, shape: tuple[int, int], signed: bool) -> None:
    usable, unavailable = available_syntaxes((shape,))
    if uid not in usable:
        pytest.skip(f"{UID(uid).name}: {unavailable[uid]}")
    frame = _phantom_like(shape, signed)
    bits = 16 if signed else 12
    data = encode_frame(uid, frame, bits_stored=bits, signed=signed)
    decoded = _decode(uid, data, shape, bits, signed)
    assert decoded.dtype == frame.dtype
    np.testing.assert_array_equal(decoded, frame)


def test_rle_plugins_agree() -> None:
    """Both RLE encoders give the same bytes, so archives do not depend on which is installed."""
    encoder = get_encoder(RLELossless)
    plugins = sorted(encoder.available_plugins)
    frame = _phantom_like((32, 32), False)
    kwargs: dict[str, Any] = {
        "rows": 32,
        "columns": 32,
        "samples_per_pixel": 1,
        "bits_allocated": 16,
        "bits_stored": 12,
        "pixel_representation": 0,
        "photometric_interpretation": "MONOCHROME2",
        "number_of_frames": 1,
    }
    outputs = {bytes(encoder.encode(frame, encoding_plugin=p, **kwargs)) for p in plugins}
    assert len(outputs) == 1


def test_unknown_syntax_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        encode_frame(
            "1.2.840.10008.1.2.4.50", np.zeros((8, 8), np.uint16), bits_stored=12, signed=False
        )


def test_without_imagecodecs_only_its_syntaxes_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.synth import _codecs

    monkeypatch.setattr(_codecs, "_imagecodecs", lambda: None)
    _codecs._availability.cache_clear()
    try:
        usable, unavailable = available_syntaxes(((16, 16), (64, 64)))
    finally:
        _codecs._availability.cache_clear()
    dropped = {"1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.90"}
    assert set(unavailable) >= dropped  # JPEG 2000 too: 16x16 needs imagecodecs
    assert all("imagecodecs" in unavailable[uid] for uid in dropped)
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"} <= set(usable)
    # larger images still get JPEG 2000 from pylibjpeg-openjpeg
    monkeypatch.setattr(_codecs, "_imagecodecs", lambda: None)
    try:
        usable_large, _ = available_syntaxes(((64, 64),))
    finally:
        _codecs._availability.cache_clear()
    if get_encoder(UID("1.2.840.10008.1.2.4.90")).is_available:
        assert "1.2.840.10008.1.2.4.90" in usable_large
