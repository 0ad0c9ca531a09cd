"""The export's header read (pipeline.dicom.header.read_part10_header) against pydicom.

``stage.read_object(fast=True)`` must give the dataset ``dcmread(stop_before_pixels=True,
force=True)`` gives -- checked element by element (raw values, offsets, sequences, file meta,
encodings) and end to end (the de-identified Part 10 bytes and the pixel tail) -- on every
file of ``../shared/data/dicom``, on a synthetic archive with its broken objects, and on
truncated and damaged objects.
"""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicom_factory import make_ct
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.deid.core import Deidentifier
from pipeline.deid.encode import encode_part10
from pipeline.deid.keys import Pseudonymizer
from pipeline.deid.stage import read_object
from pipeline.dicom.header import read_part10_header

DEID = Deidentifier(Pseudonymizer(b"f" * 32), ("retain_long_modified_dates",))


def _state(ds: Any) -> list[Any]:
    out: list[Any] = []
    for tag, e in ds._dict.items():
        if isinstance(e, RawDataElement):
            out.append((tag, e.VR, e.length, e.value, e.value_tell, e.is_implicit_VR))
        elif e.VR == "SQ":
            items = [(i.file_tell, _state(i), i.original_encoding) for i in e.value]
            out.append((tag, "SQ", e.file_tell, e.value.is_undefined_length, items))
        else:
            out.append((tag, e.VR, e.value, e.file_tell))
    return out


def _read(data: bytes, fast: bool) -> Any:
    fp = io.BytesIO(data)
    try:
        ds, fp, tail = read_object(fp, True, fast=fast)
        state = (
            _state(ds),
            _state(ds.file_meta),
            ds.preamble,
            ds.original_encoding,
            ds.original_character_set,
            tail,
        )
        return state, encode_part10(DEID.deidentify(ds, in_place=True).dataset)
    except Exception as exc:
        return type(exc).__name__, str(exc)


def _same(data: bytes) -> bool:
    """Both reads agree (dataset state and de-identified bytes); whether the fast one took it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _read(data, True) == _read(data, False)
        return read_part10_header(io.BytesIO(data)) is not None


def test_equal_to_pydicom_on_every_shared_file(shared_data: Path) -> None:
    root = shared_data / "dicom"
    if not root.is_dir():
        pytest.skip(f"{root} not found: the real-corpus check of the fast read is skipped")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    taken = 0
    for path in files:
        try:
            taken += _same(path.read_bytes())
        except AssertionError:
            pytest.fail(f"fast read and pydicom differ on {path.relative_to(root)}")
    assert taken > 600, f"the fast read took only {taken} of {len(files)} files"


def test_equal_to_pydicom_on_a_synthetic_archive(tmp_path: Path) -> None:
    from pipeline.synth import synthesize

    synthesize(tmp_path, patients=1, seed=5, small=True, include_bad=True)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert sum(_same(p.read_bytes()) for p in files) >= len(files) // 2


def _object(implicit: bool) -> bytes:
    ds = make_ct(syntax="1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1")
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([item, item])
    ds.ReferencedImageSequence.is_undefined_length = True
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstitutionName = "Klinik Müller"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("implicit", [False, True])
def test_every_truncation_and_random_damage(implicit: bool) -> None:
    data = _object(implicit)
    assert _same(data)
    for cut in range(0, len(data) + 1, 3):
        try:
            _same(data[:cut])
        except AssertionError:
            pytest.fail(f"fast read and pydicom differ when cut at {cut} of {len(data)}")
    rng = random.Random(7)
    end = data.index(b"\xe0\x7f\x10\x00")
    for _ in range(300):
        damaged = bytearray(data)
        at = rng.randrange(128, end + 12)
        damaged[at] = rng.randrange(256)
        try:
            _same(bytes(damaged))
        except AssertionError:
            pytest.fail(f"fast read and pydicom differ with byte {at} set to {damaged[at]}")


def test_streams_and_offsets() -> None:
    """A stream that is not at its start, or not seekable, is left to pydicom."""
    data = _object(False)
    fp = io.BytesIO(b"xx" + data)
    fp.seek(2)
    assert read_part10_header(fp) is None
    ds = read_part10_header(io.BytesIO(data))
    assert ds is not None
    assert ds.SOPInstanceUID == pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
