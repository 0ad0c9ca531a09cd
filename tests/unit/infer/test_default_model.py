"""The default model `models/ct_body_composition`: a valid offline bundle with small committed
weights, its quality on held-out real CT against TotalSegmentator's labels, and sensible
tissue volumes on pacsflow's synthetic CT, all run through pacsflow's own engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.infer.bundle import Bundle, load_bundle
from pipeline.infer.engine import Segmenter
from pipeline.infer.registry import default_models_dir, load_registry

BUNDLE = default_models_dir() / "ct_body_composition"
LUNG, BONE = 4, 3


def _evaluate_script() -> Any:
    """The bundle's ``scripts/evaluate.py``: the metric's definitions (which TotalSegmentator
    labels are lung and bone, and how its labels are put on a DICOM grid) live there once."""
    import importlib.util
    import sys

    name = "ct_body_composition_evaluate"
    if name in sys.modules:
        return sys.modules[name]
    path = BUNDLE / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle("ct_body_composition", models_dir=default_models_dir())


def _segment(bundle: Bundle, array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The label map, as ``pacsflow infer`` makes it (the registry's test-time augmentation)."""
    tta = load_registry().entry("ct_body_composition").test_time
    seg = Segmenter(
        bundle,
        device="cpu",
        batch_size=32,
        mirror_axes=tta.mirror_axes,
        transpose_xy=tta.transpose_xy,
    )
    ((_, labels),) = list(seg.segment([("v", lambda: (array, affine))]))
    return labels


def test_the_bundle_is_valid_offline_small_and_documented(bundle: Bundle) -> None:
    assert bundle.labels == {1: "soft_tissue", 2: "adipose_tissue", 3: "bone", 4: "lung"}
    assert bundle.spatial_dims == 2
    weights = BUNDLE / "models" / "model.pt"
    assert weights.stat().st_size < 5 * 2**20
    assert sum(p.numel() for p in bundle.network.parameters()) < 100_000
    provenance = json.loads((BUNDLE / "docs" / "provenance.json").read_text())
    assert provenance, "docs/provenance.json records data, commit and metrics"
    assert (BUNDLE / "docs" / "README.md").is_file()
    assert (BUNDLE / "LICENSE").is_file()


def test_sensible_on_a_synthetic_chest_ct(bundle: Bundle, tmp_path: Path) -> None:
    """pacsflow's synthetic chest CT (lungs, fat, bone in HU): the model's lung volume is
    within 10% of the phantom's ground truth, and every tissue is found."""
    import pydicom

    from pipeline.synth import synthesize
    from pipeline.tensors.volume import build_volumes

    result = synthesize(
        tmp_path / "a",
        patients=1,
        seed=11,
        ct_slices=48,
        rows=256,
        columns=256,
        include_mr=False,
        include_bad=False,
    )
    truth = json.loads(result.ground_truth.read_text())
    series = max((s for s in truth["series"] if s.get("tissues")), key=lambda s: s["n_instances"])
    files = [tmp_path / "a" / f for f in series["files"]]
    (vol,) = build_volumes([pydicom.dcmread(f) for f in files])
    labels = _segment(bundle, vol.array, vol.affine)
    voxel_ml = float(np.prod(vol.spacing)) / 1000
    lung_ml = float((labels == LUNG).sum()) * voxel_ml
    true_ml = series["tissues"]["lung"]["volume_ml"]
    assert abs(lung_ml - true_ml) / true_ml < 0.10, (lung_ml, true_ml)
    for value in (1, 2, 3, 4):
        assert (labels == value).any(), value


@pytest.mark.shared_data
def test_quality_on_held_out_real_ct(bundle: Bundle, shared_data: Path) -> None:
    """The held-out DICOM series (never trained on) against TotalSegmentator's labels:
    bone recall >= 0.80; lung Dice >= 0.90 where the reference has lung, and where it has none
    (this abdominal series) no more than a trace of lung predicted."""
    import pydicom

    from pipeline.tensors.volume import build_volume

    ev = _evaluate_script()
    folder = shared_data / ev.EVAL_DICOM
    vol = build_volume([pydicom.dcmread(p) for p in sorted(folder.iterdir())])
    labels = _segment(bundle, vol.array, vol.affine)
    class_map = json.loads((shared_data / ev.CLASS_MAP).read_text())["total"]
    ids = {name: int(k) for k, name in class_map.items()}
    grid = ev.CtVolume(
        name="held-out", hu=vol.array, affine_ras=vol.affine_ras, spacing=vol.spacing
    )
    ref = ev.labels_on_grid(shared_data / ev.EVAL_SEG, grid)  # checks the grids agree
    ref_bone = np.isin(ref, [ids[n] for n in ev.bone_names(class_map)])
    recall = float((ref_bone & (labels == BONE)).sum()) / float(ref_bone.sum())
    assert recall >= 0.80, recall
    ref_lung = np.isin(ref, [ids[n] for n in ev.LUNG_NAMES])
    pred_lung = labels == LUNG
    voxel_ml = float(np.prod(vol.spacing)) / 1000
    if ref_lung.sum():
        dice = 2 * float((ref_lung & pred_lung).sum()) / float(ref_lung.sum() + pred_lung.sum())
        assert dice >= 0.90, dice
    else:
        assert float(pred_lung.sum()) * voxel_ml < 25.0


@pytest.mark.shared_data
def test_lung_dice_on_held_out_lung_bases(bundle: Bundle, shared_data: Path) -> None:
    """The only real CT with reference lungs (TotalSegmentator's ``example_ct``: its lung bases,
    3 mm) was never read by training (the provenance says so): lung Dice >= 0.90 there."""
    ev = _evaluate_script()
    provenance = json.loads((BUNDLE / "docs" / "provenance.json").read_text())
    held_out = set(provenance["held_out"])
    assert {str(p) for p in ev.LUNG_BASES_FILES} <= held_out, held_out
    trained_on = {f["path"] for d in provenance["training_data"] for f in d.get("files", [])}
    assert not any("example_ct" in p for p in trained_on)
    volume = ev.load_nifti_ct(shared_data / ev.LUNG_CHECK_CT)
    labels = _segment(bundle, volume.hu, ev.lps_to_ras(volume.affine_ras))
    class_map = json.loads((shared_data / ev.CLASS_MAP).read_text())["total"]
    ids = {name: int(k) for k, name in class_map.items()}
    ref = ev.labels_on_grid(shared_data / ev.LUNG_CHECK_SEG, volume)
    ref_lung = np.isin(ref, [ids[n] for n in ev.LUNG_NAMES])
    pred_lung = labels == LUNG
    dice = 2 * float((ref_lung & pred_lung).sum()) / float(ref_lung.sum() + pred_lung.sum())
    assert dice >= 0.90, dice
