"""Train the ct_body_composition bundle's network on real CT labelled by HU rules.

Run from the repository root (CPU, about 25 minutes on 2 cores)::

    .venv/bin/python models/ct_body_composition/scripts/train.py

Writes ``models/ct_body_composition/models/model.pt`` (a float32 ``state_dict``) and
``models/ct_body_composition/docs/provenance.json`` (training files with sha256, git commit,
seed, epochs, slices, wall time, library versions, and the metrics of ``evaluate.py``).

Data (all read-only from the shared data folder beside the repository, ``../shared/data``):

- TotalSegmentator's test CT volumes (NIfTI, Apache-2.0): ``example_ct.nii.gz``,
  ``example_ct_sm.nii.gz`` and ``pulmonary_report/models/ct_cropped.nii.gz`` -- their HU only;
  TotalSegmentator's label files are never read here;
- every CT series under ``dicom/dcm_qa_ct/In`` that :func:`pipeline.tensors.volume.build_volumes`
  accepts (BSD-2-Clause; the gantry-tilted GE head is refused and skipped) and dcmqi's 3-slice
  chest CT ``dicom/dcmqi/data/segmentations/ct-3slice`` (BSD-3-Clause, from TCIA);
- synthetic chest phantoms of :mod:`pipeline.synth` (their HU), with arms beside the chest,
  gas pockets under the lungs and a table drawn in by :func:`add_surroundings`.

Held out (never read here; a training source that names it is refused): TotalSegmentator's
``example_ct_dicom`` series, and ``example_ct.nii.gz`` and ``example_ct_sm.nii.gz`` (one scan;
the only real CT with reference lung labels, the lung bases of ``example_seg.nii.gz``). In
exchange the recipe adds the single axial CT images of :data:`SLICE_FILES` (real patients'
chest, abdomen, pelvis, neck and head from other public DICOM test sets), copies of every real
training volume averaged to :data:`COARSE_MM`, diaphragm domes in the phantoms' lung bases
with stomach gas under the left one (:func:`carve_domes`) and 3 mm copies of the phantoms
and all their lung-base slices, spares the lung's rim from the gas weight of the loss
(:data:`LUNG_RIM_PX`), and coarsens slices at random (see :data:`COARSE_P`).
``--train-on-lung-bases`` is the earlier recipe (weights up to version 0.1.0 of the bundle):
it trains on that scan instead, without the additions.

Each volume goes through the input contract of ``evaluate.py`` (MetaTensor (1, X, Y, Z), the
bundle's ``preprocessing``); its labels come from :func:`pipeline.infer.hu_rules.hu_labels` at
full resolution and are resized to (256, 256, Z) by nearest neighbour. The network learns on the
axial slices with flips, 90-degree rotations and small intensity shifts, Dice + cross-entropy
loss and Adam, deterministically (fixed seeds, deterministic algorithms, 2 threads).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import monai
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
import torch
import torch.nn.functional as nnf
from monai.losses.dice import DiceLoss
from monai.transforms.spatial.array import Resize
from scipy import ndimage as ndi  # type: ignore[import-untyped]

from pipeline.errors import GeometryError
from pipeline.infer.hu_rules import LABEL_NAMES, LUNG, SOFT_TISSUE, hu_labels
from pipeline.tensors.decode import decode_frames
from pipeline.tensors.volume import build_volumes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # the sibling script: loaders, bundle runner, metrics

SEED: Final = 20240607
EPOCHS: Final = 60
BATCH: Final = 16
LEARNING_RATE: Final = 3e-3
FINAL_LEARNING_RATE: Final = 1e-4
#: cross-entropy weight of each class (background, soft tissue, adipose, bone, lung)
#: (bone 4, lung 2.5, the committed weights; runs with bone 3 / lung 1.5, bone 5 / lung 1.5 and
#: bone 3.5 / lung 2 are recorded in docs/experiments/)
CLASS_WEIGHTS: Final = (1.0, 1.0, 1.0, 4.0, 2.5)
#: intensity shift augmentation: uniform in +-this many HU (after the bundle's scaling)
SHIFT_HU: Final = 20.0
#: zoom augmentation: factor uniform in this range
ZOOM: Final = (0.8, 1.25)
#: training crops (pixels, square) of the 256 x 256 slices
CROP: Final = 192
#: coarse-scan augmentation (not with ``--train-on-lung-bases``): with this probability a slice is
#: averaged down by a factor uniform in :data:`COARSE_FACTOR` and brought back bilinearly
#: (labels unchanged), as a 3 mm scan looks after the bundle's resize to 256 x 256
COARSE_P: Final = 0.3
COARSE_FACTOR: Final = (1.5, 2.5)
#: cross-entropy weight of gas inside the body (see :class:`Loss`) ...
GAS_WEIGHT: Final = 5.0
#: ... that is, of pixels labelled soft tissue below this HU
GAS_HU: Final = -300.0
#: not with ``--train-on-lung-bases``: not within this many pixels (of 256) of a lung label
LUNG_RIM_PX: Final = 3
#: synthetic phantoms: seeds, and slices sampled from each
PHANTOM_SEEDS: Final = (101, 102, 103, 104)
PHANTOM_SLICES: Final = 48
#: field of view (mm) of the training phantoms: room for arms beside the chest
PHANTOM_FOV_MM: Final = (480.0, 540.0)
#: the training phantoms extend this far (mm) under the thorax (abdomen, for gas pockets)
PHANTOM_BELOW_MM: Final = 90.0
#: gas pockets per training phantom (low, high exclusive), placed up to this far (mm) under
#: the lung bases
GAS_POCKETS: Final = (4, 9)
GAS_BELOW_MM: Final = 80.0
#: gas stays at least this far (mm) inside the skin
GAS_DEPTH_MM: Final = 15.0

NIFTI_FILES: Final = (
    ev.TS_REFERENCE / "example_ct.nii.gz",
    ev.TS_REFERENCE / "example_ct_sm.nii.gz",
    ev.TS_REFERENCE / "pulmonary_report/models/ct_cropped.nii.gz",
)
DICOM_FOLDERS: Final = (
    Path("dicom/dcm_qa_ct/In"),
    Path("dicom/dcmqi/data/segmentations/ct-3slice"),
)
#: single axial CT images of real patients from other public DICOM test sets (chest, upper
#: abdomen with stomach and bowel gas, pelvis, neck, head), each a one-slice training volume
#: (not with ``--train-on-lung-bases``). Left out: dicom-numpy's CT28 (a copy of CT26), the
#: tilted, streaked, noisy or non-axial images of those sets (their HU rules go wrong).
SLICE_FILES: Final = (
    *(
        Path(f"dicom/dicom-numpy/dupe-positions/CT{i}.dcm")
        for i in (2, 20, 21, 22, 23, 24, 25, 26, 27, 29)
    ),
    Path("dicom/pydicom-data/data_store/data/693_UNCR.dcm"),
    Path("dicom/pydicom-data/data_store/data/explicit_VR-UN.dcm"),
    Path("dicom/pylibjpeg-data/ljdata/ds/JPEGLS/CT1_JLSN.dcm"),
    Path("dicom/dicompyler-core/tests/testdata/example_data/ct.0.dcm"),
)
#: each single slice (and its coarse copy) is seen this many times per epoch
SLICE_REPEAT: Final = 4
#: coarse copies (not with ``--train-on-lung-bases``): every real training volume finer than this
#: (mm) is also averaged down to about this voxel size, labelled by the HU rules there and
#: used as a further training volume -- as a 3 mm scan reaches the network
COARSE_MM: Final = 3.0
#: diaphragm domes (not with ``--train-on-lung-bases``): how far (mm) each dome rises into its
#: lung's base, and its in-plane radii as fractions of the lung's half-widths there
DOME_RISE_MM: Final = (30.0, 70.0)
DOME_RADIUS: Final = (0.75, 1.0)
#: stomach gas (not with ``--train-on-lung-bases``): a gas bubble in the left dome, its radii
#: these fractions of the dome's in-plane radii, its height (mm), and the wall (mm) of tissue
#: left between it and the lung (diaphragm and stomach wall)
FUNDUS_RADIUS: Final = (0.3, 0.6)
FUNDUS_HEIGHT_MM: Final = (12.0, 30.0)
FUNDUS_WALL_MM: Final = (4.0, 8.0)
#: ... and the phantoms' lowest this many lung slices (5 mm apart) are all trained on
BASE_SLICES: Final = 16
MODEL_PATH: Final = ev.MODEL_PATH
PROVENANCE_PATH: Final = ev.BUNDLE_DIR / "docs" / "provenance.json"
_CT_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class Source:
    """One training volume, the files it was read from, and how often an epoch sees it."""

    volume: ev.CtVolume
    files: tuple[Path, ...]
    kind: str
    repeat: int = 1


def dicom_series(folder: Path) -> list[Source]:
    """Every CT volume under ``folder``; series that ``build_volumes`` refuses are skipped."""
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # not DICOM (JSON sidecars, DIRFILEs, READMEs)
            continue
        if ds.get("SOPClassUID") != _CT_IMAGE_STORAGE or "PixelData" not in ds:
            continue
        series[str(ds.get("SeriesInstanceUID", path.parent))].append((path, ds))
    out: list[Source] = []
    for uid, items in sorted(series.items()):
        where = items[0][0].parent
        try:
            volumes = build_volumes([ds for _, ds in items])
        except GeometryError as exc:
            print(f"  skip {where} ({len(items)} files): {exc}")
            continue
        for n, vol in enumerate(volumes):
            volume = ev.CtVolume(
                name=f"{where.name}/{uid[-8:]}#{n}",
                hu=np.asarray(vol.array, dtype=np.float32),
                affine_ras=vol.affine_ras,
                spacing=vol.spacing,
            )
            out.append(Source(volume, tuple(p for p, _ in items), "dicom"))
    return out


def single_slice(path: Path) -> Source:
    """One axial CT image as a one-slice volume in the DICOM axial layout.

    Raises:
        ValueError: the image is not axial (rows and columns along the patient's x and y).
    """
    ds = pydicom.dcmread(path)
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    if not np.allclose(np.abs(iop), [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], atol=1e-3):
        raise ValueError(f"{path}: not an axial image (orientation {iop.tolist()})")
    pixels = np.asarray(decode_frames(ds)[0], dtype=np.float32)
    hu = pixels * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))
    if iop[0] < 0:  # columns to the patient's right: flip to the left
        hu = hu[:, ::-1]
    if iop[4] < 0:  # rows to the patient's front: flip to the back
        hu = hu[::-1, :]
    dy, dx = (float(v) for v in ds.PixelSpacing)
    dz = float(ds.get("SliceThickness") or 1.0)
    volume = ev.CtVolume(
        name=f"{path.parent.name}/{path.name}",
        hu=np.ascontiguousarray(hu[None]),
        affine_ras=np.diag([-dx, -dy, dz, 1.0]),
        spacing=(dz, dy, dx),
    )
    return Source(volume, (path,), "dicom slice", SLICE_REPEAT)


def coarsened(volume: ev.CtVolume, mm: float = COARSE_MM) -> ev.CtVolume | None:
    """``volume`` averaged down to voxels of about ``mm`` (``None`` if already that coarse)."""
    factors = [max(1.0, mm / s) for s in volume.spacing]
    if max(factors[1:]) < 1.2:
        return None
    shape = [max(1, round(n / f)) for n, f in zip(volume.hu.shape, factors, strict=True)]
    small = nnf.interpolate(torch.from_numpy(volume.hu)[None, None], size=shape, mode="area")
    scale = [n / m for n, m in zip(volume.hu.shape, shape, strict=True)]  # (z, y, x)
    return ev.CtVolume(
        name=f"{volume.name}@{mm:g}mm",
        hu=np.ascontiguousarray(small[0, 0].numpy()),
        affine_ras=volume.affine_ras @ np.diag([scale[2], scale[1], scale[0], 1.0]),
        spacing=(
            volume.spacing[0] * scale[0],
            volume.spacing[1] * scale[1],
            volume.spacing[2] * scale[2],
        ),
    )


def patient_axes(
    volume: ev.CtVolume,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Patient (LPS, mm) coordinates of ``volume``'s columns ``(1, C)``, rows ``(R, 1)`` and
    slices ``(S,)`` (the volume is in the DICOM axial layout)."""
    slices, rows, cols = volume.hu.shape
    dz, dy, dx = volume.spacing
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine_ras
    x = lps[0, 3] + dx * np.arange(cols, dtype=np.float64)[None, :]
    y = lps[1, 3] + dy * np.arange(rows, dtype=np.float64)[:, None]
    z = lps[2, 3] + dz * np.arange(slices, dtype=np.float64)
    return x, y, z


def tissue_noise(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    """``n`` draws of the phantoms' voxel noise: normal, sd 8 HU, rounded, within +-9 HU."""
    return np.clip(np.rint(rng.normal(0.0, 8.0, n)), -9, 9)


def ellipsoid(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    z: float,
    centre: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> npt.NDArray[np.float64]:
    """Squared normalised distance from ``centre`` in the slice at ``z``: <= 1 inside the
    ellipsoid of ``radii`` (mm; ``x`` and ``y`` from :func:`patient_axes`)."""
    return (
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    )


def fill_pocket(
    hu: npt.NDArray[np.float32],
    pocket: npt.NDArray[np.bool_],
    gas_side: npt.NDArray[np.bool_],
    rng: np.random.Generator,
) -> None:
    """Fill ``pocket`` of the slice ``hu`` in place: gas (-1000 HU) where ``gas_side``, fluid
    (10 HU) in the rest, both with :func:`tissue_noise`."""
    gas = pocket & gas_side
    fluid = pocket & ~gas_side
    hu[gas] = -1000.0 + tissue_noise(rng, int(gas.sum()))
    hu[fluid] = 10.0 + tissue_noise(rng, int(fluid.sum()))


def carve_domes(volume: ev.CtVolume, seed: int) -> ev.CtVolume:
    """A rendered phantom whose lung bases wrap around diaphragm domes.

    ``ChestPhantom``'s lungs are ellipsoids, so their bases are round caps; a real lung base
    is a crescent around the liver's and spleen's domes, thinning to slivers beside them --
    what a 3 mm scan blurs and the network missed. Under each lung an ellipsoid of liver-like
    tissue (45-65 HU) rises :data:`DOME_RISE_MM` into the lung, shifted to the front (the
    posterior recess reaches lowest), and replaces the lung it overlaps.

    Under the left dome lies the stomach, its fundus often full of gas: a thin lung sliver
    then runs between gas and ribs, which the network called gas (soft tissue) when it had
    only seen gas below the lungs. So the left dome holds a gas bubble (:data:`FUNDUS_RADIUS`,
    :data:`FUNDUS_HEIGHT_MM`, to the side and front, sometimes with a fluid level) under its
    top, about :data:`FUNDUS_WALL_MM` from the lung; the HU rules still label it soft
    tissue (gas, not lung).
    """
    rng = np.random.default_rng(seed + 104729)
    rng_gas = np.random.default_rng(seed + 15485863)  # the domes stay as they were without it
    hu = volume.hu.copy()
    slices = hu.shape[0]
    x, y, z = patient_axes(volume)
    lung = (volume.hu > -910) & (volume.hu < -600)
    for side in (x < float(x.mean()), x >= float(x.mean())):
        mask = lung & side[None]
        zs = np.flatnonzero(mask.any(axis=(1, 2)))
        if zs.size == 0:
            continue
        rise = float(rng.uniform(*DOME_RISE_MM))
        level = int(np.clip(np.searchsorted(z, z[zs[0]] + rise), zs[0], zs[-1]))
        ys, xs = np.nonzero(mask[level])
        cx, cy = float(x[0, xs].mean()), float(y[ys, 0].mean())
        rx = 0.5 * float(x[0, xs].max() - x[0, xs].min()) * float(rng.uniform(*DOME_RADIUS))
        ry = 0.5 * float(y[ys, 0].max() - y[ys, 0].min()) * float(rng.uniform(*DOME_RADIUS))
        cy -= float(rng.uniform(0.1, 0.25)) * ry  # to the front
        top = float(z[zs[0]]) + rise
        rz = rise + float(rng.uniform(20.0, 60.0))
        liver = float(rng.uniform(45.0, 65.0))
        for k in range(slices):
            dome = ellipsoid(x, y, float(z[k]), (cx, cy, top - rz), (rx, ry, rz))
            m = (dome <= 1.0) & mask[k]
            hu[k][m] = liver + tissue_noise(rng, int(m.sum()))
        if side[0, -1]:  # the patient's left (LPS x grows to the left): the stomach
            wall = float(rng_gas.uniform(*FUNDUS_WALL_MM))
            gx = cx + float(rng_gas.uniform(0.1, 0.4)) * rx  # to the side ...
            gy = cy - float(rng_gas.uniform(-0.2, 0.4)) * ry  # ... and mostly to the front
            grx = float(rng_gas.uniform(*FUNDUS_RADIUS)) * rx
            gry = float(rng_gas.uniform(*FUNDUS_RADIUS)) * ry
            grz = float(rng_gas.uniform(*FUNDUS_HEIGHT_MM))
            gz = top - wall - grz
            fluid_y = gy + float(rng_gas.uniform(0.0, 1.5)) * gry  # fluid behind the level
            inner_radii = (rx - wall, ry - wall, rz - wall)
            for k in map(int, np.flatnonzero(np.abs(z - gz) < grz)):
                inner = ellipsoid(x, y, float(z[k]), (cx, cy, top - rz), inner_radii)
                bubble = ellipsoid(x, y, float(z[k]), (gx, gy, gz), (grx, gry, grz))
                pocket = (bubble <= 1.0) & (inner <= 1.0) & (hu[k] > -500.0)
                fill_pocket(hu[k], pocket, y < fluid_y, rng_gas)
    return ev.CtVolume(
        name=volume.name + "+domes", hu=hu, affine_ras=volume.affine_ras, spacing=volume.spacing
    )


def add_surroundings(volume: ev.CtVolume, seed: int) -> ev.CtVolume:
    """A rendered phantom with arms beside the chest, gas in the abdomen and a table.

    ``ChestPhantom`` has none of them, and the real training volumes have no arms lying
    beside the trunk; without them the network took the narrow air between arm and chest
    (lung-like HU once the slice is averaged down to 256 x 256), stomach gas for lung and
    the table's carbon plates for bone. Drawn here:

    - arms: ellipses along the whole volume, 0 to 12 mm from the body outline, with a fat rim,
      muscle and a humerus (cortex ring, fatty marrow), cut by the field of view as in real
      scans;
    - gas: :data:`GAS_POCKETS` ellipsoids of air, some with a fluid level, in the abdomen
      under the lungs and up beside the lung bases (stomach, bowel);
    - a curved table under the back: two 2-4 mm plates of 300-700 HU with foam between.

    Labels still come from ``hu_labels`` on the result.
    """
    rng = np.random.default_rng(seed + 7919)
    hu = volume.hu.copy()
    slices, rows, cols = hu.shape
    _, dy, dx = volume.spacing
    x, y, z = patient_axes(volume)
    body = hu > -500.0

    # gas pockets, in the abdomen under the lungs and beside the lung bases
    lung_slices = np.flatnonzero(((volume.hu > -910) & (volume.hu < -600)).any(axis=(1, 2)))
    lung_bottom = float(z[lung_slices[0]])
    for _ in range(int(rng.integers(*GAS_POCKETS))):
        c = (
            float(rng.uniform(-110, 110)),
            float(rng.uniform(-90, 20)),
            lung_bottom + float(rng.uniform(-GAS_BELOW_MM, 10)),
        )
        r = (float(rng.uniform(12, 45)), float(rng.uniform(8, 30)), float(rng.uniform(8, 25)))
        level = c[1] + float(rng.uniform(-0.3, 1.5)) * r[1]  # fluid below (posterior to) it
        for kz in np.flatnonzero(np.abs(z - c[2]) < r[2]):
            e = ellipsoid(x, y, float(z[kz]), c, r)
            deep = ndi.distance_transform_edt(body[kz], sampling=(dy, dx)) > GAS_DEPTH_MM
            pocket = (e <= 1.0) & deep & (volume.hu[kz] > -500.0)
            fill_pocket(hu[kz], pocket, y < level, rng)

    # arms
    fat_hu, soft_hu = float(rng.uniform(-110, -90)), 40.0
    arm_a, arm_b = float(rng.uniform(32, 42)), float(rng.uniform(38, 50))
    rim, gap = float(rng.uniform(4, 10)), float(rng.uniform(0, 12))
    bone_r, cortex = float(rng.uniform(10, 13)), float(rng.uniform(3, 4.5))
    y_arm = float(rng.uniform(-20, 30))
    for k in range(slices):
        cols_in = np.flatnonzero(body[k].any(axis=0))
        if cols_in.size == 0:
            continue
        for edge, side in ((float(x[0, cols_in[0]]), -1.0), (float(x[0, cols_in[-1]]), 1.0)):
            cx = edge + side * (gap + arm_a)
            r2 = ((x - cx) / arm_a) ** 2 + ((y - y_arm) / arm_b) ** 2
            inner = ((x - cx) / (arm_a - rim)) ** 2 + ((y - y_arm) / (arm_b - rim)) ** 2
            d2 = (x - cx) ** 2 + (y - y_arm) ** 2
            arm = np.full((rows, cols), np.nan, dtype=np.float32)
            arm[r2 <= 1.0] = fat_hu
            arm[inner <= 1.0] = soft_hu
            arm[d2 <= bone_r**2] = 900.0
            arm[d2 <= (bone_r - cortex) ** 2] = -60.0
            m = ~np.isnan(arm) & ~body[k]
            hu[k][m] = arm[m] + tissue_noise(rng, int(m.sum()))

    # table: two curved plates with foam between, under the lowest (most posterior) body row
    back = float(y[np.flatnonzero(body.any(axis=(0, 2)))[-1], 0])
    top = back + float(rng.uniform(4, 25))
    depth, curve = float(rng.uniform(30, 60)), 1.0 / (2.0 * float(rng.uniform(500, 1200)))
    half_width, plate = float(rng.uniform(180, 240)), float(rng.uniform(2, 4))
    plate_hu = float(rng.uniform(300, 700))
    y_top = top - curve * x**2  # (1, cols): the plate rises towards its edges
    inside = np.abs(x) <= half_width
    upper = (y >= y_top) & (y < y_top + plate) & inside
    lower = (y >= y_top + depth) & (y < y_top + depth + plate) & inside
    foam = (y >= y_top + plate) & (y < y_top + depth) & inside
    for k in range(slices):
        free = hu[k] < -500.0
        for m, value in ((foam, -950.0), (upper, plate_hu), (lower, plate_hu)):
            mm = m & free
            hu[k][mm] = value + tissue_noise(rng, int(mm.sum()))
    return ev.CtVolume(
        name=volume.name + "+arms+gas+table",
        hu=hu.astype(np.float32),
        affine_ras=volume.affine_ras,
        spacing=volume.spacing,
    )


def load_sources(data_root: Path, *, hold_out_lung: bool = False) -> list[Source]:
    """The real training volumes (without the lung bases' scan when ``hold_out_lung``)."""
    held = set(ev.LUNG_BASES_FILES) if hold_out_lung else set()
    sources = [
        Source(ev.load_nifti_ct(data_root / rel), (data_root / rel,), "nifti")
        for rel in NIFTI_FILES
        if rel not in held
    ]
    for rel in DICOM_FOLDERS:
        sources.extend(dicom_series(data_root / rel))
    if hold_out_lung:
        sources.extend(single_slice(data_root / rel) for rel in SLICE_FILES)
        sources.extend(
            Source(c, s.files, s.kind + f", averaged to {COARSE_MM:g} mm", s.repeat)
            for s in list(sources)
            if (c := coarsened(s.volume)) is not None
        )
    held_dir = (data_root / ev.EVAL_DICOM).resolve()
    held_files = {(data_root / rel).resolve() for rel in held}
    for s in sources:
        for f in s.files:
            if held_dir in f.resolve().parents or f.resolve() in held_files:
                raise RuntimeError(f"held-out file in training data: {f}")
    return sources


def slices_of(
    bundle: ev.Bundle, volume: ev.CtVolume
) -> tuple[torch.Tensor, torch.Tensor, npt.NDArray[np.int64]]:
    """Preprocessed axial slices (Z, 1, 256, 256), their labels (Z, 256, 256), label counts."""
    image = bundle.preprocess(volume)  # (1, 256, 256, Z)
    labels = hu_labels(volume.hu, volume.spacing)  # (slices, rows, columns)
    lab = torch.from_numpy(np.ascontiguousarray(labels.transpose(2, 1, 0)[None]))
    size = (int(image.shape[1]), int(image.shape[2]), int(image.shape[3]))
    small = Resize(spatial_size=size, mode="nearest")(lab.float())
    x = image.as_tensor().permute(3, 0, 1, 2).contiguous().float()
    y = torch.as_tensor(small).permute(3, 0, 1, 2)[:, 0].round().to(torch.uint8).contiguous()
    return x, y, np.bincount(labels.ravel(), minlength=len(LABEL_NAMES)).astype(np.int64)


def augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, coarse_p: float = 0.0
) -> tuple[torch.Tensor, ...]:
    """Random flips, 90-degree rotations, zoom, crop, coarsening and intensity shift, per slice.

    The zoom factor is uniform in :data:`ZOOM` (image bilinear, labels nearest; pixels a
    zoom-out leaves empty are air and background), then a random :data:`CROP` square is cut;
    with probability ``coarse_p`` the image is coarsened (see :data:`COARSE_FACTOR`; with 0 no
    random numbers are drawn for it, so the stream is that of the committed weights).
    """
    xs, ys = [], []
    scale = 1.0 / 1024.0  # HU -> the bundle's [-1, 1] units
    for i in range(x.shape[0]):
        xi, yi = x[i], y[i]
        r = torch.rand(9 if coarse_p else 7, generator=gen)
        if r[0] < 0.5:
            xi, yi = xi.flip(-1), yi.flip(-1)
        if r[1] < 0.5:
            xi, yi = xi.flip(-2), yi.flip(-2)
        k = int(r[2] * 4) % 4
        if k:
            xi, yi = torch.rot90(xi, k, (-2, -1)), torch.rot90(yi, k, (-2, -1))
        size = round(xi.shape[-1] * (ZOOM[0] + float(r[3]) * (ZOOM[1] - ZOOM[0])))
        xi = nnf.interpolate(xi[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        yi = nnf.interpolate(yi[None, None].float(), size=(size, size), mode="nearest")[0, 0]
        if size < CROP:
            pad = (CROP - size) // 2, CROP - size - (CROP - size) // 2
            xi = nnf.pad(xi, (pad[0], pad[1], pad[0], pad[1]), value=-1.0)
            yi = nnf.pad(yi, (pad[0], pad[1], pad[0], pad[1]), value=0.0)
            size = CROP
        top = int(float(r[4]) * (size - CROP + 1))
        left = int(float(r[5]) * (size - CROP + 1))
        xi = xi[:, top : top + CROP, left : left + CROP]
        yi = yi[top : top + CROP, left : left + CROP]
        if coarse_p and r[7] < coarse_p:
            f = COARSE_FACTOR[0] + float(r[8]) * (COARSE_FACTOR[1] - COARSE_FACTOR[0])
            low = nnf.interpolate(xi[None], size=(round(CROP / f),) * 2, mode="area")
            xi = nnf.interpolate(low, size=(CROP, CROP), mode="bilinear", align_corners=False)[0]
        shift = (float(r[6]) * 2.0 - 1.0) * SHIFT_HU * scale
        xs.append((xi + shift).clamp(-1.0, 1.0))
        ys.append(yi.round().to(torch.long))
    return torch.stack(xs), torch.stack(ys)


class Loss(torch.nn.Module):
    """Dice + cross-entropy, with class weights and extra weight on gas inside the body.

    Gas inside the body (pixels labelled soft tissue below :data:`GAS_HU`: bowel and stomach
    gas and the partial-volume rim around it, which the 256 x 256 averaging gives lung-like
    values) looks like lung to a slice-wise network; its cross-entropy weight is
    :data:`GAS_WEIGHT`.
    """

    def __init__(
        self, *, spare_lung_rim: bool = False, class_weights: Sequence[float] = CLASS_WEIGHTS
    ) -> None:
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True)
        self.class_weights = torch.tensor(tuple(class_weights), dtype=torch.float32)
        self.spare_lung_rim = spare_lung_rim

    def forward(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, 5, H, W), labels ``y`` (B, H, W), preprocessed images ``x``."""
        gas = (y == SOFT_TISSUE) & (x[:, 0] < GAS_HU / 1024.0)
        if self.spare_lung_rim:
            # the partial-volume rim just outside a lung is not gas: weighting it would pull
            # the lung's border inwards (blurred 3 mm lung bases lost their edge voxels)
            lung = (y == LUNG).float()[:, None]
            near = nnf.max_pool2d(lung, 2 * LUNG_RIM_PX + 1, stride=1, padding=LUNG_RIM_PX)
            gas &= near[:, 0] == 0
        w = torch.where(gas, GAS_WEIGHT, 1.0)
        ce = nnf.cross_entropy(logits, y, weight=self.class_weights, reduction="none")
        dice: torch.Tensor = self.dice(logits, y[:, None])
        return dice + (ce * w).mean()


def library_versions() -> dict[str, str]:
    """Versions of what the training ran on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "scipy": importlib.metadata.version("scipy"),
        "nibabel": nib.__version__,
        "pydicom": pydicom.__version__,
    }


def git_commit() -> dict[str, Any]:
    """The repository's HEAD commit and whether tracked files differ from it."""

    def run(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ev.REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    return {
        "commit": run("rev-parse", "HEAD"),
        "tracked_files_modified": bool(run("status", "--porcelain", "--untracked-files=no")),
    }


def train(
    data_root: Path,
    epochs: int,
    out: Path,
    *,
    hold_out_lung: bool = False,
    class_weights: Sequence[float] = CLASS_WEIGHTS,
) -> dict[str, Any]:
    """Train, save the weights to ``out``, return the provenance record."""
    t_start = time.perf_counter()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)
    rng = np.random.default_rng(SEED)

    bundle = ev.Bundle(None)  # the bundle's untrained network and transforms
    net = bundle.network
    print(f"network: {sum(p.numel() for p in net.parameters()):,} parameters")

    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    records: list[dict[str, Any]] = []
    counts = np.zeros(len(LABEL_NAMES), dtype=np.int64)
    sources = load_sources(data_root, hold_out_lung=hold_out_lung)
    coarse_p = COARSE_P if hold_out_lung else 0.0
    for src in sources:
        x, y, c = slices_of(bundle, src.volume)
        if src.repeat > 1:
            x, y = x.repeat(src.repeat, 1, 1, 1), y.repeat(src.repeat, 1, 1)
        xs.append(x)
        ys.append(y)
        counts += c
        records.append(
            {
                "name": src.volume.name,
                "kind": src.kind,
                "shape": list(src.volume.hu.shape),
                "spacing_mm": [round(s, 4) for s in src.volume.spacing],
                "slices_used": int(x.shape[0]),
                "files": [
                    {"path": str(f.relative_to(data_root)), "sha256": ev.sha256(f)}
                    for f in src.files
                ],
            }
        )
        print(f"  {src.volume.name}: {tuple(src.volume.hu.shape)}, {x.shape[0]} slices")
    for seed in PHANTOM_SEEDS:
        phantom = ev.phantom_for_seed(seed)
        size = int(rng.choice([384, 512]))
        fov = float(rng.uniform(*PHANTOM_FOV_MM))
        vol, _ = ev.render_phantom(
            phantom, size=size, fov_mm=fov, step_mm=5.0, seed=seed, below_mm=PHANTOM_BELOW_MM
        )
        if hold_out_lung:
            vol = carve_domes(vol, seed)
        vol = add_surroundings(vol, seed)
        x, y, c = slices_of(bundle, vol)
        pick = np.sort(rng.choice(x.shape[0], size=min(PHANTOM_SLICES, x.shape[0]), replace=False))
        if hold_out_lung:  # and every slice of the lung bases (the domes)
            lung_z = np.flatnonzero((y == LUNG).any(dim=(1, 2)).numpy())
            if lung_z.size:
                base_z = lung_z[lung_z < lung_z[0] + BASE_SLICES]
                pick = np.union1d(pick, base_z)
        xs.append(x[pick])
        ys.append(y[pick])
        counts += c
        used = len(pick)
        if hold_out_lung and (coarse := coarsened(vol)) is not None:
            # the same slices at 3 mm in-plane (z is already coarser)
            cx_, cy_, cc = slices_of(bundle, coarse)
            xs.append(cx_[pick])
            ys.append(cy_[pick])
            counts += cc
            used += len(pick)
        records.append(
            {
                "name": vol.name,
                "kind": "synthetic: pipeline.synth ChestPhantom (evaluate.phantom_for_seed) "
                "with arms, gas pockets and a table (train.add_surroundings)",
                "shape": list(vol.hu.shape),
                "spacing_mm": [round(s, 4) for s in vol.spacing],
                "slices_used": used,
                "files": [],
            }
        )
        print(f"  {vol.name}: {tuple(vol.hu.shape)}, {used} slices")
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    n = int(x_all.shape[0])
    print(f"{n} training slices; label voxels at full resolution: {counts.tolist()}")
    t_data = time.perf_counter() - t_start

    loss_fn = Loss(spare_lung_rim=hold_out_lung, class_weights=class_weights)
    opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    steps = epochs * ((n + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=steps, eta_min=FINAL_LEARNING_RATE
    )
    net.train()
    history: list[float] = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        total, batches = 0.0, 0
        for b in range(0, n, BATCH):
            idx = order[b : b + BATCH]
            x, y = augment(x_all[idx], y_all[idx], gen, coarse_p)
            opt.zero_grad()
            loss = loss_fn(net(x), y, x)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            batches += 1
        history.append(total / batches)
        print(
            f"epoch {epoch + 1:3d}/{epochs}: loss {history[-1]:.4f}"
            f"  ({time.perf_counter() - t0:.0f} s, {time.perf_counter() - t_start:.0f} s total)",
            flush=True,
        )
    net.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in net.state_dict().items()
    }
    torch.save(state, out)
    wall = time.perf_counter() - t_start
    print(f"saved {out} ({out.stat().st_size:,} bytes) after {wall:.0f} s")
    return {
        "model": {
            "path": str(out.resolve().relative_to(ev.BUNDLE_DIR))
            if out.resolve().is_relative_to(ev.BUNDLE_DIR)
            else str(out),
            "sha256": ev.sha256(out),
            "bytes": out.stat().st_size,
        },
        "seed": SEED,
        "epochs": epochs,
        "batch": BATCH,
        "optimizer": f"Adam, lr {LEARNING_RATE} cosine to {FINAL_LEARNING_RATE}",
        "loss": f"Dice (softmax) + cross-entropy, class weights {list(class_weights)}, "
        f"gas voxels weighted {GAS_WEIGHT}"
        + (f" (not within {LUNG_RIM_PX} px of lung)" if hold_out_lung else ""),
        "augmentation": f"flips, 90-degree rotations, zoom {ZOOM}, {CROP}x{CROP} crops, "
        + (f"coarsening p={coarse_p} factor {COARSE_FACTOR}, " if coarse_p else "")
        + f"intensity shift +-{SHIFT_HU} HU",
        "slices": n,
        "label_voxels_full_resolution": dict(zip(LABEL_NAMES, counts.tolist(), strict=True)),
        "loss_per_epoch": [round(v, 5) for v in history],
        "wall_time_s": {"data": round(t_data, 1), "total": round(wall, 1)},
        "threads": torch.get_num_threads(),
        "training_data": records,
        "held_out": [
            str(ev.EVAL_DICOM),
            *(str(p) for p in (ev.LUNG_BASES_FILES if hold_out_lung else ())),
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, evaluate, write the provenance."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ev.DATA_ROOT, help="shared data root")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--out", type=Path, default=MODEL_PATH, help="where to write model.pt")
    ap.add_argument("--no-eval", action="store_true", help="skip evaluate.py's metrics")
    ap.add_argument(
        "--train-on-lung-bases",
        action="store_true",
        help="the earlier recipe: train on example_ct/example_ct_sm (the lung bases, then no "
        "longer an independent test of lung Dice) without the additions that replace them",
    )
    ap.add_argument(
        "--class-weights",
        type=lambda text: tuple(float(v) for v in text.split(",")),
        default=CLASS_WEIGHTS,
        help="cross-entropy weights of background, soft tissue, adipose, bone, lung "
        f"(default {','.join(f'{w:g}' for w in CLASS_WEIGHTS)})",
    )
    args = ap.parse_args(argv)
    if len(args.class_weights) != len(LABEL_NAMES):
        ap.error(f"--class-weights needs {len(LABEL_NAMES)} numbers")
    git = git_commit()  # the code as training starts
    hold_out_lung = not args.train_on_lung_bases
    record = train(
        args.data,
        args.epochs,
        args.out,
        hold_out_lung=hold_out_lung,
        class_weights=args.class_weights,
    )
    given = list(argv) if argv is not None else sys.argv[1:]
    record["command"] = " ".join(["scripts/train.py", *given])
    record["git"] = git
    record["versions"] = library_versions()
    record["hu_rules"] = "pipeline/infer/hu_rules.py"
    if not args.no_eval:
        print("evaluating ...", flush=True)
        record["final_metrics"] = ev.evaluate(
            args.data, args.out, lung_bases_held_out=hold_out_lung
        )
        print(json.dumps(record["final_metrics"], indent=2))
    if args.out.resolve() == MODEL_PATH.resolve():
        PROVENANCE_PATH.parent.mkdir(parents=True, exist_ok=True)
        PROVENANCE_PATH.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {PROVENANCE_PATH}")
    else:
        beside = args.out.with_name(args.out.stem + ".provenance.json")
        beside.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {beside}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
