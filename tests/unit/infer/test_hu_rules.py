"""pipeline.infer.hu_rules: the documented HU rules the default model was trained to follow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom

from pipeline.infer.hu_rules import hu_labels
from pipeline.synth import synthesize
from pipeline.tensors.volume import build_volumes


def test_rules_find_the_synthetic_tissues(tmp_path: Path) -> None:
    result = synthesize(
        tmp_path / "a",
        patients=1,
        seed=21,
        ct_slices=40,
        rows=128,
        columns=128,
        include_mr=False,
        include_bad=False,
    )
    truth = json.loads(result.ground_truth.read_text())
    series = max((s for s in truth["series"] if s.get("tissues")), key=lambda s: s["n_instances"])
    (vol,) = build_volumes([pydicom.dcmread(tmp_path / "a" / f) for f in series["files"]])
    labels = hu_labels(vol.array, vol.spacing)
    assert labels.dtype == np.uint8
    assert labels.shape == vol.array.shape
    voxel_ml = float(np.prod(vol.spacing)) / 1000
    for name, value in (("lung", 4), ("bone", 3), ("adipose", 2)):
        got = float((labels == value).sum()) * voxel_ml
        want = series["tissues"][name]["volume_ml"]
        assert abs(got - want) / want < 0.15, (name, got, want)
    assert labels[:, 0, 0].max() == 0  # outside the body: background
