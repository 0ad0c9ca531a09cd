"""Evaluate the ct_body_composition bundle on held-out real CT and on a synthetic chest phantom.

Run from the repository root::

    .venv/bin/python models/ct_body_composition/scripts/evaluate.py
    .venv/bin/python models/ct_body_composition/scripts/evaluate.py --json metrics.json

The bundle runs exactly as pacsflow runs it (the input contract of ``docs/README.md``): a
volume in HU as a ``MetaTensor`` (1, X, Y, Z) with its RAS affine, the bundle's
``preprocessing`` (parsed from ``configs/inference.json`` with ``monai.bundle.ConfigParser``),
the network on the axial slices in batches, then ``postprocessing`` back to the input grid.

Measured:

1. **Held-out real CT**: TotalSegmentator's ``example_ct_dicom`` (20 DICOM slices, JPEG 2000,
   never used in training), read with pydicom and :func:`pipeline.tensors.volume.build_volumes`,
   against TotalSegmentator's ``example_seg_dicom.nii.gz`` (task "total"; lung = the five lobes,
   bone = :data:`BONE_NAMES`). The label NIfTI is brought onto the DICOM grid through the affines
   and the grids must agree (shape, and affine within :data:`GRID_TOL_MM`) before comparing.
   Reported: lung Dice, bone recall (fraction of TotalSegmentator's bone voxels predicted bone),
   bone precision, for the model and for :func:`pipeline.infer.hu_rules.hu_labels` alone.
2. **Lung bases**: ``example_ct_sm.nii.gz`` (3 mm; the top 30 slices of ``example_ct.nii.gz``)
   against TotalSegmentator's ``example_seg.nii.gz``, because the held-out DICOM series holds no
   lung in TotalSegmentator's labels (it is upper abdomen). The lung Dice goal is judged here:
   ``train.py`` holds this scan out (say ``--lung-bases-trained`` for weights of
   ``train.py --train-on-lung-bases``, which trained on it).
3. **Synthetic chest phantom** (:class:`pipeline.synth.core.ChestPhantom`, a seed never used in
   training): predicted lung volume (mL) against the phantom's true lung volume (voxels labelled
   ``CTLabel.LUNG``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import torch
from monai.bundle.config_parser import ConfigParser
from monai.data.meta_tensor import MetaTensor

from pipeline.infer.bundle import Bundle as PipelineBundle
from pipeline.infer.bundle import load_bundle
from pipeline.infer.engine import Segmenter
from pipeline.infer.hu_rules import BONE, LUNG, hu_labels
from pipeline.infer.registry import load_registry
from pipeline.synth.core import (
    CT_NOISE_BOUND,
    LESION_LABEL_BASE,
    ChestPhantom,
    CTLabel,
    Geometry,
    Lesion,
)
from pipeline.tensors.volume import build_volumes, lps_to_ras

BUNDLE_DIR: Final = Path(__file__).resolve().parents[1]
#: the model's name in pacsflow's registry (``configs/models.yaml``)
MODEL_NAME: Final = "ct_body_composition"
REPO_ROOT: Final = BUNDLE_DIR.parents[1]
#: the bundle's weights
MODEL_PATH: Final = BUNDLE_DIR / "models" / "model.pt"
#: the shared real data (read-only), beside the repository
DATA_ROOT: Final = REPO_ROOT.parent / "shared" / "data"
TS_DIR: Final = Path("labeled-ct/totalsegmentator")
TS_REFERENCE: Final = TS_DIR / "tests/reference_files"
#: the held-out series and TotalSegmentator's labels of it
EVAL_DICOM: Final = TS_REFERENCE / "example_ct_dicom"
EVAL_SEG: Final = TS_REFERENCE / "example_seg_dicom.nii.gz"
#: the lung check: the only real CT with TotalSegmentator lung labels
LUNG_CHECK_CT: Final = TS_REFERENCE / "example_ct_sm.nii.gz"
LUNG_CHECK_SEG: Final = TS_REFERENCE / "example_seg.nii.gz"
#: the files of that scan (``example_ct_sm`` is the top of ``example_ct``)
LUNG_BASES_FILES: Final = (TS_REFERENCE / "example_ct.nii.gz", LUNG_CHECK_CT)
CLASS_MAP: Final = TS_DIR / "class_map.json"

#: TotalSegmentator "total" labels counted as lung
LUNG_NAMES: Final = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)
#: TotalSegmentator "total" labels counted as bone besides ``vertebrae_*`` and ``rib_*``
#: (costal cartilages are not bone here)
OTHER_BONE_NAMES: Final = (
    "sacrum",
    "sternum",
    "hip_left",
    "hip_right",
    "femur_left",
    "femur_right",
    "humerus_left",
    "humerus_right",
    "scapula_left",
    "scapula_right",
    "clavicula_left",
    "clavicula_right",
    "skull",
)
#: largest difference (mm) between the affines of two grids that are the same grid
GRID_TOL_MM: Final = 1e-3
#: slices per network batch
BATCH: Final = 16
#: seed of the evaluation phantom (training phantoms use other seeds)
EVAL_PHANTOM_SEED: Final = 9001
#: quality goals
GOAL_LUNG_DICE: Final = 0.90
GOAL_BONE_RECALL: Final = 0.80
GOAL_PHANTOM_LUNG_REL_ERR: Final = 0.10

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint8]
Affine = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CtVolume:
    """A CT volume in pacsflow's layout.

    ``hu`` is (slices, rows, columns) in HU; ``affine_ras`` maps the voxel index of
    ``hu.transpose(2, 1, 0)`` (column, row, slice) to RAS mm; ``spacing`` is (slice, row, column)
    mm.
    """

    name: str
    hu: FloatArray
    affine_ras: Affine
    spacing: tuple[float, float, float]


def bone_names(class_map: dict[str, str]) -> list[str]:
    """The names of ``class_map`` (TotalSegmentator "total") that are counted as bone."""
    return [
        n
        for n in class_map.values()
        if n.startswith(("vertebrae_", "rib_")) or n in OTHER_BONE_NAMES
    ]


def load_dicom_series(folder: Path) -> CtVolume:
    """The one volume of the DICOM series in ``folder`` (pydicom + ``build_volumes``)."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    volumes = build_volumes(datasets)
    if len(volumes) != 1:
        raise ValueError(f"{folder}: {len(volumes)} volumes, expected one")
    vol = volumes[0]
    return CtVolume(
        name=folder.name,
        hu=np.asarray(vol.array, dtype=np.float32),
        affine_ras=vol.affine_ras,
        spacing=vol.spacing,
    )


