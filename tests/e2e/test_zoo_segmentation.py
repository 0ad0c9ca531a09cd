"""The three 3D segmentation bundles of the model zoo, as published (random weights from their
own network_def), through `pacsflow infer` and `pacsflow writeback` into a folder (issue #22):
masks on the tensor grid, SEG frames on the original frames (each references its source SOP
Instance UID; read back, they equal the stored mask voxel for voxel), codes in SEG and SR
(TotalSegmentator's table, the registry, local codes), dciodvfy-clean objects, a corrected
mapping written back without re-running inference. Small synthetic CT (40 x 64 x 64, one series)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from bundle_factory import zoo_bundle
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.codes import LOCAL_SCHEME
from pipeline.lake import LakePaths, read_table
from pipeline.lake.arrays import load_tensor

SEED = 2222


def _cli(*args: str) -> str:
    """Run a pacsflow command in-process (the key: ``PACSFLOW_KEY_FILE``, set per module)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{args[0]}: {result.output[-3000:]}"
    return result.output


@pytest.fixture(scope="module")
def archive_lake(
    tmp_path_factory: pytest.TempPathFactory, session_key_file: Path
) -> Iterator[tuple[Path, Path]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PACSFLOW_KEY_FILE", str(session_key_file))
        mp.setenv("PACSFLOW__AUDIT__WITNESS", "none")
        yield _build_lake(tmp_path_factory)


def _write_ct(folder: Path, slices: int = 40, size: int = 64) -> None:
    """One small axial CT series (1.5 mm pixels, 2 mm slices: the spleen bundle's own grid, so
    its sliding window covers it once): air, a soft-tissue body and a dense organ-like blob."""
    from dicom_factory import make_ct, write

    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (size * 0.42)) ** 2 + ((xx - size / 2) / (size * 0.45)) ** 2 < 1
    for k in range(slices):
        ds = make_ct(number=k + 1, series_uid="1.2.826.0.1.3680043.8.498.71",
                     study_uid="1.2.826.0.1.3680043.8.498.72")  # fmt: skip
        hu = np.full((size, size), -1000, np.int16)
        hu[body] = 40
        if 10 <= k < 30:
            blob = ((yy - 24) ** 2 + (xx - 40) ** 2) < 100
            hu[blob] = 120
        ds.Rows = ds.Columns = size
        ds.PixelRepresentation = 1
        ds.PixelData = hu.astype(np.int16).tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.ImagePositionPatient = [-48.0, -48.0, 40.0 - 2.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.5, 1.5]
        ds.SliceThickness = 2.0
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.73"
        ds.PositionReferenceIndicator = ""
        ds.AccessionNumber = "A1"
        ds.ReferringPhysicianName = ""
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.SeriesDescription = "abdomen"
        ds.Manufacturer = "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        write(ds, folder / f"ct{k:03d}.dcm")


def _build_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("zoo-e2e")
    _write_ct(root / "archive" / "CT")
    config = root / "base.yaml"
    config.write_text(yaml.safe_dump({"compute": {"device": "cpu", "workers": 1}}))
    lake = str(root / "lake")
    _cli("init", "--lake", lake)
    _cli("crawl", "--source", str(root / "archive"), "--lake", lake, "--config", str(config))
    _cli("deid", "--lake", lake, "--config", str(config))
    _cli("tensors", "--lake", lake, "--config", str(config))
    return root, Path(lake)


def _run(
    archive_lake: tuple[Path, Path],
    tmp_path: Path,
    name: str,
    entry: dict[str, Any],
    **zoo: Any,
) -> dict[str, Any]:
    """Copy the lake, run `infer` then `writeback` with the bundle ``name``; what they made."""
    root, base = archive_lake
    lake = tmp_path / "lake"
    shutil.copytree(base, lake)
    bundle = zoo_bundle(name, tmp_path / "bundles", **zoo)
    registry = tmp_path / "models.yaml"
    body = {"bundle": str(bundle), "applies_to": "Modality = 'CT' AND volume_ok", **entry}
    registry.write_text(yaml.safe_dump({"models": {"zoo": body}}))
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "compute": {"device": "cpu", "workers": 1},
                "infer": {"model": "zoo", "registry": str(registry)},
            }
        )
    )
    t0 = time.perf_counter()
    _cli("infer", "--lake", str(lake), "--config", str(config))
    infer_s = time.perf_counter() - t0
    dest = tmp_path / "results"
    t0 = time.perf_counter()
    _cli("writeback", "--lake", str(lake), "--dest", str(dest), "--config", str(config))
    print(f"{name}: infer {infer_s:.1f} s, writeback {time.perf_counter() - t0:.1f} s")
    objects = [pydicom.dcmread(p) for p in sorted(dest.rglob("*")) if p.is_file()]
    return {
        "lake": LakePaths(lake),
        "registry": registry,
        "config": config,
        "dest": dest,
        "seg": [o for o in objects if o.Modality == "SEG"],
        "sr": [o for o in objects if o.Modality == "SR"],
        "archive": root / "archive",
    }


