"""Lesion candidates from a model's label map: compact regions enclosed by one organ label.

A segmentation model that labels tissues (soft tissue, fat, bone, lung) does not name lesions,
but a solid lung nodule is dense tissue in or enclosed by the lung: either the model labels it
lung (as TotalSegmentator's lung labels and pacsflow's HU rules include what the lung holds),
and it is lung voxels of soft-tissue density, or the model labels it otherwise, and on every
axial slice it crosses it is a hole that the lung surrounds. The registry can ask for such
candidates (``candidates:`` of a model entry, see :mod:`pipeline.infer.registry`):

1. the voxels of the ``within`` label at or above ``min_value`` (on CT: Hounsfield units; the
   default -300 HU separates solid tissue from aerated lung) that are not on the label's edge in
   their slice (partial volume with the chest wall and mediastinum is dense too), and per axial
   slice the holes of the label (``scipy.ndimage.binary_fill_holes`` minus the label itself);
2. these joined in 3D (26-connectivity) into components;
3. a component is a candidate when its equivalent-sphere diameter lies in
   ``[min_diameter_mm, max_diameter_mm]`` and it is compact: the longest side of its bounding box
   (in mm) is at most ``max_elongation`` times the shortest, and it fills at least ``min_fill``
   of that box (a ball fills 0.52, a rim or a branching vessel far less). Vessels are dense
   too; running along the slices they are long and are left out, but a short vessel segment
   can pass: what remains is a candidate for a QA reviewer, not a diagnosis;
4. at most ``max_count`` candidates per volume, the largest first; they are numbered in a
   stable order (first voxel in slice, row, column order) so reruns give the same labels.

Each candidate gets its own value in the label map (above the model's labels), so write-back
and review treat it like any label: one SEG segment and one TID 1500 measurement group each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["Candidate", "find_candidates"]


@dataclass(frozen=True)
class Candidate:
    """One candidate: its voxels (within ``box``) and size."""

    box: tuple[slice, slice, slice]
    mask: npt.NDArray[np.bool_]  # the component's voxels inside ``box``
    voxel_count: int
    diameter_mm: float  # of the sphere with the same volume
    elongation: float  # longest / shortest bounding-box side, in mm


def find_candidates(
    labels: npt.NDArray[np.integer],
    within: int,
    spacing: tuple[float, float, float],
    *,
    values: npt.NDArray[Any] | None = None,
    min_value: float | None = None,
    min_diameter_mm: float,
    max_diameter_mm: float,
    max_elongation: float,
    max_count: int,
    min_fill: float = 0.0,
) -> list[Candidate]:
    """Compact regions that label ``within`` encloses slice by slice (see the module doc).

    ``labels`` is (slices, rows, cols); ``spacing`` is in mm in the same order; ``values`` (the
    image, same shape) and ``min_value`` give the dense voxels of the label (both or neither).
    """
    from scipy import ndimage

    organ = labels == within
    found_in = np.zeros_like(organ)
    for k in np.flatnonzero(organ.any(axis=(1, 2))):
        found_in[k] = ndimage.binary_fill_holes(organ[k]) & ~organ[k]
    if values is not None and min_value is not None:
        inner = ndimage.binary_erosion(organ, structure=np.ones((1, 3, 3), dtype=bool))
        found_in |= inner & (values >= min_value)
    components, n = ndimage.label(found_in, structure=np.ones((3, 3, 3), dtype=bool))
    if not n:
        return []
    voxel_mm3 = float(np.prod(spacing))
    found: list[tuple[int, Candidate]] = []
    for i, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        mask = components[box] == i
        count = int(mask.sum())
        diameter = (6.0 * count * voxel_mm3 / math.pi) ** (1.0 / 3.0)
        sides = [(s.stop - s.start) * d for s, d in zip(box, spacing, strict=True)]
        elongation = max(sides) / min(sides)
        fill = count / mask.size
        if (
            not (min_diameter_mm <= diameter <= max_diameter_mm)
            or elongation > max_elongation
            or fill < min_fill
        ):
            continue
        found.append((i, Candidate((box[0], box[1], box[2]), mask, count, diameter, elongation)))
    largest = sorted(found, key=lambda item: (-item[1].voxel_count, item[0]))[:max_count]
    return [c for _, c in sorted(largest, key=lambda item: item[0])]
