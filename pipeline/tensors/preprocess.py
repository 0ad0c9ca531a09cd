"""Preprocessing of a volume as configured (``tensors:`` in the config), with its affine kept exact.

Steps, in order, each optional: de-tilting of a gantry-tilted stack (:func:`detilt`, only in
:func:`preprocess_volume`, as ``tensors.gantry_tilt: detilt`` says), equalizing a stack whose
slice spacing varies (:func:`equalize`, likewise, as ``tensors.variable_spacing: equalize``
says; after de-tilting, dcm2niix's order for its ``_Tilt_Eq`` output), reorientation to the
closest RAS or LPS axes (a permutation and flips of the array, no interpolation: values
unchanged), resampling to a target spacing (torch
``interpolate`` with ``align_corners=True``, so the first and last voxel centres stay where they
were and the affine stays exact; the spacing achieved is recorded), an intensity window
(clip), a normalisation, a dtype. :func:`preprocessing_hash` names the result: the store keeps
one file per (series, de-identification version, preprocessing hash).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from pipeline.config import TensorsConfig
from pipeline.dicom.volume import Volume, VolumeGrid
from pipeline.errors import GeometryError

__all__ = [
    "EqualizePlan",
    "Preprocessed",
    "Shear",
    "detilt",
    "equalize",
    "equalize_plan",
    "preprocess",
    "preprocess_volume",
    "preprocessing_hash",
    "preprocessing_json",
    "shear_of",
    "volume_preprocessing_json",
]

#: a slice stack whose step leaves the normal by less than this (degrees) is not tilted (the
#: builder's TILT_TOL_DEG)
_TILT_TOL_DEG: Final = 0.05

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def preprocessing_json(cfg: TensorsConfig) -> str:
    """The preprocessing as canonical JSON (what the hash covers; stored with each tensor)."""
    return cfg.preprocessing_json()


def preprocessing_hash(cfg: TensorsConfig) -> str:
    """A short stable name of the preprocessing (16 hex digits of SHA-256)."""
    return cfg.preprocessing_hash()


class Preprocessed:
    """A preprocessed array with its affine (voxel (i, j, k) -> LPS mm) and spacing."""

    def __init__(
        self, array: npt.NDArray[Any], affine: npt.NDArray[np.float64], spacing: tuple[float, ...]
    ) -> None:
        self.array = array
        self.affine = affine
        self.spacing = spacing


def _reorient(
    array: npt.NDArray[Any], affine: npt.NDArray[np.float64], codes: tuple[str, str, str]
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    ijk = array.transpose(2, 1, 0) if array.ndim == 3 else array.transpose(2, 1, 0, 3)
    ras = _LPS_TO_RAS @ affine
    transform = ornt_transform(io_orientation(ras), axcodes2ornt(codes))
    out = apply_orientation(ijk, transform)
    ras_out = ras @ inv_ornt_aff(transform, ijk.shape)
    back = out.transpose(2, 1, 0) if out.ndim == 3 else out.transpose(2, 1, 0, 3)
    return np.ascontiguousarray(back), _LPS_TO_RAS @ ras_out


def _resample(
    array: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    spacing: tuple[float, float, float],
    target: tuple[float, float, float],
    mode: str,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64], tuple[float, float, float]]:
    import torch

    shape = array.shape[:3]
    new = tuple(
        max(2, round((n - 1) * s / t) + 1) for n, s, t in zip(shape, spacing, target, strict=True)
    )
    achieved = tuple((n - 1) * s / (m - 1) for n, s, m in zip(shape, spacing, new, strict=True))
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if mode == "nearest":
        out = torch.nn.functional.interpolate(tensor, size=new, mode="nearest-exact")
    else:
        out = torch.nn.functional.interpolate(
            tensor, size=new, mode="trilinear", align_corners=True
        )
    resampled = out[0, 0].numpy()
    scaled = affine.copy()
    # affine columns are (i=column, j=row, k=slice); spacing is in array order (k, j, i)
    for col, axis in ((0, 2), (1, 1), (2, 0)):
        scaled[:3, col] *= achieved[axis] / spacing[axis]
    return resampled, scaled, (achieved[0], achieved[1], achieved[2])


def preprocess(
    array: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    spacing: tuple[float, float, float],
    cfg: TensorsConfig,
) -> Preprocessed:
    """Apply the configured preprocessing; the defaults return the input unchanged."""
    if cfg.orientation != "native":
        codes = ("R", "A", "S") if cfg.orientation == "RAS" else ("L", "P", "S")
        array, affine = _reorient(array, affine, codes)
        spacing = (
            float(np.linalg.norm(affine[:3, 2])),
            float(np.linalg.norm(affine[:3, 1])),
            float(np.linalg.norm(affine[:3, 0])),
        )
    if cfg.spacing is not None and array.ndim == 3:
        target = (float(cfg.spacing[0]), float(cfg.spacing[1]), float(cfg.spacing[2]))
        array, affine, spacing = _resample(array, affine, spacing, target, cfg.interpolation)
    if cfg.window is not None:
        center, width = cfg.window
        array = np.clip(array.astype(np.float32), center - width / 2, center + width / 2)
    if cfg.normalize == "minmax":
        lo, hi = float(array.min()), float(array.max())
        array = (array.astype(np.float32) - lo) / ((hi - lo) or 1.0)
    elif cfg.normalize == "zscore":
        mean, std = float(array.mean()), float(array.std())
        array = (array.astype(np.float32) - mean) / (std or 1.0)
    if cfg.dtype == "float32":
        array = array.astype(np.float32)
    elif cfg.dtype == "int16":
        array = np.clip(np.rint(array), -32768, 32767).astype(np.int16)
    return Preprocessed(np.ascontiguousarray(array), affine, spacing)


class Shear:
    """The in-plane shift per slice of a volume's affine (a gantry-tilted stack).

    ``along_i`` and ``along_j`` are the shift per slice in voxels along the columns (i) and
    rows (j) axes, ``step`` the distance between slices along the normal (mm) and ``degrees``
    the angle between the slice step and the normal.
    """

    def __init__(self, along_i: float, along_j: float, step: float, degrees: float) -> None:
        self.along_i = along_i
        self.along_j = along_j
        self.step = step
        self.degrees = degrees


def shear_of(affine: npt.NDArray[np.float64]) -> Shear | None:
    """The shear of ``affine`` (voxel (i, j, k) -> LPS mm), or None when its slice step lies
    along the slice normal (within the builder's tilt tolerance)."""
    c0, c1, c2 = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    normal = np.cross(c0, c1)
    normal = normal / (np.linalg.norm(normal) or 1.0)
    a, b, d = np.linalg.solve(np.stack([c0, c1, normal], axis=1), c2)
    inplane = float(np.linalg.norm(c2 - d * normal))
    degrees = math.degrees(math.atan2(inplane, abs(float(d))))
    if degrees <= _TILT_TOL_DEG:
        return None
    return Shear(float(a), float(b), float(d), degrees)


def _round_half_away(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """C's ``round``: halves away from zero (dcm2niix rounds its interpolated values so)."""
    return np.asarray(np.sign(values) * np.floor(np.abs(values) + 0.5), dtype=np.float64)


def _tilt_axis(shear: Shear) -> tuple[int, float]:
    """(array axis of the shift: 1 rows / 2 columns, shift per slice in voxels) of a tilt.

    Raises
    ------
    GeometryError
        If the shift lies along both in-plane axes (not a gantry tilt).
    """
    if min(abs(shear.along_j), abs(shear.along_i)) > 1e-3:
        raise GeometryError(
            f"sheared along both in-plane axes ({shear.degrees:.1f} degrees): not a gantry "
            "tilt, cannot be de-tilted (tensors.gantry_tilt: sheared keeps it as stored)"
        )
    if abs(shear.along_j) >= abs(shear.along_i):
        return 1, shear.along_j
    return 2, shear.along_i


def detilt(volume: Volume) -> Volume:
    """A gantry-tilted volume resampled onto an orthogonal grid, as dcm2niix's ``_Tilt_1``.

    Each slice keeps its position along the normal and its in-plane grid; the tilt's shift
    (a constant number of voxels per slice along one in-plane axis, normally the rows, or per
    mean step along the normal for a stack of varying spacing, whose
    :attr:`~pipeline.dicom.volume.Volume.slice_positions` it keeps) is undone by linear
    interpolation along that axis. The axis grows by the shift of the last
    slice (rounded up) so no voxel is lost, and the voxels it brings in are the Pixel Padding
    Value, else the volume's minimum; where an interpolated voxel has the padding value as a
    neighbour, it takes the nearest neighbour's value (dcm2niix, issue 262). Integer arrays
    are rounded half away from zero and keep their dtype. The result is
    :attr:`~pipeline.dicom.volume.VolumeGrid.RESAMPLED` (rows shifted by fractions of a voxel:
    masks on it do not map back onto the frames).

    Raises
    ------
    GeometryError
        If the shift lies along both in-plane axes (not a gantry tilt).
    """
    shear = shear_of(volume.affine)
    if shear is None:
        return volume
    axis, per_slice = _tilt_axis(shear)
    col = 1 if axis == 1 else 0  # the affine column of that array axis
    array = volume.array
    n_slices, n_in = array.shape[0], array.shape[axis]
    slices = (
        np.arange(n_slices, dtype=np.float64)
        if volume.slice_positions is None
        else np.asarray(volume.slice_positions, dtype=np.float64) / shear.step
    )
    shift = per_slice * slices  # source = out + low - shift
    added = math.ceil(abs(float(shift[-1])) - 1e-6)
    # the grid stays aligned with the first slice's (dcm2niix): whole voxels are added on the
    # side the stack shifts to
    low = 0.0 if shift[-1] >= 0 else float(-added)
    n_out = n_in + added
    fill = volume.padding if volume.padding is not None else float(array.min())
    work = np.moveaxis(array, axis, 1)
    out = np.full((n_slices, n_out, *work.shape[2:]), fill, dtype=np.float64)
    for k in range(n_slices):
        # output index j reads the source at j + offset: rows base + j and base + j + 1
        offset = low - float(shift[k])
        base = math.floor(offset + 1e-9)
        frac = max(0.0, offset - base)
        first = max(0, -base)  # first output index whose source is >= 0
        last = min(n_out, n_in - base - (1 if frac > 1e-9 else 0))  # source <= n_in - 1
        if last <= first:
            continue
        a = work[k, first + base : last + base].astype(np.float32)
        if frac > 1e-9:
            b = work[k, first + base + 1 : last + base + 1].astype(np.float32)
            value = a * np.float32(1.0 - frac) + b * np.float32(frac)
            if volume.padding is not None:
                pad = (a == volume.padding) | (b == volume.padding)
                value = np.where(pad, b if frac >= 0.5 else a, value)
        else:
            value = a
        out[k, first:last] = value
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(_round_half_away(out), info.min, info.max)
    result = np.ascontiguousarray(np.moveaxis(out, 1, axis).astype(array.dtype))
    affine = volume.affine.copy()
    normal = volume.normal
    affine[:3, 2] = normal * shear.step
    affine[:3, 3] = affine[:3, 3] + low * volume.affine[:3, col]
    return replace(volume, array=result, affine=affine, grid=VolumeGrid.RESAMPLED)


@dataclass(frozen=True)
class EqualizePlan:
    """How :func:`equalize` makes each output slice: ``frac[s]`` of source slice ``hi[s]`` plus
    ``1 - frac[s]`` of source slice ``lo[s]`` (``lo == hi`` and ``frac == 1``: a copy).

    ``spacing`` is the output step along the normal (mm), ``dcm2niix_slices`` how many output
    slices dcm2niix's ``_Eq`` image has (the first ones of this plan)."""

    spacing: float
    lo: npt.NDArray[np.intp]
    hi: npt.NDArray[np.intp]
    frac: npt.NDArray[np.float32]
    dcm2niix_slices: int

    @property
    def slices(self) -> int:
        """The number of output slices."""
        return len(self.lo)


def equalize_plan(positions: Sequence[float]) -> EqualizePlan:
    """dcm2niix's equalization (``nii_saveNII3Deq``) of slices at ``positions`` (mm from the
    first slice along the normal, ascending).

    The step is the smallest step between slices; when that would make more than twice as
    many slices as the stack has, the step is the extent over ``2 n - 1`` (``2 n`` slices from
    the first slice to the last). Output slice ``s`` at ``s * step`` interpolates linearly
    between the nearest source slices below and above it. The weights are computed in float32,
    as dcm2niix does. dcm2niix's slice count (``ceil((last - half the last step) / step)``)
    can stop short of the last slice by up to one and a half steps; pacsflow continues the
    same grid to the last slice, so its first ``dcm2niix_slices`` slices are dcm2niix's.

    Raises
    ------
    GeometryError
        If fewer than two positions, or positions that do not ascend.
    """
    d32 = np.asarray(positions, dtype=np.float32)
    d64 = np.asarray(positions, dtype=np.float64)
    n = len(d64)
    steps = np.diff(d32)
    if n < 2 or np.any(steps <= 0):
        raise GeometryError(
            "cannot equalize slice spacing: slice positions do not ascend along the normal"
        )
    step32 = np.float32(np.min(steps))
    step = float(np.min(np.diff(d64)))
    last, prev = float(d32[-1]), float(d32[-2])
    count = math.ceil((last - 0.5 * (last - prev)) / float(step32))
    if count > 2 * n:
        count = 2 * n
        step32 = np.float32(d32[-1] / np.float32(count - 1))
        step = float(d64[-1]) / (count - 1)
        total = count
    else:
        total = max(count, math.floor(float(d64[-1]) / step + 1e-6) + 1)
    x = np.arange(total, dtype=np.float32) * step32
    hi = np.minimum(np.searchsorted(d32, x, side="left"), n - 1)
    lo = np.maximum(hi - 1, 0)
    mm_hi, mm_lo = d32[hi], d32[lo]
    copy = (mm_hi == mm_lo) | (x > mm_hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(copy, np.float32(1.0), (x - mm_lo) / (mm_hi - mm_lo)).astype(np.float32)
    lo = np.where(copy, hi, lo)
    return EqualizePlan(
        spacing=step,
        lo=lo.astype(np.intp),
        hi=hi.astype(np.intp),
        frac=frac,
        dcm2niix_slices=count,
    )


def equalize(volume: Volume) -> Volume:
    """A stack of varying slice spacing resampled onto a uniform grid along its slice
    direction, as dcm2niix's ``_Eq`` output (:func:`equalize_plan`); a volume without
    :attr:`~pipeline.dicom.volume.Volume.slice_positions` is returned as it is.

    Each output slice is ``round(lo * (1 - f) + hi * f)`` in float32 arithmetic, rounded half
    away from zero and clipped to the dtype for integer arrays (dcm2niix); float arrays are not
    rounded (dcm2niix rounds them too, which would quantise e.g. MR parametric maps). Where one
    of the two source voxels holds the Pixel Padding Value, the nearer one is taken (the rule
    dcm2niix applies when de-tilting, issue 262; its ``_Eq`` step blends padding into tissue).
    The slice direction keeps its shear (a volume that is not de-tilted stays sheared, with the
    exact affine); the slices keep their in-plane grid. The result is
    :attr:`~pipeline.dicom.volume.VolumeGrid.RESAMPLED`; its slice UIDs and frame numbers stay
    those of the source slices.

    Raises
    ------
    GeometryError
        If the slice positions do not ascend.
    """
    if volume.slice_positions is None:
        return volume
    plan = equalize_plan(volume.slice_positions)
    array = volume.array
    integer = np.issubdtype(array.dtype, np.integer)
    out = np.empty((plan.slices, *array.shape[1:]), dtype=array.dtype)
    pad = volume.padding
    for s in range(plan.slices):
        lo, hi, frac = int(plan.lo[s]), int(plan.hi[s]), plan.frac[s]
        if lo == hi:
            out[s] = array[hi]
            continue
        a = array[lo].astype(np.float32)
        b = array[hi].astype(np.float32)
        value = a * np.float32(1.0 - float(frac)) + b * frac
        if integer:
            info = np.iinfo(array.dtype)
            value = np.clip(_round_half_away(value.astype(np.float64)), info.min, info.max)
        if pad is not None:
            near = array[hi] if frac >= 0.5 else array[lo]
            value = np.where((array[lo] == pad) | (array[hi] == pad), near, value)
        out[s] = value
    affine = volume.affine.copy()
    along = float(affine[:3, 2] @ volume.normal)  # the mean step along the normal
    affine[:3, 2] = affine[:3, 2] * (plan.spacing / along)
    return replace(
        volume,
        array=out,
        affine=affine,
        spacing=(plan.spacing, volume.spacing[1], volume.spacing[2]),
        grid=VolumeGrid.RESAMPLED,
        slice_positions=None,
    )


def volume_preprocessing_json(volume: Volume, cfg: TensorsConfig) -> str:
    """The preprocessing of one volume as the ``tensors`` table stores it: the configured one
    (:meth:`~pipeline.config.TensorsConfig.preprocessing_json`), plus, for a gantry-tilted
    volume that ``gantry_tilt: detilt`` resamples, ``detilt`` (the tilt in degrees and the
    voxels added along the sheared axis), and for a stack of varying spacing, ``equalize``
    (the source steps along the normal in mm, the output spacing and slice count), so that
    readers (write-back) know its grid is not the frames'.

    Raises
    ------
    GeometryError
        If the volume is tilted, ``detilt`` is configured and it cannot be de-tilted, or its
        spacing varies and ``variable_spacing`` is not ``equalize``.
    """
    text = cfg.preprocessing_json()
    shear = shear_of(volume.affine) if cfg.gantry_tilt == "detilt" else None
    positions = volume.slice_positions
    if shear is None and positions is None:
        return text
    data = json.loads(text)
    if shear is not None:
        axis, per_slice = _tilt_axis(shear)
        data["detilt"] = {
            "axis": "rows" if axis == 1 else "columns",
            "degrees": round(shear.degrees, 4),
            "added": math.ceil(abs(per_slice) * (volume.array.shape[0] - 1) - 1e-6),
        }
    if positions is not None:
        if cfg.variable_spacing != "equalize":
            raise GeometryError(
                "variable slice spacing: the volume is not equalized "
                "(tensors.variable_spacing is refuse)"
            )
        plan = equalize_plan(positions)
        data["equalize"] = {
            "steps": [round(float(v), 4) for v in np.diff(positions)],
            "spacing": round(plan.spacing, 6),
            "slices": plan.slices,
        }
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def preprocess_volume(volume: Volume, cfg: TensorsConfig) -> Volume:
    """:func:`preprocess` of a :class:`~pipeline.dicom.volume.Volume`: the same volume (its
    slice UIDs and frame numbers kept) with the preprocessed array, affine and spacing, and
    its ``grid`` saying whether it still lies on the source frames' grid. A gantry-tilted
    volume is de-tilted first (:func:`detilt`) when ``cfg.gantry_tilt`` is ``detilt``, then a
    stack of varying spacing equalized (:func:`equalize`) when ``cfg.variable_spacing`` is
    ``equalize``.

    Raises
    ------
    GeometryError
        If a tilted volume cannot be de-tilted (see :func:`detilt`), or a stack of varying
        spacing is not to be equalized.
    """
    if cfg.gantry_tilt == "detilt":
        volume = detilt(volume)
    if volume.slice_positions is not None:
        if cfg.variable_spacing != "equalize":
            raise GeometryError(
                "variable slice spacing: the volume is not equalized "
                "(tensors.variable_spacing is refuse)"
            )
        volume = equalize(volume)
    out = preprocess(volume.array, volume.affine, volume.spacing, cfg)
    grid = VolumeGrid.from_preprocessing(cfg.preprocessing_json())
    if volume.grid is VolumeGrid.RESAMPLED:
        grid = VolumeGrid.RESAMPLED
    if grid is VolumeGrid.NATIVE:
        return replace(volume, array=out.array, affine=out.affine)
    cosines = [out.affine[:3, c] / (np.linalg.norm(out.affine[:3, c]) or 1.0) for c in (0, 1)]
    o = [float(v) for v in np.concatenate(cosines)]
    return replace(
        volume,
        array=out.array,
        affine=out.affine,
        spacing=(float(out.spacing[0]), float(out.spacing[1]), float(out.spacing[2])),
        orientation=(o[0], o[1], o[2], o[3], o[4], o[5]),
        grid=grid,
    )
