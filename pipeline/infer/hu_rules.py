"""Body-composition labels of a CT volume from Hounsfield-unit rules (numpy + scipy only).

These rules make the training labels of the ``ct_body_composition`` bundle
(``models/ct_body_composition``) and are a model-free baseline for it. The labels are those of
the bundle's ``metadata.json``: 0 background, 1 soft tissue, 2 adipose tissue, 3 bone, 4 lung.

Input: a CT volume in HU shaped ``(slices, rows, columns)`` and its ``(slice, row, column)``
spacing in mm. "Slice by slice" below means in the plane of each slice (axial for axial CT).

Rules, in order (each threshold is a named constant of this module):

1. **Body.** Voxels above :data:`BODY_HU` (-500 HU) are opened slice by slice with a disk of
   radius :data:`BODY_OPENING_MM` (which cuts thin bridges: the table top, blankets, cables,
   a head holder). Of the 3D connected components, the largest is the body; another one is
   kept too when it is at least :data:`BODY_MIN_FRACTION` of the largest and
   :data:`BODY_MIN_ML` mL, and its median HU lies in :data:`BODY_MEDIAN_HU` (tissue, not
   table plastic or metal) -- the arms lying beside the trunk, which are separate components
   in most axial slabs. The kept components are grown back by the opening radius within the
   threshold mask (the skin the opening shaved off) and their holes are filled slice by slice:
   that *filled outline* is the body, so the table and the air outside are background.
2. **Lung.** Air is below :data:`AIR_HU` (-400 HU). Its 3D components inside the filled outline
   are lung when they hold at least :data:`LUNG_MIN_ML` mL and their median HU lies in
   :data:`LUNG_MEDIAN_HU` (-910..-600: aerated lung parenchyma; bowel and stomach gas, the
   air outside and a trachea alone have medians from about -920 down to -1000 HU). Where the
   field of view cuts through the chest, a lung touches the image edge and is no hole of the
   outline; such regions outside the outline are added to it first when they pass the same
   median and volume tests (the air around a patient has a median near -1000 HU or the
   padding value). A piece of a lung component that is separate in its slice and has a median
   below the interval is gas touching the lung in 3D (a stomach bubble under the diaphragm,
   the trachea) and is not lung. Holes of the lung mask up to :data:`LUNG_HOLE_MAX_MM2` mm^2
   (vessels, bronchial walls, small nodules) are filled slice by slice.
3. **Bone.** Voxels of the body at or above :data:`BONE_HU` (200 HU), closed slice by slice
   with a disk of radius :data:`BONE_CLOSING_MM` (bridges gaps in thin or porous cortex), then
   with holes up to :data:`BONE_HOLE_MAX_MM2` mm^2 filled slice by slice: the marrow of
   vertebrae, ribs, femurs and humeri, which is mostly below 200 HU. The size limit keeps a
   closed skull or rib cage from filling the brain or abdomen; the spinal canal is a hole of a
   vertebra in slices through its arch and so counts as bone.
4. **Adipose tissue.** Voxels of the body (not lung or bone) in :data:`ADIPOSE_HU`
   (-190..-30 HU).
5. **Soft tissue.** The rest of the body outline: muscle, organs, vessels, cartilage, and also
   air inside the body that is not lung (bowel gas, airways above the lungs).

Everything outside the body is 0 (background). The rules know densities, not organs:
iodinated contrast at or above 200 HU (a CT angiography's heart and aorta), calcified
cartilage and metal are bone. They are meant for adult axial CT; heavy streaks, very low-dose
noise and coarse voxels (partial volume lowers thin cortex below 200 HU at 3 mm) shift them.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

__all__ = [
    "ADIPOSE",
    "ADIPOSE_HU",
    "AIR_HU",
    "BACKGROUND",
    "BODY_HU",
    "BODY_MEDIAN_HU",
    "BODY_MIN_FRACTION",
    "BODY_MIN_ML",
    "BODY_OPENING_MM",
    "BONE",
    "BONE_CLOSING_MM",
    "BONE_HOLE_MAX_MM2",
    "BONE_HU",
    "LABEL_NAMES",
    "LUNG",
    "LUNG_HOLE_MAX_MM2",
    "LUNG_MEDIAN_HU",
    "LUNG_MIN_ML",
    "SOFT_TISSUE",
    "hu_labels",
]

#: label of everything outside the body (air, table, padding)
BACKGROUND: Final = 0
#: label of muscle, organs, vessels and other non-fat, non-bone tissue of the body
SOFT_TISSUE: Final = 1
#: label of fat
ADIPOSE: Final = 2
#: label of bone, marrow included
BONE: Final = 3
#: label of aerated lung
LUNG: Final = 4
#: name of each label (index = label), as in the bundle's metadata.json
LABEL_NAMES: Final = ("background", "soft_tissue", "adipose_tissue", "bone", "lung")

#: voxels above this (HU) are candidate body tissue
BODY_HU: Final = -500.0
#: radius (mm) of the in-plane disk that opens the body mask (detaches the table)
BODY_OPENING_MM: Final = 3.0
#: a body component other than the largest is kept when at least this fraction of it ...
BODY_MIN_FRACTION: Final = 0.02
#: ... and at least this many mL ...
BODY_MIN_ML: Final = 10.0
#: ... and its median HU lies in this closed interval (tissue, not table plastic or metal)
BODY_MEDIAN_HU: Final = (-250.0, 250.0)

#: voxels below this (HU) inside the body are air: lung or gas
AIR_HU: Final = -400.0
#: an air component needs at least this many mL to be lung
LUNG_MIN_ML: Final = 10.0
#: and a median HU in this closed interval (aerated parenchyma, not gas at -1000 to -920 HU)
LUNG_MEDIAN_HU: Final = (-910.0, -600.0)
#: holes of the lung mask up to this area (mm^2, in-plane) are lung (vessels, airway walls)
LUNG_HOLE_MAX_MM2: Final = 400.0

#: voxels of the body at or above this (HU) are bone
BONE_HU: Final = 200.0
#: radius (mm) of the in-plane disk that closes the bone mask before its holes are filled
BONE_CLOSING_MM: Final = 3.0
#: holes of the bone mask up to this area (mm^2, in-plane) are marrow
BONE_HOLE_MAX_MM2: Final = 2500.0

#: closed interval (HU) of adipose tissue
ADIPOSE_HU: Final = (-190.0, -30.0)

# in-plane connectivity only: labelling or hole filling with it works slice by slice
_IN_PLANE: Final = np.array(
    [np.zeros((3, 3), bool), ndi.generate_binary_structure(2, 1), np.zeros((3, 3), bool)]
)

BoolArray = npt.NDArray[np.bool_]


def _disk(radius_mm: float, row_mm: float, col_mm: float) -> BoolArray:
    """An in-plane disk of ``radius_mm`` as a (1, h, w) structuring element."""
    ry = max(1, round(radius_mm / row_mm))
    rx = max(1, round(radius_mm / col_mm))
    y, x = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    disk = (y * row_mm) ** 2 + (x * col_mm) ** 2 <= radius_mm**2 + 1e-6
    disk[ry, :] = np.abs(x[ry, :]) <= rx  # at least the cross, however anisotropic
    disk[:, rx] = np.abs(y[:, rx]) <= ry
    return np.asarray(disk[None], dtype=bool)


def _fill_slices(mask: BoolArray) -> BoolArray:
    """``mask`` with every hole filled, slice by slice."""
    return np.asarray(ndi.binary_fill_holes(mask, structure=_IN_PLANE), dtype=bool)


def _fill_small_holes(mask: BoolArray, max_pixels: float) -> BoolArray:
    """``mask`` with its in-plane holes of at most ``max_pixels`` pixels filled."""
    holes = _fill_slices(mask) & ~mask
    if not holes.any():
        return mask
    lab, n = ndi.label(holes, structure=_IN_PLANE)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    small = sizes <= max_pixels
    small[0] = False
    return np.asarray(mask | small[lab], dtype=bool)


def _components(mask: BoolArray) -> tuple[npt.NDArray[np.int32], int]:
    lab, n = ndi.label(mask)
    return np.asarray(lab, dtype=np.int32), int(n)


def _medians(values: npt.NDArray[np.float32], lab: npt.NDArray[np.int32], n: int) -> list[float]:
    """Median of ``values`` over each component 1..n of ``lab`` (index 0 = component 1)."""
    if n == 0:
        return []
    flat = lab.ravel()
    sel = flat > 0
    ids = flat[sel]
    vals = values.ravel()[sel]
    order = np.lexsort((vals, ids))
    ids, vals = ids[order], vals[order]
    starts = np.searchsorted(ids, np.arange(1, n + 1), side="left")
    stops = np.searchsorted(ids, np.arange(1, n + 1), side="right")
    out: list[float] = []
    for a, b in zip(starts, stops, strict=True):
        out.append(float(np.median(vals[a:b])) if b > a else float("nan"))
    return out


def _body(hu: npt.NDArray[np.float32], spacing: tuple[float, float, float]) -> BoolArray:
    """The filled body outline (rule 1)."""
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    tissue = hu > BODY_HU
    disk = _disk(BODY_OPENING_MM, spacing[1], spacing[2])
    opened = np.asarray(ndi.binary_opening(tissue, structure=disk), dtype=bool)
    lab, n = _components(opened)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    keep = np.zeros(n + 1, dtype=bool)
    keep[largest] = True
    candidates = [
        i
        for i in range(1, n + 1)
        if i != largest
        and sizes[i] >= BODY_MIN_FRACTION * sizes[largest]
        and sizes[i] * voxel_ml >= BODY_MIN_ML
    ]
    if candidates:
        medians = _medians(hu, lab, n)
        lo, hi = BODY_MEDIAN_HU
        for i in candidates:
            if lo <= medians[i - 1] <= hi:
                keep[i] = True
    core = keep[lab]
    grown = np.asarray(ndi.binary_dilation(core, structure=disk), dtype=bool) & tissue
    return _fill_slices(grown | core)


def _lung(
    hu: npt.NDArray[np.float32], body: BoolArray, spacing: tuple[float, float, float]
) -> BoolArray:
    """Aerated lung (rule 2)."""
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    min_voxels = LUNG_MIN_ML / voxel_ml
    lo, hi = LUNG_MEDIAN_HU
    inside = body.copy()
    # lungs cut by the field of view: regions outside the outline that look like lung
    lab, n = _components(~body)
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        medians = _medians(hu, lab, n)
        add = np.zeros(n + 1, dtype=bool)
        for i in range(1, n + 1):
            add[i] = sizes[i] >= min_voxels and lo <= medians[i - 1] <= hi
        if add.any():
            inside |= add[lab]
    lab, n = _components((hu < AIR_HU) & inside)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    big = [i for i in range(1, n + 1) if sizes[i] >= min_voxels]
    if not big:
        return np.zeros(hu.shape, dtype=bool)
    medians = _medians(hu, lab, n)
    keep = np.zeros(n + 1, dtype=bool)
    for i in big:
        keep[i] = lo <= medians[i - 1] <= hi
    lung = keep[lab]
    # gas that touches a lung in 3D (a stomach bubble under the diaphragm, the trachea) is a
    # piece of its own in the slice, with the median HU of gas
    lab2, n2 = ndi.label(lung, structure=_IN_PLANE)
    medians2 = np.asarray(_medians(hu, np.asarray(lab2, dtype=np.int32), int(n2)))
    gas = np.concatenate([[False], medians2 < lo])
    lung &= ~gas[lab2]
    pixel_mm2 = spacing[1] * spacing[2]
    return _fill_small_holes(lung, LUNG_HOLE_MAX_MM2 / pixel_mm2) & inside


def hu_labels(
    hu: npt.NDArray[np.generic], spacing: tuple[float, float, float]
) -> npt.NDArray[np.uint8]:
    """Label soft tissue, adipose tissue, bone and lung of a CT volume by HU rules.

    Parameters
    ----------
    hu:
        CT values in Hounsfield units, shape ``(slices, rows, columns)``; any real dtype.
    spacing:
        ``(slice, row, column)`` spacing in mm (the array's axis order).

    Returns
    -------
    numpy.ndarray
        ``uint8`` labels of ``hu``'s shape: 0 background, 1 soft tissue, 2 adipose tissue,
        3 bone, 4 lung (the rules are in the module docstring).

    Raises
    ------
    ValueError
        If ``hu`` is not 3D or a spacing is not positive.
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be (slices, rows, columns), got shape {hu.shape}")
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive mm values, got {spacing}")
    sp = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    values = np.asarray(hu, dtype=np.float32)
    body = _body(values, sp)
    lung = _lung(values, body, sp)
    body |= lung
    bone = body & (values >= BONE_HU)
    closing = _disk(BONE_CLOSING_MM, sp[1], sp[2])
    bone |= np.asarray(ndi.binary_closing(bone, structure=closing), dtype=bool)
    bone = _fill_small_holes(bone, BONE_HOLE_MAX_MM2 / (sp[1] * sp[2])) & body & ~lung
    lo, hi = ADIPOSE_HU
    adipose = body & (values >= lo) & (values <= hi) & ~lung & ~bone
    labels = np.zeros(values.shape, dtype=np.uint8)
    labels[body] = SOFT_TISSUE
    labels[adipose] = ADIPOSE
    labels[bone] = BONE
    labels[lung] = LUNG
    return labels
