"""Write a de-identified DICOMDIR with its record offsets rewritten.

A DICOMDIR links its directory records by byte offsets (PS3.10 7.3, PS3.3 F.3.2.1): the first
and last root records (0004,1200)/(0004,1202), and in each record the next sibling (0004,1400)
and the first child (0004,1420). De-identification changes element lengths, so the offsets of
the input no longer point at records. :func:`write_dicomdir` maps every offset of the input
(``seq_item_tell`` of each record as pydicom read it) to the same record's position in the
output: it encodes once to learn the new positions, sets the offsets (UL: lengths do not
change), and encodes again.
"""

from __future__ import annotations

import io
import warnings

import pydicom
from pydicom import Dataset

__all__ = ["write_dicomdir"]

_ROOT = (0x00041200, 0x00041202)
_LINKS = (0x00041400, 0x00041420)


def _positions(ds: Dataset) -> list[int]:
    return [int(getattr(item, "seq_item_tell", -1)) for item in ds.DirectoryRecordSequence]


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_dicomdir(original: Dataset, deidentified: Dataset) -> bytes:
    """Encode ``deidentified`` (a DICOMDIR de-identified from ``original``) with valid offsets.

    ``original`` must have been read from a file (pydicom records where each record began);
    records must be in the same order in both (the engine keeps them).

    Raises
    ------
    ValueError
        ``original`` has no record positions, or the record counts differ.
    """
    old = _positions(original)
    if len(old) != len(deidentified.DirectoryRecordSequence) or any(p < 0 for p in old):
        raise ValueError("the original DICOMDIR must be read from a file, records unchanged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = pydicom.dcmread(io.BytesIO(_encode(deidentified)))
    new = _positions(first)
    moved = dict(zip(old, new, strict=True))
    moved[0] = 0  # "no record"

    def fix(ds: Dataset, tag: int) -> None:
        if tag in ds and ds[tag].value is not None:
            ds[tag].value = moved.get(int(ds[tag].value), 0)

    for tag in _ROOT:
        fix(deidentified, tag)
    for item in deidentified.DirectoryRecordSequence:
        for tag in _LINKS:
            fix(item, tag)
    return _encode(deidentified)
