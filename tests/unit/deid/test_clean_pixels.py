"""Burned-in text removed from the pixels (issue #21 §5): cleaned with Burned In Annotation NO
and the Clean Pixel Data Option, or still quarantined with the reason (fail closed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.deid.verify import verify
from pipeline.lake import LakePaths, read_table
from pipeline.synth.burned_in import write_burned_in

KEY = b"p" * 32

needs_tesseract = pytest.mark.skipif(
    shutil.which("tesseract") is None,
    reason="tesseract not installed (apt-get install -y tesseract-ocr tesseract-ocr-eng)",
)


def _cfg(export: Path | None = None, **clean: object) -> object:
    deid: dict[str, object] = {"clean_pixels": {"enabled": True, **clean}}
    if export is not None:
        deid["export_dicom"] = str(export)
    return load_config(overrides={"compute": {"partition_size": 8}, "deid": deid}, environ={})


def _run(cfg: object, archive: Path, lake: LakePaths) -> object:
    crawl_run(cfg, lake, FolderSource(archive), run_id="c1")  # type: ignore[arg-type]
    return deid_run(cfg, lake, key=KEY, run_id="d1")  # type: ignore[arg-type]


def _deid_quarantine(lake: LakePaths) -> list[dict[str, object]]:
    return [r for r in read_table(lake, "quarantine").to_pylist() if r["stage"] == "deid"]


def test_missing_ocr_engine_keeps_objects_quarantined(tmp_path: Path) -> None:
    archive, truth = tmp_path / "a", tmp_path / "truth.json"
    write_burned_in(archive, truth, 2)
    lake = LakePaths(tmp_path / "lake")
    result = _run(_cfg(engine_path=str(tmp_path / "no" / "tesseract")), archive, lake)
    assert (result.counts.out, result.counts.quarantined) == (0, 2)  # type: ignore[attr-defined]
    rows = _deid_quarantine(lake)
    assert {r["reason"] for r in rows} == {"burned_in_phi"}
    assert all("OCR engine 'tesseract' is not installed" in str(r["message"]) for r in rows)


@needs_tesseract
def test_synthetic_burned_in_text_is_blacked_out_and_flagged(tmp_path: Path) -> None:
    archive, truth = tmp_path / "a", tmp_path / "truth.json"
    write_burned_in(archive, truth, 6)
    # the secondary-capture-like pages (index 2 and 5): text on a plain background
    keep = {"burned_in_0002.dcm", "burned_in_0005.dcm"}
    for path in archive.glob("*.dcm"):
        if path.name not in keep:
            path.unlink()
    boxes = json.loads(truth.read_text())
    lake, out = LakePaths(tmp_path / "lake"), tmp_path / "export"
    result = _run(_cfg(out), archive, lake)
    assert (result.counts.out, result.counts.quarantined) == (2, 0)  # type: ignore[attr-defined]
    assert verify(lake) == []
    vault = read_table(lake, "vault").to_pylist()
    assert all(json.loads(v["pixel_redactions"]) for v in vault)
    originals = {pydicom.dcmread(archive / n).SOPInstanceUID: n for n in keep}
    by_sop = {v["sop_pseudonym"]: originals[v["SOPInstanceUID"]] for v in vault}
    exported = sorted(out.rglob("*.dcm"))
    assert len(exported) == 2
    for path in exported:
        ds = pydicom.dcmread(path)
        assert ds.BurnedInAnnotation == "NO"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
        assert codes[0] == "113100"
        assert "113101" in codes
        arr = ds.pixel_array
        for box in boxes[by_sop[ds.SOPInstanceUID]]:
            region = arr[box["y0"] : box["y1"], box["x0"] : box["x1"]]
            assert np.all(region == 0), box["kind"]


@needs_tesseract
def test_deid_data_ultrasound_with_burned_in_yes_is_cleaned(
    shared_data: Path, tmp_path: Path
) -> None:
    src = shared_data / "dicom" / "deid-data" / "deid_data" / "data" / "ultrasounds"
    archive = tmp_path / "a"
    archive.mkdir()
    shutil.copy(src / "GREYSCALE_IMAGE.dcm", archive / "us.dcm")
    assert pydicom.dcmread(archive / "us.dcm").BurnedInAnnotation == "YES"
    lake, out = LakePaths(tmp_path / "lake"), tmp_path / "export"
    result = _run(_cfg(out), archive, lake)
    assert (result.counts.out, result.counts.quarantined) == (1, 0)  # type: ignore[attr-defined]
    assert verify(lake) == []
    (path,) = out.rglob("*.dcm")
    ds = pydicom.dcmread(path)
    assert ds.BurnedInAnnotation == "NO"
    assert "113101" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    # the top band's name, MRN, birth date and study date (boxes measured on the original)
    arr = ds.pixel_array
    for x0, x1 in ((9, 172), (184, 281), (433, 515), (824, 906)):
        assert np.all(arr[6:19, x0:x1] == 0), (x0, x1)


@needs_tesseract
def test_pydicom_ultrasounds_are_cleaned_or_quarantined_with_reason(
    shared_data: Path, tmp_path: Path
) -> None:
    files = ("examples_rgb_color.dcm", "examples_palette.dcm", "ExplVR_BigEnd.dcm")
    src = shared_data / "dicom" / "pydicom" / "pydicom" / "data" / "test_files"
    archive = tmp_path / "a"
    archive.mkdir()
    for name in files:
        shutil.copy(src / name, archive / name)
    lake, out = LakePaths(tmp_path / "lake"), tmp_path / "export"
    result = _run(_cfg(out), archive, lake)
    counts = result.counts  # type: ignore[attr-defined]
    assert (counts.out, counts.quarantined) == (2, 1)  # big endian is not cleaned
    for row in _deid_quarantine(lake):
        assert row["reason"] == "burned_in_phi"
        assert "quarantined" in str(row["message"])
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        assert ds.BurnedInAnnotation == "NO"
        assert ds.PhotometricInterpretation in ("RGB", "MONOCHROME2")
        assert ds.pixel_array.shape[:2] == (ds.Rows, ds.Columns)
    assert verify(lake) == []


def test_without_clean_pixels_burned_in_objects_stay_quarantined(tmp_path: Path) -> None:
    archive, truth = tmp_path / "a", tmp_path / "truth.json"
    write_burned_in(archive, truth, 1)
    lake = LakePaths(tmp_path / "lake")
    cfg = load_config(overrides={"compute": {"partition_size": 8}}, environ={})
    result = _run(cfg, archive, lake)
    assert result.counts.quarantined == 1  # type: ignore[attr-defined]
    assert "until a rule clears it" in str(_deid_quarantine(lake)[0]["message"])


@needs_tesseract
def test_tensors_of_cleaned_objects_carry_the_blackout(tmp_path: Path) -> None:
    """The tensors stage decodes the *source* object: without the vault's boxes, a cleaned
    secondary capture's tensor would carry the burned-in text its export no longer has."""
    from pipeline.tensors.stage import load_tensor
    from pipeline.tensors.stage import run as tensors_run

    archive, truth = tmp_path / "a", tmp_path / "truth.json"
    write_burned_in(archive, truth, 3)
    for path in archive.glob("*.dcm"):
        if path.name != "burned_in_0002.dcm":  # the SC-like page: text on a plain background
            path.unlink()
    lake, out = LakePaths(tmp_path / "lake"), tmp_path / "export"
    cfg = load_config(
        overrides={
            "compute": {"partition_size": 8, "workers": 1},
            "deid": {"clean_pixels": {"enabled": True}, "export_dicom": str(out)},
            "tensors": {"planar_modalities": ["OT", "SC", "US"]},
        },
        environ={},
    )
    _run(cfg, archive, lake)
    [vault] = read_table(lake, "vault").to_pylist()
    boxes = json.loads(vault["pixel_redactions"])
    assert boxes
    result = tensors_run(cfg, lake, run_id="t1")  # type: ignore[arg-type]
    assert result.counts.extra["volumes"] == 1
    [row] = [r for r in read_table(lake, "tensors").to_pylist() if r["status"] == "ok"]
    tensor = load_tensor(lake, row["path"])
    source = pydicom.dcmread(archive / "burned_in_0002.dcm").pixel_array
    [exported] = list(out.rglob("*.dcm"))
    cleaned = pydicom.dcmread(exported).pixel_array
    assert not np.array_equal(source, cleaned)
    assert np.array_equal(tensor.reshape(cleaned.shape), cleaned)  # the export's pixels
