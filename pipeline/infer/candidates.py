"""Lesion candidates from a model's label map: compact regions enclosed by one organ label.

A segmentation model that labels tissues (soft tissue, fat, bone, lung) does not name lesions,
but a solid lung nodule is dense tissue in or enclosed by the lung: either the model labels it
lung (as TotalSegmentator's lung labels and pacsflow's HU rules include what the lung holds),
and it is lung voxels of soft-tissue density, or the model labels it otherwise, and on every
axial slice it crosses it is a hole that the lung surrounds. The registry can ask for such
candidates (``candidates:`` of a model entry, see :mod:`pipeline.infer.registry`):

0. with the image: the organ is grown by the aerated voxels of the body (below ``min_value``,
   label not 0) connected to it, so that a thin air gap the model labelled otherwise (a nodule
   near the chest wall) still separates a nodule from its surroundings;
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


def _square() -> npt.NDArray[np.bool_]:
    """The 3 x 3 in-plane neighbourhood, as a (3, 3, 3) structure."""
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1] = True
    return s


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

    organ_full = labels == within
    if values is not None and min_value is not None:
        # the organ grown by the aerated voxels of the body (not background, label 0) that
        # touch it: a thin air gap the model gave another label still encloses a nodule
        aerated = (values < min_value) & (labels != 0)
        grown, _ = ndimage.label(organ_full | aerated, structure=np.ones((3, 3, 3), dtype=bool))
        keep = np.zeros(int(grown.max()) + 1, dtype=bool)
        keep[grown[organ_full]] = True
        keep[0] = False
        organ_full = keep[grown]
    ks = np.flatnonzero(organ_full.any(axis=(1, 2)))
    if not ks.size:
        return []
    js = np.flatnonzero(organ_full.any(axis=(0, 2)))
    is_ = np.flatnonzero(organ_full.any(axis=(0, 1)))
    # work inside the organ's bounding box, one voxel of margin in-plane
    crop = (
        slice(int(ks[0]), int(ks[-1]) + 1),
        slice(max(int(js[0]) - 1, 0), int(js[-1]) + 2),
        slice(max(int(is_[0]) - 1, 0), int(is_[-1]) + 2),
    )
    organ = organ_full[crop]
    # holes per slice: 4-connected regions of the rest that do not reach the slice's edge
    # (what binary_fill_holes finds, in one labelling pass instead of a flood fill per slice)
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    rest, _ = ndimage.label(~organ, structure=plane)
    edge = np.zeros(int(rest.max()) + 1, dtype=bool)
    for side in (rest[:, 0, :], rest[:, -1, :], rest[:, :, 0], rest[:, :, -1]):
        edge[side] = True
    edge[0] = True  # the organ itself
    found_in = ~edge[rest]
    if values is not None and min_value is not None:
        inner = ndimage.binary_erosion(organ, structure=_square())
        found_in |= inner & (values[crop] >= min_value)
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
        where = tuple(
            slice(b.start + c.start, b.stop + c.start) for b, c in zip(box, crop, strict=True)
        )
        cand = Candidate((where[0], where[1], where[2]), mask, count, diameter, elongation)
        found.append((i, cand))
    largest = sorted(found, key=lambda item: (-item[1].voxel_count, item[0]))[:max_count]
    return [c for _, c in sorted(largest, key=lambda item: item[0])]
