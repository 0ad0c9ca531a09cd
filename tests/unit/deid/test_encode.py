"""The fast Part 10 encoder writes exactly the bytes pydicom's ``save_as`` writes."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import pydicom
import pytest
from dicom_factory import make_ct, with_file_meta
from pydicom import Dataset
from pydicom.sequence import Sequence

from pipeline.deid.core import Deidentifier
from pipeline.deid.encode import encode_part10
from pipeline.deid.keys import Pseudonymizer

DEID = Deidentifier(
    Pseudonymizer(b"e" * 32), ("retain_long_modified_dates", "retain_patient_characteristics")
)


def _reference(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    out = DEID.deidentify(ds, in_place=True).dataset
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _fast(data: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    return encode_part10(DEID.deidentify(ds, in_place=True).dataset)


def _encoded(ds: Dataset, syntax: str) -> bytes:
    ds = with_file_meta(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    "syntax",
    ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"],
    ids=["explicit-le", "implicit-le", "explicit-be", "deflated"],
)
def test_same_bytes_as_pydicom(syntax: str) -> None:
    ds = make_ct(number=3, series_uid="1.2.826.0.1.3680043.8.498.5")
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.6"
    ds.ReferencedImageSequence = Sequence([item])
    ds.ConvolutionKernel = "B30f"
    ds.add_new(0x00091010, "LO", "ACME CREATOR")
    ds.add_new(0x00091001, "LO", "private value")
    ds.ImageComments = "free text about Jane"
    data = _encoded(ds, syntax)
    assert _fast(data) == _reference(data)


def test_empty_and_odd_values_and_undefined_length_sequences() -> None:
    ds = make_ct(number=1, series_uid="1.2.826.0.1.3680043.8.498.8")
    ds.PatientWeight = None
    ds.SeriesDescription = ""
    seq = Dataset()
    seq.CodeValue, seq.CodingSchemeDesignator, seq.CodeMeaning = "T-D0050", "SRT", "Tissue"
    ds.AnatomicRegionSequence = Sequence([seq])
    data = _encoded(ds, "1.2.840.10008.1.2.1")
    # re-read with undefined-length sequences, as many modalities write them
    ds2 = pydicom.dcmread(io.BytesIO(data))
    ds2["AnatomicRegionSequence"].is_undefined_length = True
    buf = io.BytesIO()
    ds2.save_as(buf, enforce_file_format=True)
    assert _fast(buf.getvalue()) == _reference(buf.getvalue())


def _real_files(shared_data: Path) -> list[tuple[str, Path]]:
    """(MANIFEST path, file) of every DICOM file of ../shared/data/dicom."""
    root = shared_data / "dicom"
    with (root / "MANIFEST.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "dicom"]
    return [(r["relative_path"], root / r["relative_path"]) for r in rows]


@pytest.mark.shared_data
def test_same_bytes_as_pydicom_on_every_real_file(shared_data: Path) -> None:
    checked = 0
    for name, path in _real_files(shared_data):
        if not path.exists():
            continue
        data = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                want = _reference(data)
            except Exception:  # files the engine or pydicom cannot write either way
                continue
            assert _fast(data) == want, name
        checked += 1
    assert checked >= 500


def _tail_path(path: Path, out: Path) -> bytes | None:
    """The stage's export of a file: header only, pixel data copied as bytes (None: it would
    read the whole file instead)."""
    from pipeline.deid.encode import pixel_tail, tail_encoding, write_with_tail

    with path.open("rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        enc = tail_encoding(ds)
        tail = pixel_tail(fp, *enc) if enc is not None else None
        if tail is None:
            return None
        header = encode_part10(DEID.deidentify(ds, in_place=True).dataset)
        write_with_tail(out, header, fp, tail)
    return out.read_bytes()


def test_pixel_data_copied_as_bytes_gives_the_same_file(tmp_path: Path) -> None:
    ds = make_ct(number=2, series_uid="1.2.826.0.1.3680043.8.498.9")
    src = tmp_path / "ct.dcm"
    src.write_bytes(_encoded(ds, "1.2.840.10008.1.2.1"))
    assert _tail_path(src, tmp_path / "out.dcm") == _fast(src.read_bytes())
    # an element after the pixel data: not a tail, the whole file is read instead
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 4)  # Data Set Trailing Padding
    src.write_bytes(_encoded(ds, "1.2.840.10008.1.2.1"))
    assert _tail_path(src, tmp_path / "out2.dcm") is None


@pytest.mark.shared_data
def test_pixel_tail_export_equals_the_full_read_on_real_files(
    shared_data: Path, tmp_path: Path
) -> None:
    tails = 0
    for name, path in _real_files(shared_data):
        if not path.exists():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                want = _fast(path.read_bytes())
                got = _tail_path(path, tmp_path / "out.dcm")
            except Exception:
                continue
        if got is not None:
            assert got == want, name
            tails += 1
    assert tails >= 400
