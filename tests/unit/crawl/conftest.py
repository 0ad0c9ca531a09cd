"""The crawl tests' archive: valid objects with odd names, and every kind of bad one."""

from __future__ import annotations

from pathlib import Path

import pytest
from dicom_factory import make_ct, write
from pydicom.uid import ImplicitVRLittleEndian, RLELossless


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """Five good objects (odd names, nested, no-preamble, RLE), six bad ones, one link."""
    root = tmp_path / "archive"
    write(make_ct(number=1), root / "P1" / "ST1" / "SE1" / "IM_0001")
    write(make_ct(number=2), root / "P1" / "ST1" / "SE1" / "i123.MRDC.4")
    write(make_ct(number=3), root / "P1" / "ST1" / "SE1" / "x.img")
    write(make_ct(number=4, syntax=ImplicitVRLittleEndian), root / "P1" / "noext", preamble=False)
    write(make_ct(number=5, syntax=RLELossless), root / "P2" / "rle.dcm")
    # bad ones
    (root / "bad").mkdir()
    (root / "bad" / "notes.txt").write_text("not an image\n" * 20)
    (root / "bad" / "empty").write_bytes(b"")
    full = write(make_ct(number=6), root / "bad" / "whole.dcm").read_bytes()
    (root / "bad" / "whole.dcm").unlink()
    (root / "bad" / "truncated.dcm").write_bytes(full[:-40])
    rle = write(make_ct(number=7, syntax=RLELossless), root / "bad" / "rle.dcm").read_bytes()
    (root / "bad" / "rle.dcm").unlink()
    (root / "bad" / "rle_truncated.dcm").write_bytes(rle[:-30])
    no_uid = make_ct(number=8)
    del no_uid.SeriesInstanceUID
    write(no_uid, root / "bad" / "no_series_uid.dcm")
    # a dot name is an entry like any other (here not DICOM), and a symlink loop that must not
    # hang the walk (a link inside the root: skipped and counted)
    (root / ".hidden").write_text("x")
    (root / "P1" / "loop").symlink_to(root)
    return root
