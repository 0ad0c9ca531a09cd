"""pipeline.tensors.decode: every codec round-trips, 12-bit masking, quarantine errors."""

from __future__ import annotations

import csv
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pack_bits
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pipeline.enums import QuarantineReason
from pipeline.errors import InputError, MissingAttribute, UnreadableDicom
from pipeline.tensors.decode import (
    DEFLATED_IMAGE_FRAME,
    UndecodablePixelData,
    decode_frames,
    decode_frames_detail,
)

PHI_NAME = "Doe^Secret"
PHI_ID = "PID-31415926"


def _dataset(arr: np.ndarray, *, bits_stored: int | None = None) -> Dataset:
    """A native dataset holding ``arr`` as (frames, rows, cols[, samples])."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = PHI_NAME
    ds.PatientID = PHI_ID
    frames, rows, cols = arr.shape[:3]
    samples = arr.shape[3] if arr.ndim == 4 else 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    return ds


def _ramp(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -3000), min(info.max, 4000)
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)


def _decode(ds: Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_frames(ds)


# --------------------------------------------------------------------------------------------
# synthetic round trips
# --------------------------------------------------------------------------------------------

_CASES = [
    pytest.param((1, 64, 72), "uint8", id="u8"),  # openjpeg's encoder needs >= 64 x 64
    pytest.param((3, 64, 72), "uint16", id="u16-multiframe"),
    pytest.param((2, 64, 72), "int16", id="i16-signed"),
    pytest.param((2, 64, 72, 3), "uint8", id="rgb"),
]


@pytest.mark.parametrize(("shape", "dtype"), _CASES)
def test_native_round_trip(shape: tuple[int, ...], dtype: str) -> None:
    arr = _ramp(shape, dtype)
    out = _decode(_dataset(arr))
    assert out.shape == shape
    assert out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
@pytest.mark.parametrize(("shape", "dtype"), _CASES)
def test_lossless_codecs_round_trip(shape: tuple[int, ...], dtype: str, syntax: UID) -> None:
    arr = _ramp(shape, dtype, seed=1)
    ds = _dataset(arr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.compress(syntax, arr if arr.shape[0] > 1 else arr[0])
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        pytest.skip(f"no {syntax.name} encoder for this case: {type(exc).__name__}")
    assert ds.file_meta.TransferSyntaxUID == syntax
    out = _decode(ds)
    assert out.shape == shape
    np.testing.assert_array_equal(out, arr)


def test_lossy_jpeg2000_is_close() -> None:
    arr = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype("uint8")[None]
    ds = _dataset(arr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.compress(JPEG2000, arr[0], j2k_psnr=[50])
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        pytest.skip(f"no JPEG 2000 lossy encoder: {type(exc).__name__}")
    out = _decode(ds)
    assert out.shape == arr.shape
    err = np.abs(out.astype(int) - arr)
    assert err.mean() < 4
    assert err.max() <= 16


@pytest.mark.parametrize("bits_allocated", [1, 8, 16])
def test_deflated_image_frame_compression(bits_allocated: int) -> None:
    frames, rows, cols = 3, 7, 9  # 63 pixels: 1-bit frames are not byte aligned
    rng = np.random.default_rng(3)
    if bits_allocated == 1:
        arr = rng.integers(0, 1, size=(frames, rows, cols), endpoint=True).astype("uint8")
        ds = _dataset(arr)
        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit = 0
        raw_frames = [pack_bits(f.ravel()) for f in arr]
    else:
        arr = _ramp((frames, rows, cols), f"uint{bits_allocated}", seed=4)
        ds = _dataset(arr)
        raw_frames = [f.tobytes() for f in arr]
    deflated = []
    for raw in raw_frames:
        comp = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        deflated.append(comp.compress(raw) + comp.flush())
    ds.PixelData = encapsulate(deflated)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = DEFLATED_IMAGE_FRAME
    out, used = decode_frames_detail(ds)
    assert used == "pacsflow-deflate"
    np.testing.assert_array_equal(out, arr)


def test_12bit_unsigned_garbage_above_bits_stored_is_masked() -> None:
    stored = np.array([[[0x0F0F, 0xFFFF, 0x0123, 0x1FFF]]], dtype="uint16")
    out = _decode(_dataset(stored, bits_stored=12))
    np.testing.assert_array_equal(out, [[[0x0F0F, 0x0FFF, 0x0123, 0x0FFF]]])


def test_12bit_signed_is_sign_extended_from_high_bit() -> None:
    # dcm_qa_12bit README: stripes 0x0F0F and 0xFFFF are -241 and -1 as 12-bit signed
    stored = np.array([[[0x0F0F, 0xFFFF, 0x07FF, 0xF800, 0x0001]]], dtype="uint16")
    out = _decode(_dataset(stored.view("int16"), bits_stored=12))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [[[-241, -1, 2047, -2048, 1]]])


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def _assert_phi_free(exc: BaseException) -> None:
    text = str(exc)
    assert PHI_NAME not in text
    assert PHI_ID not in text
    assert "Doe" not in text


def test_undecodable_object_raises_quarantinable_phi_free_error() -> None:
    ds = _dataset(_ramp((1, 8, 8), "uint16"))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00garbage" * 8])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    with pytest.raises(UndecodablePixelData) as info:
        _decode(ds)
    err = info.value
    assert isinstance(err, UnreadableDicom)
    assert isinstance(err, InputError)
    assert err.reason is QuarantineReason.UNDECODABLE
    assert "JPEG 2000 Image Compression (Lossless Only)" in str(err)
    assert "pylibjpeg" in str(err)
    _assert_phi_free(err)


def test_unknown_transfer_syntax_is_undecodable() -> None:
    ds = _dataset(_ramp((1, 4, 4), "uint8"))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    with pytest.raises(UndecodablePixelData, match="no decoder") as info:
        _decode(ds)
    _assert_phi_free(info.value)


def test_truncated_native_pixel_data_is_quarantined_as_truncated() -> None:
    ds = _dataset(_ramp((1, 8, 8), "uint16"))
    ds.PixelData = ds.PixelData[:-10]
    with pytest.raises(UnreadableDicom) as info:
        _decode(ds)
    assert info.value.reason is QuarantineReason.TRUNCATED
    _assert_phi_free(info.value)


def test_size_mismatch_is_not_returned() -> None:
    ds = _dataset(_ramp((2, 8, 8), "uint8"))
    ds.compress(RLELossless, _ramp((2, 8, 8), "uint8"))
    ds.NumberOfFrames = 3  # header promises more than the pixel data holds
    with pytest.raises(UnreadableDicom) as info:
        _decode(ds)
    _assert_phi_free(info.value)


def test_no_pixel_data_is_missing_attribute() -> None:
    ds = _dataset(_ramp((1, 4, 4), "uint8"))
    del ds.PixelData
    with pytest.raises(MissingAttribute):
        _decode(ds)


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------

#: Objects pydicom 3.0.2 alone cannot decode (MANIFEST ``pixel_decode`` error) but pacsflow can.
_ALSO_DECODES = {
    "pydicom-data/data_store/data/liver_rle.dcm",
    "pydicom-data/data_store/data/liver_nonbyte_aligned_rle.dcm",
    "pydicom-data/data_store/data/liver_deflate.dcm",
    "pydicom-data/data_store/data/liver_nonbyte_aligned_deflate.dcm",
    "pydicom/pydicom/data/test_files/JPEG-lossy.dcm",
    "pylibjpeg-data/ljdata/ds/JPEGExtended/RG2_JPLY.dcm",
}
#: Same pixels in several lossless encodings: must decode identically.
_LOSSLESS_TWINS = [
    [
        f"dicom2nifti/tests/data/generic/{d}/001/IM-0001-000{i}-0001.dcm"
        for d in ("compressed", "compressed_jpeg", "compressed_jpegls", "compressed_rle")
    ]
    for i in range(1, 5)
] + [
    [
        f"pydicom-data/data_store/data/liver{s}.dcm"
        for s in ("", "_expb", "_j2k", "_rle", "_deflate")
    ],
    [
        f"pydicom-data/data_store/data/liver_nonbyte_aligned{s}.dcm"
        for s in ("", "_j2k", "_rle", "_deflate")
    ],
    ["pydicom-data/data_store/data/693_UNCR.dcm", "pydicom-data/data_store/data/693_J2KR.dcm"],
]
#: (lossy, reference, max abs difference)
_LOSSY_TWINS = [
    (
        "pydicom/pydicom/data/test_files/JPEG-lossy.dcm",
        "pydicom/pydicom/data/test_files/JPGExtended.dcm",
        1,
    ),
    (
        "pylibjpeg-data/ljdata/ds/JPEGExtended/RG2_JPLY.dcm",
        "pylibjpeg-data/ljdata/ds/JPEGExtended/RG2_JPLY_fixed.dcm",
        1,
    ),
]


def _read(root: Path, rel: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_frames(pydicom.dcmread(root / rel, force=True))


@pytest.mark.shared_data
@pytest.mark.slow
def test_every_decodable_real_object_decodes(shared_data: Path) -> None:
    root = shared_data / "dicom"
    with open(root / "MANIFEST.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "dicom"]
    todo = [r for r in rows if r["pixel_decode"].startswith("ok")]
    todo += [r for r in rows if r["relative_path"] in _ALSO_DECODES]
    assert len(todo) >= 590
    failed = []
    for row in todo:
        try:
            out = _read(root, row["relative_path"])
        except InputError as exc:
            failed.append(f"{row['relative_path']}: {exc}")
            continue
        frames = int(row["frames"] or 1)
        assert out.shape[:3] == (frames, int(row["rows"]), int(row["columns"])), row
    assert not failed, failed


@pytest.mark.shared_data
@pytest.mark.parametrize("group", _LOSSLESS_TWINS, ids=lambda g: Path(g[-1]).stem)
def test_lossless_twins_decode_identically(shared_data: Path, group: list[str]) -> None:
    root = shared_data / "dicom"
    ref = _read(root, group[0])
    for rel in group[1:]:
        np.testing.assert_array_equal(_read(root, rel), ref, err_msg=rel)


@pytest.mark.shared_data
@pytest.mark.parametrize(("lossy", "ref", "tol"), _LOSSY_TWINS)
def test_lossy_twins_are_close(shared_data: Path, lossy: str, ref: str, tol: int) -> None:
    root = shared_data / "dicom"
    a, b = _read(root, lossy), _read(root, ref)
    assert a.shape == b.shape
    assert np.abs(a.astype(np.int64) - b).max() <= tol


def _nifti_int16(path: Path) -> np.ndarray:
    """The int16 voxels of an uncompressed NIfTI-1 file, shaped (z, y, x)."""
    raw = path.read_bytes()
    dim = np.frombuffer(raw[40:56], "<i2")
    assert np.frombuffer(raw[70:72], "<i2")[0] == 4  # DT_INT16
    offset = int(np.frombuffer(raw[108:112], "<f4")[0])
    shape = tuple(int(d) for d in dim[1 : dim[0] + 1][::-1])
    return np.frombuffer(raw, "<i2", count=int(np.prod(shape)), offset=offset).reshape(shape)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("dcm", "nii"),
    [("12bitUnsigned", "2"), ("12bitUnsigned_0x0F0F", "3"), ("12bitSigned_0x0F0F", "4")],
)
def test_12bit_striped_matches_dcm2niix(shared_data: Path, dcm: str, nii: str) -> None:
    root = shared_data / "dicom" / "dcm_qa_12bit"
    mosaic = _read(root, f"In/{dcm}.dcm")[0]
    ref = _nifti_int16(root / "Ref" / f"{nii}.nii")  # 35 slices of 64 x 64, y flipped
    tiles = mosaic.reshape(6, 64, 6, 64).transpose(0, 2, 1, 3).reshape(36, 64, 64)[:35]
    np.testing.assert_array_equal(tiles.astype(np.int32), ref[:, ::-1, :].astype(np.int32))
    assert tiles.min() >= (-2048 if "Signed" in dcm else 0)
    assert tiles.max() <= (2047 if "Signed" in dcm else 4095)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("rel", "reason"),
    [
        (
            "pydicom/pydicom/data/test_files/JPEG2000-embedded-sequence-delimiter.dcm",
            QuarantineReason.UNDECODABLE,
        ),
        ("pydicom/pydicom/data/test_files/MR_truncated.dcm", QuarantineReason.TRUNCATED),
    ],
)
def test_real_undecodable_objects_are_quarantined(
    shared_data: Path, rel: str, reason: QuarantineReason
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(shared_data / "dicom" / rel, force=True)
        with pytest.raises(InputError) as info:
            decode_frames(ds)
    assert info.value.reason is reason
    assert str(ds.PatientID) not in str(info.value) or not str(ds.PatientID)
