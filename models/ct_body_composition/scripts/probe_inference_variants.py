"""Measure ways of running the network: test-time views and how predictions reach the grid.

Run from the repository root with the weights to probe (CPU, about 5 minutes on 2 cores)::

    .venv/bin/python models/ct_body_composition/scripts/probe_inference_variants.py \
        WEIGHTS [--json OUT]

Every variant runs through pacsflow's engine (:class:`pipeline.infer.engine.Segmenter`), with

- **views** (test-time augmentation, averaged logits): ``1`` (none), ``x`` (left-right flip),
  ``xy`` (both flips, 4 views), ``T`` (transposition, 2 views), ``xyT`` (the 8 symmetries of the
  square input; what ``configs/models.yaml`` sets for the model);
- **inversion**: ``labels`` (argmax at 256 x 256, labels brought back by nearest neighbour:
  version 0.1.0 of the bundle) or ``logits`` (the logits brought back with the preprocessing's
  ``area`` mode, then the argmax: the bundle's postprocessing now);

and prints, per variant, the lung Dice on the lung bases (``example_ct_sm`` against
TotalSegmentator's ``example_seg``), bone recall and precision and predicted lung (mL) on the
held-out series (``example_ct_dicom``), and the lung volume error on the evaluation phantom.
The records are under ``docs/experiments/``; these are measurements, not part of the bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import AsDiscreted, Compose, Invertd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # the sibling script: loaders, bundle runner, metrics

from pipeline.infer.engine import Segmenter

#: name -> (mirror axes, transpose)
VIEWS: dict[str, tuple[tuple[str, ...], bool]] = {
    "1": ((), False),
    "x": (("x",), False),
    "xy": (("x", "y"), False),
    "T": ((), True),
    "xyT": (("x", "y"), True),
}


def postprocessing(bundle: Any, inversion: str) -> Any:
    """The bundle's postprocessing for ``inversion`` (``labels`` or ``logits``)."""
    pre = bundle.preprocessing
    if inversion == "labels":
        return Compose(
            [
                AsDiscreted(keys="pred", argmax=True),
                Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True),
            ]
        )
    return Compose(
        [
            Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False),
            AsDiscreted(keys="pred", argmax=True),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally write) the measurements of every variant for WEIGHTS."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=ev.DATA_ROOT)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    root = args.data
    class_map = json.loads((root / ev.CLASS_MAP).read_text())["total"]
    bases = ev.load_nifti_ct(root / ev.LUNG_CHECK_CT)
    ref_bases = ev.labels_on_grid(root / ev.LUNG_CHECK_SEG, bases)
    held = ev.load_dicom_series(root / ev.EVAL_DICOM)
    ref_held = ev.labels_on_grid(root / ev.EVAL_SEG, held)
    phantom = ev.phantom_for_seed(ev.EVAL_PHANTOM_SEED)
    pvol, truth = ev.render_phantom(
        phantom, size=512, fov_mm=400.0, step_mm=2.5, seed=ev.EVAL_PHANTOM_SEED
    )
    true_lung = int((truth == ev.CTLabel.LUNG).sum())
    loaded = ev.Bundle(args.weights).pipeline_bundle
    rows: list[dict[str, Any]] = []
    for inversion in ("labels", "logits"):
        bundle = dataclasses.replace(loaded, postprocessing=postprocessing(loaded, inversion))
        for name, (axes, transpose) in VIEWS.items():
            t0 = time.perf_counter()
            seg = Segmenter(
                bundle, device="cpu", batch_size=ev.BATCH, mirror_axes=axes, transpose_xy=transpose
            )
            vols = [bases, held, pvol]
            items = [(v.name, (lambda v=v: (v.hu, ev.lps_to_ras(v.affine_ras)))) for v in vols]
            lb, lh, lp = (labels for _, labels in seg.segment(items))
            mb = ev.compare_with_totalsegmentator(lb, ref_bases, class_map, 0.0)
            mh = ev.compare_with_totalsegmentator(
                lh, ref_held, class_map, float(np.prod(held.spacing)) / 1000.0
            )
            row = {
                "views": name,
                "inversion": inversion,
                "lung_bases_lung_dice": round(float(mb["lung_dice"] or 0.0), 4),
                "held_out_bone_recall": mh["bone_recall"],
                "held_out_bone_precision": mh["bone_precision"],
                "held_out_lung_ml": mh["lung_pred_ml"],
                "phantom_lung_rel_error": round(
                    (int((lp == ev.LUNG).sum()) - true_lung) / true_lung, 4
                ),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json is not None:
        weights = {"path": str(args.weights), "sha256": ev.sha256(args.weights)}
        record = {"weights": weights, "variants": rows}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
