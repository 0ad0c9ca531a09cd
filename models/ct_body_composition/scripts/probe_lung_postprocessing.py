"""Probe postprocessing variants for the lung on the lung bases (``example_ct_sm``).

Run from the repository root with the weights to probe (CPU, about 10 s)::

    .venv/bin/python models/ct_body_composition/scripts/probe_lung_postprocessing.py WEIGHTS

Prints the lung Dice against TotalSegmentator's ``example_seg`` for:

- ``bundle``: the bundle's own postprocessing (argmax at 256 x 256, labels brought back to the
  volume's grid by nearest neighbour), as ``evaluate.py`` and pacsflow run it;
- ``largest-N``: the bundle's labels keeping only the N largest 3D lung components;
- ``logits-area`` / ``logits-bilinear``: the logits brought back to the volume's grid (area
  averaging or bilinear) before the argmax, as nnU-Net does with its softmax;
- ``logits-area+bias-B``: the same with B added to the lung logit (a threshold shift).

These are measurements for the model's README (``docs/experiments/``), not part of the bundle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # the sibling script: loaders, bundle runner, metrics


def main(argv: list[str]) -> int:
    """Print the Dice of each variant for the weights in ``argv[0]``."""
    if len(argv) != 1:
        print(__doc__)
        return 2
    torch.set_num_threads(2)
    root = ev.DATA_ROOT
    class_map = json.loads((root / ev.CLASS_MAP).read_text())["total"]
    ids = {name: int(k) for k, name in class_map.items()}
    volume = ev.load_nifti_ct(root / ev.LUNG_CHECK_CT)
    ref = ev.labels_on_grid(root / ev.LUNG_CHECK_SEG, volume)
    ref_lung = np.isin(ref, [ids[n] for n in ev.LUNG_NAMES])
    bundle = ev.Bundle(Path(argv[0]))
    results: dict[str, float | None] = {}

    labels = bundle.segment(volume)
    results["bundle"] = ev.dice(labels == ev.LUNG, ref_lung)
    comp, _ = ndi.label(labels == ev.LUNG)
    sizes = np.bincount(comp.ravel())[1:]
    for n in (1, 2, 3):
        keep = np.argsort(sizes)[::-1][:n] + 1
        results[f"largest-{n}"] = ev.dice(np.isin(comp, keep), ref_lung)

    logits = bundle.logits(bundle.preprocess(volume))  # (Z, 5, X', Y')
    grid = (volume.hu.shape[2], volume.hu.shape[1])  # (X, Y)
    for mode in ("area", "bilinear"):
        small = nnf.interpolate(logits, size=grid, mode=mode)
        lung = small.argmax(1).numpy().transpose(0, 2, 1) == ev.LUNG
        results[f"logits-{mode}"] = ev.dice(lung, ref_lung)
    for bias in (0.5, 1.0, 2.0):
        shifted = logits.clone()
        shifted[:, ev.LUNG] += bias
        small = nnf.interpolate(shifted, size=grid, mode="area")
        lung = small.argmax(1).numpy().transpose(0, 2, 1) == ev.LUNG
        results[f"logits-area+bias-{bias:g}"] = ev.dice(lung, ref_lung)

    print(json.dumps({k: None if v is None else round(v, 4) for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
