"""Match the lesions of a synthesised archive (its ground truth) with a lake's findings.

Each CT lesion of ``ground_truth.json`` (centre in LPS mm) is looked up in the findings of the
volume built from its series: a finding whose label starts with ``prefix`` (the registry's
candidates, e.g. ``lung_nodule_``) and whose bounding box holds the lesion's centre. The series
is matched through the restricted vault (original -> pseudonymous Series Instance UID), so this
is for the demo and tests, which own both sides; nothing here prints header values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.lake import LakePaths, read_table
from pipeline.lake.queries import finding_name

__all__ = ["LesionMatch", "match_lesions"]


@dataclass(frozen=True)
class LesionMatch:
    """One synthesised lesion and the findings that hold its centre (none: missed)."""

    series_uid: str  # original
    lesion: dict[str, Any]  # the ground truth's record
    findings: tuple[dict[str, Any], ...]


def _voxel(affine: list[float], centre_lps: list[float]) -> tuple[int, int, int]:
    """(slice, row, col) of an LPS point in a tensor whose affine maps (col, row, slice)."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64).reshape(4, 4))
    i, j, k = (inv @ np.array([*centre_lps, 1.0]))[:3]
    return round(float(k)), round(float(j)), round(float(i))


def match_lesions(
    lake: LakePaths, ground_truth: dict[str, Any], prefix: str = "lung_nodule_"
) -> list[LesionMatch]:
    """Every lesion of ``ground_truth`` with the findings (label ``prefix*``) that hold it."""
    pseudonym = {
        r["SeriesInstanceUID"]: r["series_pseudonym"]
        for r in read_table(
            lake, "vault", columns=["SeriesInstanceUID", "series_pseudonym"]
        ).to_pylist()
    }
    tensors = [r for r in read_table(lake, "tensors").to_pylist() if r.get("checksum")]
    findings = [
        f
        for f in read_table(lake, "findings").to_pylist()
        # the unique name (lung_nodule_2): label and instance apart since issue #24
        if finding_name(f["label"], f.get("instance")).startswith(prefix)
    ]
    out: list[LesionMatch] = []
    for series in ground_truth.get("series", []):
        lesions = series.get("lesions") or []
        if not lesions:
            continue
        pseudo = pseudonym.get(series["SeriesInstanceUID"])
        volumes = {t["tensor_key"]: t for t in tensors if t["SeriesInstanceUID"] == pseudo}
        mine = [f for f in findings if f["tensor_key"] in volumes]
        for lesion in lesions:
            hits = []
            for f in mine:
                if not f["bbox"]:
                    continue
                k, j, i = _voxel(volumes[f["tensor_key"]]["affine"], lesion["centre_mm"])
                k0, j0, i0, k1, j1, i1 = f["bbox"]
                if k0 <= k <= k1 and j0 <= j <= j1 and i0 <= i <= i1:
                    hits.append(f)
            out.append(LesionMatch(series["SeriesInstanceUID"], lesion, tuple(hits)))
    return out