def load_nifti_ct(path: Path) -> CtVolume:
    """A NIfTI CT reoriented to the DICOM axial layout (columns to L, rows to P, slices to S).

    The result is what pacsflow would hold for the same scan read from DICOM.
    """
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image)
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt("LPS")
    )
    img = img.as_reoriented(ornt)
    data = np.asarray(img.dataobj, dtype=np.float32)  # (X, Y, Z)
    zooms = img.header.get_zooms()
    return CtVolume(
        name=path.name,
        hu=np.ascontiguousarray(data.transpose(2, 1, 0)),
        affine_ras=np.asarray(img.affine, dtype=np.float64),
        spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
    )


def labels_on_grid(path: Path, volume: CtVolume) -> npt.NDArray[np.int32]:
    """A label NIfTI resampled (by axis flips/permutations only) onto ``volume``'s grid.

    Raises:
        ValueError: the grids differ (shape, or affine by more than :data:`GRID_TOL_MM`).
    """
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image)
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(img.affine),
        nib.orientations.io_orientation(volume.affine_ras),
    )
    img = img.as_reoriented(ornt)
    shape = volume.hu.shape[::-1]
    if tuple(img.shape) != shape:
        raise ValueError(f"{path.name}: shape {img.shape} != volume {shape}")
    diff = float(np.abs(np.asarray(img.affine) - volume.affine_ras).max())
    if diff > GRID_TOL_MM:
        raise ValueError(f"{path.name}: affine differs from the volume's by {diff:.4g} mm")
    data = np.asarray(img.dataobj).astype(np.int32)
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def as_metatensor(volume: CtVolume) -> MetaTensor:
    """The input contract: (1, X, Y, Z) float32 HU with the RAS affine."""
    arr = volume.hu.transpose(2, 1, 0)[None].astype(np.float32)
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(arr)), affine=torch.from_numpy(volume.affine_ras)
    )