def _check(made: dict[str, Any], n_labels: int) -> tuple[Any, Any, list[dict[str, Any]]]:
    """One SEG + SR per CT volume; masks on the tensor grid; SEG frames on the original
    frames, equal to the mask; findings counts equal the SEG's; dciodvfy finds no error."""
    from pipeline.writeback.segread import read_seg
    from pipeline.writeback.stage import dciodvfy_errors

    lake = made["lake"]
    findings = read_table(lake, "findings").to_pylist()
    tensors = {t["tensor_key"]: t for t in read_table(lake, "tensors").to_pylist()}
    assert findings
    assert {f["model_entry"] for f in findings} == {"zoo"}
    assert all(f["type_code"] is None for f in findings)  # codes are applied at write-back
    keys = {f["tensor_key"] for f in findings}
    assert len(findings) == n_labels * len(keys)
    assert len(made["seg"]) == len(made["sr"]) == len(keys) == 1
    (key,) = keys
    tensor = tensors[key]
    mask = np.asarray(load_tensor(lake, findings[0]["mask_path"]))
    assert list(mask.shape) == list(tensor["shape"][:3])  # the tensor's grid
    seg, sr = made["seg"][0], made["sr"][0]
    # the original frames: the archive's own files, in the volume's slice order
    originals = {}
    for path in made["archive"].rglob("*"):
        if path.is_file() and path.suffix != ".json":
            ds = pydicom.dcmread(path, force=True)
            if ds.get("Modality") == "CT":
                originals[ds.SOPInstanceUID] = ds
    from pipeline.tensors.volume import build_volume

    series = [
        ds
        for ds in originals.values()
        if ds.SeriesInstanceUID == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    ]
    volume = build_volume(series)
    assert volume.array.shape[:3] == mask.shape
    for fg in seg.PerFrameFunctionalGroupsSequence:
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in originals  # each frame references an original source image
    by_value = {f["label"]: f for f in findings}
    got = read_seg(seg, volume)
    for _number, (label, seg_mask) in got.items():
        f = by_value[label]
        np.testing.assert_array_equal(seg_mask, mask == f["label_value"], err_msg=label)
        assert int(seg_mask.sum()) == f["voxel_count"]
    written = {label for label, _ in got.values()}
    assert written == {f["label"] for f in findings if f["voxel_count"]}  # none dropped
    for ds in (seg, sr):
        path = made["dest"] / f"check-{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], ds.Modality
        path.unlink()
    return seg, sr, findings


def _segment_codes(seg: Any) -> dict[str, tuple[str, str, str]]:
    out = {}
    for s in seg.SegmentSequence:
        t = s.SegmentedPropertyTypeCodeSequence[0]
        out[str(s.SegmentLabel)] = (str(t.CodeValue), str(t.CodingSchemeDesignator),
                                    str(t.CodeMeaning))  # fmt: skip
    return out


