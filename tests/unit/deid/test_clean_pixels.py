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
from pipeline.deid.pixels import BurnedInText, clean_pixels
from pipeline.deid.stage import run as deid_run
from pipeline.deid.text_regions import find_text_regions
from pipeline.deid.verify import verify
from pipeline.lake import LakePaths, read_table
from pipeline.synth.burned_in import burned_in_object, write_burned_in

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
    # big endian is not cleaned; the colour-flow Doppler holds so many thin regions at
    # levels of their own (the flow's saturated colours) that text cannot be told from the
    # image: quarantined (fail closed); the palette fan is cleaned (32 % of it blacked out)
    assert (counts.out, counts.quarantined) == (1, 2)
    messages = sorted(str(row["message"]) for row in _deid_quarantine(lake))
    assert all(row["reason"] == "burned_in_phi" for row in _deid_quarantine(lake))
    assert sum("max_blackout" in m for m in messages) == 1, messages
    assert sum("Big Endian" in m for m in messages) == 1, messages
    # with the level detector off (the engine alone) they are cleaned, as before
    lake2, out2 = LakePaths(tmp_path / "lake2"), tmp_path / "export2"
    result = _run(_cfg(out2, detect_levels=False), archive, lake2)
    counts = result.counts  # type: ignore[attr-defined]
    assert (counts.out, counts.quarantined) == (2, 1)
    exported = [*out.rglob("*.dcm")]
    out = out2
    for path in [*out.rglob("*.dcm"), *exported]:
        ds = pydicom.dcmread(path)
        assert ds.BurnedInAnnotation == "NO"
        assert ds.PhotometricInterpretation in ("RGB", "MONOCHROME2")
        assert ds.pixel_array.shape[:2] == (ds.Rows, ds.Columns)
    assert verify(lake) == []
    assert verify(lake2) == []


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


# ------------------------------------------------------------------ text over speckle


def _boxes_black(arr: np.ndarray, boxes: list[dict[str, object]]) -> list[str]:
    """The ground-truth boxes of ``arr`` (frames first) that are not wholly black."""
    black = arr == 0 if arr.ndim == 3 else np.all(arr == 0, axis=-1)
    return [
        f"{b['kind']} frame {b['frame']}"
        for b in boxes
        if not np.all(black[b["frame"], b["y0"] : b["y1"], b["x0"] : b["x1"]])  # type: ignore[misc]
    ]


@needs_tesseract
def test_every_synthetic_token_box_is_blacked_out(tmp_path: Path) -> None:
    """Text drawn over the speckled fan is found by its level: every box black, none
    quarantined (the engine alone leaves 8 of these 35 boxes partly visible and quarantines
    the RGB object)."""
    archive, truth = tmp_path / "a", tmp_path / "truth.json"
    paths = write_burned_in(archive, truth, 5, seed=0)  # US x3 (one cine, one RGB), SC
    boxes = json.loads(truth.read_text())
    cfg = _cfg().deid.clean_pixels  # type: ignore[attr-defined]
    missed = []
    for path in paths:
        ds = pydicom.dcmread(path)
        clean_pixels(ds, cfg)  # raises (quarantine) where unsure: a failure here
        arr = ds.pixel_array
        arr = arr[None, ...] if int(ds.get("NumberOfFrames", 1) or 1) == 1 else arr
        missed += [f"{path.name}: {m}" for m in _boxes_black(arr, boxes[path.name])]
    assert missed == []


def _low_contrast_on_speckle() -> tuple[pydicom.Dataset, list[tuple[int, int, int, int]]]:
    """A frame of speckle edge to edge with a name and MRN drawn at grey 90 over it (the
    speckle's mean is 38 and it takes 90 itself often): the engine reads nothing there."""
    from PIL import Image, ImageDraw

    from pipeline.synth.burned_in import _dataset, _font, fonts
    from pipeline.synth.names import draw_identity

    rng = np.random.default_rng(7)
    speckle = np.clip(rng.rayleigh(30.0, size=(480, 640)), 0, 255).astype(np.uint8)
    img = Image.fromarray(speckle)
    draw = ImageDraw.Draw(img)
    font = _font(fonts()[-1], 16)
    boxes, x = [], 60
    for part in ("DOE,", "Jane", "MRN", "12345678"):
        box = draw.textbbox((x, 200), part, font=font)
        draw.text((x, 200), part, fill=90, font=font)
        boxes.append(tuple(int(v) for v in box))
        x = int(box[2]) + 6
    who = draw_identity(rng, index=0)
    frame = np.asarray(img)[None]
    return _dataset(0, 7, who, "US", "20200101", frame, False), boxes  # type: ignore[return-value]


@needs_tesseract
def test_low_contrast_text_on_speckle_is_cleaned_or_quarantined(tmp_path: Path) -> None:
    """Adversarial: never exported with the text. Through deid with export: either the
    exported pixels are black on every box, or the object is quarantined."""
    ds, boxes = _low_contrast_on_speckle()
    archive = tmp_path / "a"
    archive.mkdir()
    ds.save_as(archive / "adversarial.dcm", enforce_file_format=True)
    lake, out = LakePaths(tmp_path / "lake"), tmp_path / "export"
    result = _run(_cfg(out), archive, lake)
    counts = result.counts  # type: ignore[attr-defined]
    assert counts.out + counts.quarantined == 1
    for path in out.rglob("*.dcm"):
        arr = pydicom.dcmread(path).pixel_array
        for x0, y0, x1, y1 in boxes:
            assert np.all(arr[y0:y1, x0:x1] == 0), (x0, y0, x1, y1)
    # the engine alone exports it with the text: the case this guards
    cfg = _cfg(detect_levels=False).deid.clean_pixels  # type: ignore[attr-defined]
    alone, _ = _low_contrast_on_speckle()
    clean_pixels(alone, cfg)
    arr = alone.pixel_array
    assert not all(np.all(arr[y0:y1, x0:x1] == 0) for x0, y0, x1, y1 in boxes)


@needs_tesseract
def test_unreadable_text_region_quarantines_where_its_words_decide() -> None:
    """With match own_identifiers, a region found by its level that the engine cannot read
    cannot be told from an identifier: the object stays quarantined."""
    ds, _ = _low_contrast_on_speckle()
    # the engine's words on speckle (read with confidence below 95) count as texture here,
    # so that the region decides, not the engine's unsure reads of the speckle
    cfg = _cfg(  # type: ignore[attr-defined]
        match="own_identifiers", noise_confidence=95, min_confidence=95
    ).deid.clean_pixels
    with pytest.raises(BurnedInText, match=r"text-like region .* cannot read for sure"):
        clean_pixels(ds, cfg)


@needs_tesseract
def test_text_boxes_over_max_blackout_quarantine() -> None:
    ds, _ = burned_in_object(2, 0)  # the SC-like page
    cfg = _cfg(max_blackout=0.001).deid.clean_pixels  # type: ignore[attr-defined]
    with pytest.raises(BurnedInText, match="max_blackout"):
        clean_pixels(ds, cfg)


def test_level_detector_ignores_speckle_and_a_lookup_table_comb() -> None:
    """No text, no region: speckle, and a rescaled channel (every n-th level twice as
    frequent, as a lookup table leaves it)."""
    rng = np.random.default_rng(3)
    speckle = np.clip(rng.rayleigh(40.0, size=(480, 640)), 0, 255).astype(np.uint8)
    assert find_text_regions(speckle) == []
    comb = (speckle * 0.9).astype(np.uint8)
    assert find_text_regions(np.stack([speckle, speckle, comb], axis=-1)) == []