class Bundle:
    """The bundle's network, preprocessing and postprocessing, as pacsflow runs them."""

    def __init__(self, weights: Path | None, bundle_dir: Path = BUNDLE_DIR) -> None:
        """Build the bundle's pieces; ``weights`` is a ``model.pt``, or ``None`` (untrained)."""
        self.bundle_dir = bundle_dir
        self.weights = weights
        self.test_time = load_registry().entry(MODEL_NAME).test_time
        parser = ConfigParser()
        parser.read_config(str(bundle_dir / "configs" / "inference.json"))
        self.network: torch.nn.Module = parser.get_parsed_content("network_def")
        self.preprocessing: Any = parser.get_parsed_content("preprocessing")
        self.postprocessing: Any = parser.get_parsed_content("postprocessing")
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.network.load_state_dict(state)
        self.network.eval()

    def preprocess(self, volume: CtVolume) -> MetaTensor:
        """The preprocessed image, (1, 256, 256, Z)."""
        d = self.preprocessing({"image": as_metatensor(volume)})
        image: MetaTensor = d["image"]
        return image

    @torch.no_grad()
    def logits(self, image: MetaTensor, batch: int = BATCH) -> torch.Tensor:
        """Network logits of a preprocessed image, (Z, 5, 256, 256)."""
        x = image.as_tensor().permute(3, 0, 1, 2)
        return torch.cat([self.network(x[i : i + batch]) for i in range(0, x.shape[0], batch)])

    def segment(self, volume: CtVolume) -> LabelArray:
        """Labels of ``volume`` on its own grid, (slices, rows, columns): pacsflow's engine
        (:class:`pipeline.infer.engine.Segmenter`) with this network and the registry's
        test-time augmentation for the model (``configs/models.yaml``)."""
        segmenter = Segmenter(
            self.pipeline_bundle,
            device="cpu",
            batch_size=BATCH,
            mirror_axes=self.test_time.mirror_axes,
            transpose_xy=self.test_time.transpose_xy,
        )
        affine_lps = lps_to_ras(volume.affine_ras)  # the flip is its own inverse
        ((_, labels),) = list(segmenter.segment([(volume.name, lambda: (volume.hu, affine_lps))]))
        return labels

    @functools.cached_property
    def pipeline_bundle(self) -> PipelineBundle:
        """pacsflow's loaded bundle (:func:`pipeline.infer.bundle.load_bundle`) with this
        network (and so these weights) in place of the committed ones; loaded once."""
        loaded = load_bundle(self.bundle_dir, models_dir=self.bundle_dir.parent)
        digest = "untrained" if self.weights is None else f"sha256:{sha256(self.weights)}"
        return dataclasses.replace(loaded, network=self.network, weights_sha256=digest)


# ------------------------------------------------------------------------------ phantom


def phantom_for_seed(seed: int, *, lesions: bool = True) -> ChestPhantom:
    """A chest phantom with the parameter ranges of pacsflow's synthetic archive."""
    rng = np.random.default_rng(seed)
    phantom = ChestPhantom(
        origin=(0.0, 0.0, 0.0),
        thorax_length=float(rng.uniform(260, 320)),
        body_a=float(rng.uniform(150, 172)),
        body_b=float(rng.uniform(100, 122)),
        fat=float(rng.uniform(8, 26)),
        wall=float(rng.uniform(15, 19)),
        rib_pitch=float(rng.uniform(22, 28)),
        rib_width=float(rng.uniform(8, 11)),
        rib_depth=float(rng.uniform(7, 9)),
        vertebra_radius=float(rng.uniform(15, 19)),
        lung_hu=int(rng.integers(-870, -829)),
        adipose_hu=int(rng.integers(-110, -89)),
        soft_hu=40,
        bone_hu=int(rng.integers(650, 751)),
    )
    if not lesions:
        return phantom
    # one lesion in the middle of each lung
    t = phantom.thorax_length
    a0 = phantom.body_a - phantom.fat - phantom.wall
    b0 = phantom.body_b - 0.8 * phantom.fat - phantom.wall
    found = tuple(
        Lesion(
            centre=(side * 0.44 * a0, -0.05 * b0, -0.47 * t + side * 20.0),
            radius=float(rng.uniform(5, 12)),
            value=int(rng.integers(65, 121)),
        )
        for side in (-1.0, 1.0)
    )
    return ChestPhantom(**{**phantom.__dict__, "lesions": found})


