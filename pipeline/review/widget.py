"""A notebook widget that shows a research volume with a finding's mask over it (ipyniivue).

``volume_viewer(lake, tensor_key, mask_path)`` returns an ``ipyniivue.NiiVue`` widget: the
volume in grey (a CT soft-tissue window by default) and the mask as a coloured overlay,
in three planes, scrollable in the notebook. The volume and mask travel to the browser as
in-memory NIfTI-1 bytes (gzipped), so nothing is written to disk and nothing is fetched: the
widget's JavaScript (NiiVue) ships inside the ipyniivue wheel, no CDN.

Reads ``research/`` only. Needs ``ipyniivue`` (``pip install 'pacsflow[notebooks]'``).
"""

from __future__ import annotations

import gzip
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline._deps import optional_import
from pipeline.lake import LakePaths, load_tensor, read_table
from pipeline.review.nifti import nifti_header

__all__ = ["nifti_bytes", "volume_viewer"]

#: Array dtypes a NIfTI carries as they are; others are widened (float32 or int32).
_AS_IS = frozenset({"uint8", "int8", "int16", "uint16", "int32", "float32"})


def nifti_bytes(array: np.ndarray[Any, Any], affine_lps: Any, *, gz: bool = True) -> bytes:
    """A (slices, rows, columns) array with its ``tensors.affine`` (voxel -> LPS mm) as the
    bytes of a NIfTI-1 file in RAS mm (``.nii``, or ``.nii.gz`` when ``gz``)."""
    if array.ndim != 3:
        raise ValueError(f"a 3-D volume is shown, not a {array.ndim}-D array")
    if array.dtype.name not in _AS_IS:
        array = array.astype(np.float32 if array.dtype.kind == "f" else np.int32)
    array = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
    body = nifti_header(array.shape, array.dtype, list(affine_lps)) + array.tobytes()
    return gzip.compress(body, compresslevel=1, mtime=0) if gz else body


def volume_viewer(
    lake: LakePaths,
    tensor_key: str,
    mask_path: str | None = None,
    *,
    window: tuple[float, float] = (40.0, 400.0),
    height: int = 420,
) -> Any:
    """An ipyniivue ``NiiVue`` widget of one stored volume, with a mask over it.

    Parameters
    ----------
    lake:
        The lake (its ``research/`` zone is read).
    tensor_key:
        The volume's ``tensors.tensor_key``.
    mask_path:
        A ``findings.mask_path`` in the volume's geometry, or None for the volume alone.
    window:
        (level, width) of the grey scale, e.g. (40, 400) for CT soft tissue.
    height:
        The widget's height in pixels.

    Raises
    ------
    KeyError
        No volume with that key.
    ValueError
        The volume is not 3-D, or the mask has another shape.
    ImportError
        ipyniivue is not installed.
    """
    ipyniivue = optional_import(
        "ipyniivue", feature="the notebook volume viewer", extra="'pacsflow[notebooks]'"
    )
    rows = read_table(
        lake, "tensors", columns=["tensor_key", "path", "affine"],
        filter=pc.field("tensor_key") == tensor_key,
    ).to_pylist()  # fmt: skip
    if not rows:
        raise KeyError(f"no stored volume with tensor_key {tensor_key!r}")
    volume = load_tensor(lake, rows[0]["path"])
    affine = rows[0]["affine"]
    level, width = window
    layers = [
        ipyniivue.Volume(
            data=nifti_bytes(volume, affine),
            name="volume.nii.gz",
            colormap="gray",
            cal_min=level - width / 2,
            cal_max=level + width / 2,
        )
    ]
    if mask_path is not None:
        mask = load_tensor(lake, mask_path)
        if mask.shape != volume.shape:
            raise ValueError(f"the mask's shape {mask.shape} is not the volume's {volume.shape}")
        layers.append(
            ipyniivue.Volume(
                data=nifti_bytes(mask.astype(np.uint8), affine),
                name="mask.nii.gz",
                colormap="warm",
                opacity=0.5,
                cal_min=0.5,
                cal_max=max(float(mask.max()), 1.0),
            )
        )
    viewer = ipyniivue.NiiVue(height=height)
    viewer.load_volumes(layers)
    return viewer
