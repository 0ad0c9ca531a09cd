"""pipeline.infer.candidates: compact regions the lung encloses are found, vessels are not."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from pipeline.infer.candidates import find_candidates
from pipeline.infer.registry import load_registry

LUNG, SOFT = 4, 1
SPACING = (2.0, 1.0, 1.0)  # slices, rows, cols (mm)


def _grid() -> tuple[npt.NDArray[np.float64], ...]:
    k, j, i = np.meshgrid(np.arange(40), np.arange(80), np.arange(80), indexing="ij")
    return k * SPACING[0], j * SPACING[1], i * SPACING[2]


def _lung_with(*balls: tuple[tuple[float, float, float], float]) -> npt.NDArray[np.uint8]:
    """A lung block in soft tissue, with soft-tissue balls (centre z, y, x in mm; radius)."""
    z, y, x = _grid()
    labels = np.full(z.shape, SOFT, dtype=np.uint8)
    labels[2:38, 5:75, 5:75] = LUNG
    for (cz, cy, cx), r in balls:
        labels[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r**2] = SOFT
    return labels


def _find(labels: npt.NDArray[np.uint8], **kw: float) -> list:  # type: ignore[type-arg]
    args = {"min_diameter_mm": 4.0, "max_diameter_mm": 40.0, "max_elongation": 2.0,
            "max_count": 20, "min_fill": 0.25, **kw}  # fmt: skip
    return find_candidates(labels, LUNG, SPACING, **args)  # type: ignore[arg-type]


def test_balls_are_found_with_their_size_and_in_a_stable_order() -> None:
    labels = _lung_with(((40.0, 20.0, 20.0), 6.0), ((20.0, 50.0, 55.0), 9.0))
    found = _find(labels)
    assert len(found) == 2
    # numbered by first voxel in (slice, row, col) order: the lower ball (z 20) first
    first, second = found
    assert first.box[0].start < second.box[0].start
    for cand, r in ((first, 9.0), (second, 6.0)):
        true = 4 / 3 * np.pi * r**3
        assert cand.voxel_count * 2.0 == pytest.approx(true, rel=0.15)
        assert cand.diameter_mm == pytest.approx(2 * r, rel=0.06)
        assert cand.elongation < 1.3
        assert np.all(labels[cand.box][cand.mask] == SOFT)
    assert [c.voxel_count for c in _find(labels.copy())] == [c.voxel_count for c in found]


def test_vessels_small_specks_and_open_regions_are_not_candidates() -> None:
    labels = _lung_with(((40.0, 40.0, 40.0), 7.0))
    labels[4:36, 20:23, 60:63] = SOFT  # a vessel along the slices: 64 mm long, 3 mm wide
    labels[30, 10, 10] = SOFT  # a speck: 2 mm^3
    labels[10:20, 5:15, 0:15] = SOFT  # a bay open to the chest wall: not enclosed
    found = _find(labels)
    assert len(found) == 1
    assert found[0].diameter_mm == pytest.approx(14.0, rel=0.06)
    loose = _find(labels, max_elongation=100.0, min_diameter_mm=0.5, min_fill=0.0)
    assert len(loose) == 3  # the vessel and the speck pass looser limits; the bay never
    assert max(c.elongation for c in loose) > 10


def test_limits() -> None:
    labels = _lung_with(
        ((20.0, 20.0, 20.0), 5.0), ((20.0, 20.0, 55.0), 7.0), ((50.0, 50.0, 40.0), 9.0)
    )
    assert len(_find(labels)) == 3
    kept = _find(labels, max_count=2)
    assert sorted(c.voxel_count for c in kept) == sorted(c.voxel_count for c in _find(labels))[1:]
    assert len(_find(labels, max_diameter_mm=15.0)) == 2
    assert _find(np.full((5, 10, 10), SOFT, dtype=np.uint8)) == []


def test_shipped_registry_asks_for_lung_nodules_with_codes() -> None:
    entry = load_registry().entry("ct_body_composition")
    spec = entry.candidates["lung_nodule"]
    assert spec.within == "lung"
    assert spec.within in entry.labels
    assert spec.type is not None
    assert spec.type.value == "27925004"


def test_dense_regions_the_model_labels_lung() -> None:
    """A model that labels nodules lung (as the HU rules and TotalSegmentator do): the nodule is
    found by its density; without the image, it is not."""
    z, y, x = _grid()
    labels = np.full(z.shape, SOFT, dtype=np.uint8)
    labels[2:38, 5:75, 5:75] = LUNG
    hu = np.where(labels == LUNG, -850.0, 40.0)
    ball = (z - 40.0) ** 2 + (y - 30.0) ** 2 + (x - 30.0) ** 2 <= 6.0**2
    hu[ball] = 90.0
    hu[4:36, 60:63, 20:23] = 60.0  # a vessel, labelled lung too
    hu[2:38, 5:75, 5] = -100.0  # partial volume at the lung's edge
    assert _find(labels) == []
    found = find_candidates(
        labels, LUNG, SPACING, values=hu, min_value=-300.0, min_diameter_mm=4.0,
        max_diameter_mm=40.0, max_elongation=2.0, max_count=20, min_fill=0.25,
    )  # fmt: skip
    assert len(found) == 1
    assert found[0].voxel_count == int(ball.sum())


def test_a_nodule_the_model_joins_to_the_chest_wall_is_found_through_the_air_gap() -> None:
    """The model labels a nodule next to the chest wall soft tissue and misses the thin lung
    gap between them (labelled soft tissue too); the image shows the gap as air."""
    z, y, x = _grid()
    labels = np.full(z.shape, SOFT, dtype=np.uint8)
    labels[2:38, 5:75, 5:75] = LUNG
    hu = np.where(labels == LUNG, -850.0, 40.0)
    ball = (z - 40.0) ** 2 + (y - 14.0) ** 2 + (x - 40.0) ** 2 <= 7.0**2  # reaches row 7
    labels[ball] = SOFT
    hu[ball] = 90.0
    labels[10:30, 5:8, 30:50] = SOFT  # the gap (rows 5-6) and the nodule's edge: not lung ...
    hu[10:30, 5:7, 30:50] = -800.0  # ... but air in the image
    hu[ball] = 90.0
    kw = {"min_diameter_mm": 4.0, "max_diameter_mm": 40.0, "max_elongation": 2.0,
          "max_count": 20, "min_fill": 0.25}  # fmt: skip
    assert find_candidates(labels, LUNG, SPACING, **kw) == []  # type: ignore[arg-type]
    found = find_candidates(labels, LUNG, SPACING, values=hu, min_value=-300.0, **kw)  # type: ignore[arg-type]
    assert len(found) == 1
    assert found[0].voxel_count >= 0.9 * int(ball.sum())