def render_phantom(
    phantom: ChestPhantom,
    *,
    size: int,
    fov_mm: float,
    step_mm: float,
    seed: int,
    below_mm: float = 20.0,
) -> tuple[CtVolume, LabelArray]:
    """An axial CT of the whole thorax of ``phantom`` and its ground-truth labels.

    The volume runs from ``below_mm`` under the thorax to 30 mm above it. The HU are the
    phantom's tissue values plus Gaussian noise (sigma 8 HU, clipped to ``CT_NOISE_BOUND``),
    as pacsflow's synthetic CT; the labels are ``ChestPhantom.labels``.
    """
    t = phantom.thorax_length
    ox, oy, oz = phantom.origin
    z_lo, z_hi = oz - t - below_mm, oz + 30.0
    slices = math.floor((z_hi - z_lo) / step_mm) + 1
    dx = fov_mm / size
    first = (ox - (size - 1) / 2 * dx, oy - (size - 1) / 2 * dx, z_lo)
    geometry = Geometry.volume(
        rows=size,
        columns=size,
        pixel_spacing=(dx, dx),
        slice_thickness=step_mm,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        first_position=first,
        slice_step=step_mm,
        slices=slices,
    )
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    chunk = max(1, (1 << 22) // (size * size))
    for start in range(0, slices, chunk):
        stop = min(slices, start + chunk)
        x, y, z = geometry.slab_coordinates(start, stop)
        labels[start:stop] = phantom.labels(x, y, z, (stop - start, size, size))
    table = np.asarray(phantom.value_table(), dtype=np.float32)
    rng = np.random.default_rng(seed)
    noise = np.clip(np.rint(rng.standard_normal(labels.shape, dtype=np.float32) * 8.0), -9, 9)
    assert CT_NOISE_BOUND == 9
    hu = table[labels] + noise.astype(np.float32)
    affine = geometry.affine()
    assert affine is not None
    volume = CtVolume(
        name=f"chest_phantom_seed{seed}",
        hu=hu.astype(np.float32),
        affine_ras=lps_to_ras(np.asarray(affine, dtype=np.float64)),
        spacing=(step_mm, dx, dx),
    )
    return volume, labels


# ------------------------------------------------------------------------------ metrics


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float | None:
    """Dice of two masks; ``None`` when both are empty (undefined)."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


def compare_with_totalsegmentator(
    pred: LabelArray, ref: npt.NDArray[np.int32], class_map: dict[str, str], voxel_ml: float
) -> dict[str, Any]:
    """Lung Dice and bone recall/precision of ``pred`` against TotalSegmentator labels."""
    ids = {name: int(k) for k, name in class_map.items()}
    ref_lung = np.isin(ref, [ids[n] for n in LUNG_NAMES])
    ref_bone = np.isin(ref, [ids[n] for n in bone_names(class_map)])
    lung, bone = pred == LUNG, pred == BONE
    hit = int((bone & ref_bone).sum())
    per_bone: dict[str, float] = {}
    for group, prefix in (("vertebrae", "vertebrae_"), ("ribs", "rib_"), ("humeri", "humerus_")):
        m = np.isin(ref, [v for n, v in ids.items() if n.startswith(prefix)])
        if m.any():
            per_bone[group] = round(float(bone[m].mean()), 4)
    return {
        "lung_dice": dice(lung, ref_lung),
        "lung_ref_ml": round(float(ref_lung.sum()) * voxel_ml, 2),
        "lung_pred_ml": round(float(lung.sum()) * voxel_ml, 2),
        "bone_recall": round(hit / int(ref_bone.sum()), 4) if ref_bone.any() else None,
        "bone_precision": round(hit / int(bone.sum()), 4) if bone.any() else None,
        "bone_recall_by_group": per_bone,
        "bone_ref_ml": round(float(ref_bone.sum()) * voxel_ml, 2),
        "bone_pred_ml": round(float(bone.sum()) * voxel_ml, 2),
    }


def class_agreement(a: LabelArray, b: LabelArray) -> dict[str, float | None]:
    """Per-class Dice between two label maps (model against rules)."""
    names = ("soft_tissue", "adipose_tissue", "bone", "lung")
    return {
        n: (None if (d := dice(a == i, b == i)) is None else round(d, 4))
        for i, n in enumerate(names, start=1)
    }


def _versus_totalsegmentator(
    volume: CtVolume, ref: npt.NDArray[np.int32], bundle: Bundle, class_map: dict[str, str]
) -> dict[str, Any]:
    """The model's and the HU rules' lung and bone numbers on one volume."""
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    model = bundle.segment(volume)
    rules = hu_labels(volume.hu, volume.spacing)
    out: dict[str, Any] = {
        "shape": list(volume.hu.shape),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "model": compare_with_totalsegmentator(model, ref, class_map, voxel_ml),
        "hu_rules": compare_with_totalsegmentator(rules, ref, class_map, voxel_ml),
        "model_vs_rules_dice": class_agreement(model, rules),
    }
    for key in ("model", "hu_rules"):
        d = out[key]
        if d["lung_dice"] is None:
            d["lung_note"] = "no lung in TotalSegmentator's labels nor in the prediction: undefined"
        else:
            d["lung_dice"] = round(d["lung_dice"], 4)
    return out


def _synthetic(bundle: Bundle) -> dict[str, Any]:
    """Lung volume on the evaluation phantom, model and HU rules against the truth."""
    phantom = phantom_for_seed(EVAL_PHANTOM_SEED)
    volume, truth = render_phantom(
        phantom, size=512, fov_mm=400.0, step_mm=2.5, seed=EVAL_PHANTOM_SEED
    )
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    true_lung = truth == CTLabel.LUNG
    true_ml = float(true_lung.sum()) * voxel_ml
    out: dict[str, Any] = {
        "phantom_seed": EVAL_PHANTOM_SEED,
        "shape": list(volume.hu.shape),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "true_lung_ml": round(true_ml, 1),
        "lesions_ml": round(float((truth >= LESION_LABEL_BASE).sum()) * voxel_ml, 1),
    }
    for key, labels in (
        ("model", bundle.segment(volume)),
        ("hu_rules", hu_labels(volume.hu, volume.spacing)),
    ):
        lung = labels == LUNG
        pred_ml = float(lung.sum()) * voxel_ml
        d = dice(lung, true_lung)
        out[key] = {
            "lung_ml": round(pred_ml, 1),
            "lung_rel_error": round((pred_ml - true_ml) / true_ml, 4),
            "lung_dice": None if d is None else round(d, 4),
        }
    return out


def evaluate(
    data_root: Path = DATA_ROOT, weights: Path = MODEL_PATH, *, lung_bases_held_out: bool = True
) -> dict[str, Any]:
    """Every measurement of this script, as a JSON-able dict."""
    t0 = time.perf_counter()
    bundle = Bundle(weights)
    class_map: dict[str, str] = json.loads((data_root / CLASS_MAP).read_text())["total"]

    held = load_dicom_series(data_root / EVAL_DICOM)
    held_out = {
        "series": str(EVAL_DICOM),
        "reference": str(EVAL_SEG),
        **_versus_totalsegmentator(
            held, labels_on_grid(data_root / EVAL_SEG, held), bundle, class_map
        ),
    }
    bases = load_nifti_ct(data_root / LUNG_CHECK_CT)
    lung_check = {
        "volume": str(LUNG_CHECK_CT),
        "reference": str(LUNG_CHECK_SEG),
        "held_out": lung_bases_held_out,
        "note": "held out (never read by train.py)"
        if lung_bases_held_out
        else "a training volume of these weights: not an independent test",
        **_versus_totalsegmentator(
            bases, labels_on_grid(data_root / LUNG_CHECK_SEG, bases), bundle, class_map
        ),
    }
    synthetic = _synthetic(bundle)

    recall = held_out["model"]["bone_recall"]
    lung_dice = lung_check["model"]["lung_dice"]
    goals: dict[str, bool | str] = {
        f"held-out lung Dice >= {GOAL_LUNG_DICE}": (
            bool(lung_dice is not None and lung_dice >= GOAL_LUNG_DICE)
            if lung_bases_held_out
            else "not measured: the lung bases were training data of these weights"
        ),
        f"held-out bone recall >= {GOAL_BONE_RECALL}": recall is not None
        and recall >= GOAL_BONE_RECALL,
        f"synthetic lung volume within {GOAL_PHANTOM_LUNG_REL_ERR:.0%}": abs(
            synthetic["model"]["lung_rel_error"]
        )
        <= GOAL_PHANTOM_LUNG_REL_ERR,
    }
    return {
        "weights": {"path": str(weights), "sha256": sha256(weights)},
        "bone_names": bone_names(class_map),
        "lung_names": list(LUNG_NAMES),
        "held_out": held_out,
        "lung_bases": lung_check,
        "synthetic": synthetic,
        "goals": goals,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the metrics, optionally write them as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_ROOT, help="shared data root")
    ap.add_argument("--weights", type=Path, default=MODEL_PATH, help="model.pt to evaluate")
    ap.add_argument("--json", type=Path, default=None, help="write the metrics here")
    ap.add_argument(
        "--lung-bases-trained",
        action="store_true",
        help="the weights were trained on the lung bases (train.py --train-on-lung-bases)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    results = evaluate(args.data, args.weights, lung_bases_held_out=not args.lung_bases_trained)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
