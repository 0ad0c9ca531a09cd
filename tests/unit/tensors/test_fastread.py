"""pipeline.tensors.fastread: same header values and frames as dcmread + decode_frames, or None.

The fast reader is only worth having if it can never disagree with pydicom: every object it
accepts must give the values ``dcmread`` gives for :data:`WANTED` and the frames
``decode_frames`` gives; everything else must be declined (None), never raised on.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from pipeline.errors import InputError
from pipeline.tensors.decode import decode_frames
from pipeline.tensors.fastread import WANTED, Header, read_classic, read_image


def _ct(
    *,
    syntax: str = ExplicitVRLittleEndian,
    bits_stored: int = 12,
    signed: bool = False,
    with_sequences: bool = True,
    undefined_lengths: bool = True,
    seed: int = 0,
) -> bytes:
    """A classic CT slice as Part 10 bytes, with sequences before and after the wanted tags."""
    rng = np.random.default_rng(seed)
    dtype = np.int16 if signed else np.uint16
    hi = 2 ** (bits_stored - 1) if signed else 2**bits_stored
    arr = rng.integers(-hi if signed else 0, hi, (8, 6)).astype(dtype)
    # garbage above Bits Stored, which decoding must mask off
    raw = arr.view(np.uint16) | np.uint16(0xF000 if bits_stored == 12 else 0)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    if with_sequences:
        inner = Dataset()
        inner.CodeValue = "T-D3000"
        inner.CodingSchemeDesignator = "SRT"
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = generate_uid()
        item.PurposeOfReferenceCodeSequence = Sequence([inner])
        ds.ReferencedImageSequence = Sequence([item, item])
        ds.add_new(0x00091010, "LO", "ACME")  # private creator
        ds.add_new(0x00091011, "SQ", Sequence([Dataset()]))
        ds.AnatomicRegionSequence = Sequence([inner])
    ds.AcquisitionNumber = 3
    ds.TriggerTime = "12.5"
    ds.ImagePositionPatient = [-100.5, "-99.25", 40]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.999999, "0.0001"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.PixelSpacing = ["0.7", "0.75"]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = raw.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    if with_sequences and undefined_lengths:
        for seq_kw in ("ReferencedImageSequence", "AnatomicRegionSequence"):
            ds[seq_kw].is_undefined_length = True
            for it in ds[seq_kw].value:
                it.is_undefined_length_sequence_item = True
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _pydicom(data: bytes) -> tuple[Dataset, np.ndarray[Any, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        return ds, decode_frames(ds)


def assert_same_as_pydicom(data: bytes) -> Header:
    """read_classic accepts ``data`` and agrees with dcmread + decode_frames."""
    got = read_classic(data)
    assert got is not None, "the fast reader declined a classic native image"
    header, frames = got
    ds, ref = _pydicom(data)
    for keyword, _vr in WANTED.values():
        if keyword in ds:
            assert keyword in header, keyword
            want = ds[keyword].value
            have = header.get(keyword)
            if isinstance(want, list | pydicom.multival.MultiValue):
                assert list(have) == [type(have[0])(v) for v in want], keyword
            elif want is None or want == "":
                assert have in (None, ""), keyword
            else:
                assert have == want, keyword
        else:
            assert keyword not in header, keyword
    assert frames.dtype == ref.dtype
    assert frames.shape == ref.shape
    np.testing.assert_array_equal(frames, ref)
    return header


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [True, False])
@pytest.mark.parametrize(("bits_stored", "signed"), [(12, False), (16, False), (12, True)])
def test_agrees_with_pydicom(syntax: str, undefined: bool, bits_stored: int, signed: bool) -> None:
    data = _ct(syntax=syntax, undefined_lengths=undefined, bits_stored=bits_stored, signed=signed)
    header = assert_same_as_pydicom(data)
    assert header.file_meta["TransferSyntaxUID"] == syntax
    assert header.original_encoding == (syntax == ImplicitVRLittleEndian, True)
    assert header.ImagePositionPatient == [-100.5, -99.25, 40.0]
    assert header.RescaleIntercept == -1024.0


def test_header_exposes_no_values_in_its_repr() -> None:
    got = read_classic(_ct())
    assert got is not None
    header = got[0]
    assert "1.2." not in repr(header)
    assert "100.5" not in repr(header)
    with pytest.raises(AttributeError):
        _ = header.PatientName  # not kept: never read by the tensors stage


def _modified(data: bytes, **changes: Any) -> bytes:
    ds, _ = _pydicom(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values on purpose
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@functools.cache
def _declined_cases() -> dict[str, bytes]:
    base = _ct()
    # the same bytes declared big endian (the fast path keys on the transfer syntax alone)
    big = base.replace(
        ExplicitVRLittleEndian.encode() + b"\x00", ExplicitVRBigEndian.encode() + b"\x00"
    )
    assert big != base
    rle = _pydicom(base)[0]
    rle.compress(RLELossless)
    rle_buf = io.BytesIO()
    rle.save_as(rle_buf, enforce_file_format=True)
    pixel_at = base.rfind(b"\xe0\x7f\x10\x00")
    return {
        "no preamble": base[132:],
        "big endian": big,
        "encapsulated (RLE)": rle_buf.getvalue(),
        "truncated pixel data": base[:-10],
        "cut inside the header": base[: pixel_at // 2],
        "no pixel data": base[:pixel_at],
        "multi-frame": _modified(base, NumberOfFrames=2),
        "colour": _modified(base, SamplesPerPixel=3),
        "empty DS component": _modified(base, PixelSpacing="0.7\\"),
        "DS that is not a number": base.replace(
            b"\x28\x00\x53\x10DS\x02\x001 ", b"\x28\x00\x53\x10DS\x04\x00one "
        ),
        "enhanced": _modified(base, SharedFunctionalGroupsSequence=Sequence([Dataset()])),
    }


DECLINED = (
    "no preamble",
    "big endian",
    "encapsulated (RLE)",
    "truncated pixel data",
    "cut inside the header",
    "no pixel data",
    "multi-frame",
    "colour",
    "empty DS component",
    "DS that is not a number",
    "enhanced",
)


@pytest.mark.parametrize("case", DECLINED)
def test_declines_what_it_does_not_take(case: str) -> None:
    cases = _declined_cases()
    assert sorted(cases) == sorted(DECLINED)
    data = cases[case]
    assert read_classic(data) is None


def test_read_image_falls_back_to_pydicom() -> None:
    data = _declined_cases()["encapsulated (RLE)"]
    header, frames = read_image(data)
    assert isinstance(header, Dataset)
    np.testing.assert_array_equal(frames, read_image(_ct())[1])
    with pytest.raises(InputError):
        read_image(_declined_cases()["truncated pixel data"])


def test_never_raises_on_damage() -> None:
    """Truncated anywhere or with bytes flipped anywhere: None or a pydicom-equal answer."""
    data = _ct()
    rng = np.random.default_rng(7)
    for cut in range(0, len(data), 7):
        got = read_classic(data[:cut])
        assert got is None  # a cut file always lacks part of its pixel data
    for _ in range(400):
        damaged = bytearray(data)
        pos = int(rng.integers(0, len(data) - 96))  # the header, mostly
        damaged[pos] = int(rng.integers(0, 256))
        read_classic(bytes(damaged))  # must not raise


@pytest.mark.shared_data
def test_agrees_with_pydicom_on_the_shared_corpus(shared_data: Path) -> None:
    """Every file of ``data/dicom`` the fast reader accepts gives pydicom's values and frames."""
    accepted = declined = 0
    for path in sorted((shared_data / "dicom").rglob("*")):
        if not path.is_file() or path.stat().st_size > 64 * 2**20:
            continue
        data = path.read_bytes()
        if read_classic(data) is None:
            declined += 1
            continue
        try:
            _pydicom(data)
        except InputError:
            pytest.fail(f"fast reader accepted {path}, which decode_frames refuses")
        assert_same_as_pydicom(data)
        accepted += 1
    assert accepted > 100, (accepted, declined)