def test_spleen_one_label_and_a_corrected_mapping(
    archive_lake: tuple[Path, Path], tmp_path: Path
) -> None:
    made = _run(archive_lake, tmp_path, "spleen_ct_segmentation", {})
    seg, sr, _ = _check(made, 1)
    assert len(seg.SegmentSequence) == 1  # the single-segment SEG, and its SR
    assert _segment_codes(seg) == {"spleen": ("78961009", "SCT", "Spleen")}
    assert "Spleen" in str(sr)
    # a corrected mapping: write-back rebuilds with the new codes; inference is not rerun
    inferred = read_table(made["lake"], "findings").num_rows
    fixed = tmp_path / "fixed.csv"
    text = Path(__file__).resolve().parents[2].joinpath(
        "pipeline/codes/data/totalsegmentator_snomed_mapping.csv").read_text()  # fmt: skip
    fixed.write_text(text.replace("78961009,Spleen", "78961009,Spleen structure"))
    reg = yaml.safe_load(made["registry"].read_text())
    reg["models"]["zoo"]["code_table_paths"] = {"totalsegmentator": str(fixed)}
    made["registry"].write_text(yaml.safe_dump(reg))
    _cli("writeback", "--lake", str(made["lake"].root), "--dest", str(made["dest"]),
         "--config", str(made["config"]))  # fmt: skip
    segs = [pydicom.dcmread(p) for p in made["dest"].rglob("*") if p.is_file()]
    segs = [s for s in segs if s.Modality == "SEG"]
    assert len(segs) == 2  # the corrected one beside the first, in the same series
    assert len({s.SeriesInstanceUID for s in segs}) == 1
    meanings = {_segment_codes(s)["spleen"][2] for s in segs}
    assert meanings == {"Spleen", "Spleen structure"}
    assert read_table(made["lake"], "findings").num_rows == inferred


def test_wholebody_lowres_codes_from_totalsegmentator(
    archive_lake: tuple[Path, Path], tmp_path: Path
) -> None:
    made = _run(
        archive_lake, tmp_path, "wholeBody_ct_segmentation",
        {"overrides": {"displayable_configs#highres": False}}, weights="model_lowres.pt",
    )  # fmt: skip
    seg, _, _ = _check(made, 104)
    codes = _segment_codes(seg)
    assert codes
    assert all(scheme == "SCT" for _, scheme, _ in codes.values())
    assert "CodingSchemeIdentificationSequence" not in seg  # no local code needed
    print(f"wholeBody: {len(codes)} segments, {seg.NumberOfFrames} frames")


def test_swin_unetr_registry_and_local_codes(
    archive_lake: tuple[Path, Path], tmp_path: Path
) -> None:
    entry = {
        "drop": ["network_def#img_size"],
        "labels": {
            "Right Kidney": {
                "category": ["123037004", "SCT", "Anatomical Structure"],
                "type": ["64033007", "SCT", "Kidney"],
                "modifier": ["24028007", "SCT", "Right"],
            }
        },
    }
    made = _run(
        archive_lake, tmp_path, "swin_unetr_btcv_segmentation", entry,
        drop=("img_size",),
    )  # fmt: skip
    seg, _, _ = _check(made, 13)
    codes = _segment_codes(seg)
    sources = {
        "spleen": ("78961009", "SCT", "Spleen"),  # TotalSegmentator's, by name
        "Right Kidney": ("64033007", "SCT", "Kidney"),  # the registry's
    }
    for label, code in sources.items():
        if label in codes:
            assert codes[label] == code
    local = {k for k, v in codes.items() if v[1] == LOCAL_SCHEME}
    assert local, "BTCV's own names (e.g. 'Left Kideny') get local codes, not dropped"
    assert all(codes[k][2] == k for k in local)
    assert seg.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == LOCAL_SCHEME
    assert json.dumps(sorted(local))


THRESHOLD_NET = """
import torch
from torch import nn


class Threshold(nn.Module):
    \"\"\"Known answer: label 1 where the scaled input exceeds 0.5 (spleen's
    ScaleIntensityRanged maps -57..164 HU to 0..1: HU above 53.5).\"\"\"

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(40.0))

    def forward(self, x):
        d = self.gain * (x[:, :1] - 0.5)
        return torch.cat([-d, d], dim=1)
"""


