"""Thumbnails that show the lesion: a crop around the finding on its middle slice, its
outline drawn (not filled, so its density stays visible), scaled up to a fixed side."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.review.render import WINDOWS, VolumeCache, default_slice

__all__ = ["crop_box", "thumbnail_png"]

_OUTLINE = np.array([255, 60, 40], dtype=np.uint8)


def crop_box(
    bbox: list[int] | None, rows: int, cols: int, *, margin: float = 2.0, min_side: int = 16
) -> tuple[int, int, int, int]:
    """``(j0, j1, i0, i1)`` (end exclusive) of a square crop around a finding's box
    ``[k0, j0, i0, k1, j1, i1]``: the box's larger side plus ``margin`` times it, at least
    ``min_side`` voxels, kept within the slice. Without a box: the whole slice."""
    if not bbox:
        return 0, rows, 0, cols
    j0, i0, j1, i1 = int(bbox[1]), int(bbox[2]), int(bbox[4]), int(bbox[5])
    extent = max(j1 - j0 + 1, i1 - i0 + 1)
    side = min(max(round(extent * (1 + margin)), min_side), rows, cols)
    cj, ci = (j0 + j1 + 1) / 2, (i0 + i1 + 1) / 2
    a = round(cj - side / 2)
    b = round(ci - side / 2)
    a = min(max(a, 0), rows - side)
    b = min(max(b, 0), cols - side)
    return a, a + side, b, b + side


def _window(f: Mapping[str, Any], volumes: VolumeCache, path: str) -> tuple[float, float]:
    if f.get("Modality") == "CT" and f.get("rescaled", True):
        lung = "lung" in str(f.get("label") or "") or "nodule" in str(f.get("label") or "")
        preset = WINDOWS["lung" if lung else "soft-tissue"]
        if preset is not None:
            return preset
    return volumes.auto_window(path)


def thumbnail_png(volumes: VolumeCache, f: Mapping[str, Any], *, side: int = 112) -> bytes:
    """A ``side`` x ``side`` PNG of the finding: its middle slice cropped around its box, the
    outline of its mask (or box) drawn."""
    from PIL import Image

    path = str(f["tensor_path"])
    vol = volumes.get(path)
    k = min(max(default_slice(dict(f)), 0), vol.shape[0] - 1)
    centre, width = _window(f, volumes, path)
    bbox = f.get("bbox")
    j0, j1, i0, i1 = crop_box(bbox, vol.shape[1], vol.shape[2])
    plane = np.asarray(vol[k, j0:j1, i0:i1], dtype=np.float32)
    grey = np.clip((plane - (centre - width / 2)) / max(width, 1e-6), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    inside: np.ndarray[Any, Any] | None = None
    if f.get("mask_path") and f.get("label_value") is not None:
        mask = volumes.get(str(f["mask_path"]))
        inside = np.asarray(mask[k, j0:j1, i0:i1]) == int(f["label_value"])
    elif bbox and f.get("box_mm"):
        inside = np.zeros(plane.shape, dtype=bool)
        inside[
            max(int(bbox[1]) - j0, 0) : int(bbox[4]) - j0 + 1,
            max(int(bbox[2]) - i0, 0) : int(bbox[5]) - i0 + 1,
        ] = True
    img = Image.fromarray(rgb, mode="RGB")
    factor = max(1, -(-side // max(img.width, img.height)))
    img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    if inside is not None and inside.any():
        # the outline on the scaled image: the edge pixels of each inside voxel's block
        big = np.kron(inside.astype(np.uint8), np.ones((factor, factor), dtype=np.uint8)) > 0
        pad = np.pad(big, 1)
        edge = big & ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
        arr = np.asarray(img).copy()
        arr[edge] = _OUTLINE
        img = Image.fromarray(arr, mode="RGB")
    if img.width != side or img.height != side:
        img = img.resize((side, side), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
