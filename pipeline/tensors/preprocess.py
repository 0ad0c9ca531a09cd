"""Preprocessing of a volume as configured (``tensors:`` in the config), with its affine kept exact.

Steps, in order, each optional: reorientation to the closest RAS or LPS axes (a permutation and
flips of the array, no interpolation: values unchanged), resampling to a target spacing (torch
``interpolate`` with ``align_corners=True``, so the first and last voxel centres stay where they
were and the affine stays exact; the spacing achieved is recorded), an intensity window
(clip), a normalisation, a dtype. :func:`preprocessing_hash` names the result: the store keeps
one file per (series, de-identification version, preprocessing hash).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.config import TensorsConfig
from pipeline.dicom.volume import Volume, VolumeGrid

__all__ = [
    "Preprocessed",
    "preprocess",
    "preprocess_volume",
    "preprocessing_hash",
    "preprocessing_json",
]

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


def preprocess_volume(volume: Volume, cfg: TensorsConfig) -> Volume:
    """:func:`preprocess` of a :class:`~pipeline.dicom.volume.Volume`: the same volume (its
    slice UIDs and frame numbers kept) with the preprocessed array, affine and spacing, and
    its ``grid`` saying whether it still lies on the source frames' grid."""
    from dataclasses import replace

    out = preprocess(volume.array, volume.affine, volume.spacing, cfg)
    grid = VolumeGrid.from_preprocessing(cfg.preprocessing_json())
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