def test_known_answer_mask_lands_on_the_original_frames(
    tmp_path: Path, session_key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spleen bundle's own preprocessing (Orientationd RAS, Spacingd 1.5 x 1.5 x 2 mm from
    0.9 x 0.8 x 2.5 mm voxels, its intensity window) and postprocessing (Invertd back, argmax)
    around a network whose answer is known (a threshold, pinned and approved): the mask on the
    tensor grid is the thresholded volume (interior and exterior exact, the resampled rim
    either way), and the SEG read back onto the original frames is that mask. An axis flipped
    or a spacing lost anywhere on the way moves the blob and fails."""
    from dicom_factory import make_ct, write
    from scipy import ndimage

    from pipeline.infer.bundle_config import content_hash
    from pipeline.infer.trust import TrustStore
    from pipeline.tensors.volume import build_volume
    from pipeline.writeback.segread import read_seg

    monkeypatch.setenv("PACSFLOW_KEY_FILE", str(session_key_file))
    monkeypatch.setenv("PACSFLOW__AUDIT__WITNESS", "none")
    archive = tmp_path / "archive" / "CT"
    archive.mkdir(parents=True)
    slices, rows, cols = 24, 56, 64
    kk, yy, xx = np.mgrid[:slices, :rows, :cols]
    hu = np.full((slices, rows, cols), 40, np.int16)
    blob = ((kk - 8) / 5.0) ** 2 + ((yy - 18) / 9.0) ** 2 + ((xx - 44) / 12.0) ** 2 < 1
    hu[blob] = 200  # off-centre in every axis: a flip would move it
    for k in range(slices):
        ds = make_ct(number=k + 1, series_uid="1.2.826.0.1.3680043.8.498.81",
                     study_uid="1.2.826.0.1.3680043.8.498.82")  # fmt: skip
        ds.Rows, ds.Columns = rows, cols
        ds.PixelRepresentation = 1
        ds.PixelData = hu[k].tobytes()
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.ImagePositionPatient = [-20.0, -30.0, 10.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.9]  # rows 0.8 mm apart, columns 0.9 mm
        ds.SliceThickness = 2.5
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.83"
        ds.PositionReferenceIndicator = ""
        ds.AccessionNumber = "A2"
        ds.ReferringPhysicianName = ""
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.Manufacturer = "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        write(ds, archive / f"ct{k:03d}.dcm")
    config = tmp_path / "run.yaml"
    bundle = zoo_bundle("spleen_ct_segmentation", tmp_path / "bundles")
    (bundle / "scripts").mkdir(exist_ok=True)
    (bundle / "scripts" / "__init__.py").write_text("")
    (bundle / "scripts" / "threshold.py").write_text(THRESHOLD_NET)
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    cfg["network_def"] = {"_target_": "scripts.threshold.Threshold"}
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4))
    import torch

    torch.save({"gain": torch.tensor(40.0)}, bundle / "models" / "model.pt")
    digest = content_hash(bundle)
    store = tmp_path / "trust.json"
    TrustStore(store).approve(digest, "known", bundle)
    registry = tmp_path / "models.yaml"
    entry = {"bundle": str(bundle), "bundle_sha256": digest, "applies_to": "Modality = 'CT'"}
    registry.write_text(yaml.safe_dump({"models": {"known": entry}}))
    config.write_text(yaml.safe_dump({
        "compute": {"device": "cpu", "workers": 1},
        "infer": {"model": "known", "registry": str(registry), "trust_store": str(store)},
    }))  # fmt: skip
    lake = str(tmp_path / "lake")
    _cli("init", "--lake", lake)
    _cli("crawl", "--source", str(tmp_path / "archive"), "--lake", lake, "--config", str(config))
    _cli("deid", "--lake", lake, "--config", str(config))
    _cli("tensors", "--lake", lake, "--config", str(config))
    _cli("infer", "--lake", lake, "--config", str(config))
    dest = tmp_path / "results"
    _cli("writeback", "--lake", lake, "--dest", str(dest), "--config", str(config))

    [finding] = read_table(LakePaths(Path(lake)), "findings").to_pylist()
    mask = np.asarray(load_tensor(LakePaths(Path(lake)), finding["mask_path"]))
    truth = hu > 53.5  # the tensor is the series in position order: k, rows, columns as written
    assert mask.shape == truth.shape
    inside = ndimage.binary_erosion(truth, iterations=2)
    outside = ~ndimage.binary_dilation(truth, iterations=2)
    assert mask[inside].all()  # the blob's interior, exactly where it was drawn
    assert not mask[outside].any()  # nothing elsewhere
    [seg] = [pydicom.dcmread(p) for p in dest.rglob("*") if p.is_file()
             and pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]  # fmt: skip
    originals = [pydicom.dcmread(p) for p in sorted(archive.glob("*.dcm"))]
    volume = build_volume(originals)
    [(_label, back)] = read_seg(seg, volume).values()
    np.testing.assert_array_equal(back, mask == 1)
