"""pipeline.dicom.limits on a header read by the export's fast path."""

from __future__ import annotations

import io
from pathlib import Path

from pydicom.dataelem import RawDataElement

from pipeline.config import LimitsConfig
from pipeline.dicom.header import read_part10_header
from pipeline.dicom.limits import check_pixels
from pipeline.synth import synthesize


def test_check_pixels_leaves_raw_elements_raw(tmp_path: Path) -> None:
    """Found by bench/deid.py: the size check converted Rows, Columns, Samples per Pixel and
    Bits Allocated in the dataset, so the export encoded those four through pydicom (its
    encoding of a CT slice 40% slower)."""
    synthesize(tmp_path, patients=1, seed=3, ct_slices=2, rows=16, columns=16, include_bad=False)
    path = next(p for p in sorted(tmp_path.rglob("*")) if p.is_file() and p.suffix != ".json")
    ds = read_part10_header(io.BytesIO(path.read_bytes()))
    assert ds is not None
    tags = [0x00280010, 0x00280011, 0x00280002, 0x00280100]
    assert all(isinstance(ds._dict[t], RawDataElement) for t in tags)
    check_pixels(ds, LimitsConfig())
    assert all(isinstance(ds._dict[t], RawDataElement) for t in tags)
    assert (ds.Rows, ds.Columns) == (16, 16)
