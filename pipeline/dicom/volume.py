"""The one ``Volume`` type: a 3D array with exact patient geometry, from tensors to write-back.

The tensors stage builds volumes from a series (:func:`pipeline.tensors.volume.build_volumes`),
the infer stage segments their tensors, and write-back maps the masks back onto the original
frames; all three speak of the same :class:`Volume`. Pure numpy (no torch, no pydicom).

Conventions
-----------
- ``Volume.array`` has shape ``(slices, rows, columns)`` -- array index ``[k, j, i]`` -- or
  ``(slices, rows, columns, samples)`` for colour images (SamplesPerPixel > 1).
- ``Volume.affine`` (4x4 float64) maps the voxel index ``(i, j, k, 1)`` with ``i`` = column,
  ``j`` = row, ``k`` = slice (note: the *reverse* of the array axis order) to patient
  coordinates in DICOM **LPS** millimetres (+x = patient Left, +y = Posterior, +z = Superior),
  voxel centres at integer indices. For RAS (NIfTI / nibabel / ITK-RAS) use
  :func:`lps_to_ras` or :attr:`Volume.affine_ras`.
- ``Volume.spacing`` is ``(slice, row, column)`` spacing in mm, in array axis order.
- ``Volume.grid`` says whether the array still lies on the grid of its source frames
  (:attr:`VolumeGrid.NATIVE`: slice ``k`` is frame ``frame_numbers[k]`` of
  ``sop_instance_uids[k]``, rows and columns as stored) or was reoriented or resampled by the
  tensors preprocessing; only a native volume maps frame by frame back onto the originals.
  A gantry-tilted stack on its native grid has a non-orthogonal affine: ``affine[:3, 2]`` is
  the real step from slice to slice (along the normal plus the in-plane shift of the tilt);
  the de-tilted one (preprocessing ``detilt``) is resampled.
- A stack whose slice spacing varies (built only when asked, for the tensors preprocessing
  ``equalize``) carries :attr:`Volume.slice_positions`, each slice's distance from slice 0
  along the normal; its affine's slice column is then the mean step (exact for the first and
  last slices only) until it is equalized onto a uniform grid (resampled).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["Volume", "VolumeGrid", "lps_to_ras"]

_LPS_TO_RAS: Final = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """An LPS affine (DICOM patient coordinates) as a RAS affine (NIfTI / nibabel)."""
    return np.asarray(_LPS_TO_RAS @ affine, dtype=np.float64)


class VolumeGrid(StrEnum):
    """Which grid a volume's array lies on."""

    #: the source frames' own grid: slices, rows and columns as the originals store them
    NATIVE = "native"
    #: axes permuted or flipped to RAS/LPS (values unchanged)
    REORIENTED = "reoriented"
    #: interpolated to another spacing (possibly also reoriented)
    RESAMPLED = "resampled"

    @classmethod
    def from_preprocessing(cls, preprocessing: str | Mapping[str, Any] | None) -> VolumeGrid:
        """The grid a tensors preprocessing (its canonical JSON or the parsed mapping, as the
        ``tensors`` table stores it) leaves a volume on.

        Raises
        ------
        ValueError
            If ``preprocessing`` is not a JSON object naming its ``orientation``.
        """
        try:
            data = json.loads(preprocessing) if isinstance(preprocessing, str) else preprocessing
        except json.JSONDecodeError:
            raise ValueError("the preprocessing is not JSON") from None
        if not isinstance(data, Mapping) or "orientation" not in data:
            raise ValueError("the preprocessing does not name its orientation")
        if any(data.get(k) is not None for k in ("spacing", "detilt", "equalize")):
            return cls.RESAMPLED
        return cls.NATIVE if data["orientation"] == "native" else cls.REORIENTED


@dataclass(frozen=True)
class Volume:
    """One 3D volume of a series. See the module docstring for every convention."""

    #: voxel values, shape (slices, rows, columns) or (slices, rows, columns, samples)
    array: npt.NDArray[Any]
    #: 4x4 float64: voxel index (i=column, j=row, k=slice, 1) -> LPS mm
    affine: npt.NDArray[np.float64]
    #: (slice, row, column) spacing in mm, array axis order
    spacing: tuple[float, float, float]
    #: the 6 direction cosines of ImageOrientationPatient (row direction, then column direction)
    orientation: tuple[float, float, float, float, float, float]
    #: SOP Instance UID of each slice, in slice (k) order
    sop_instance_uids: tuple[str, ...]
    #: 1-based frame number of each slice within its SOP instance (1 for single-frame objects;
    #: the tile number for a Siemens MOSAIC)
    frame_numbers: tuple[int, ...]
    #: True when a Modality LUT (Rescale Slope/Intercept) was applied to the stored values
    rescaled: bool
    #: the grid the array lies on (native: as built from the frames)
    grid: VolumeGrid = VolumeGrid.NATIVE
    #: Pixel Padding Value (0028,0120) in the array's units (rescaled when ``rescaled``), or
    #: None: the fill of voxels that resampling brings in from outside the frames
    padding: float | None = None
    #: diffusion b-value (s/mm^2) shared by every slice, or None (not diffusion-weighted)
    bvalue: float | None = None
    #: unit diffusion gradient direction in the patient frame (LPS), or None; (0, 0, 0) for
    #: an unweighted (b = 0) volume whose scanner gives a zero vector
    bvec: tuple[float, float, float] | None = None
    #: which acquisition of the series the volume belongs to, when one Series Instance UID
    #: holds several (e.g. a classic and an enhanced copy): "<SOP class>/<image type value 1>"
    acquisition: str | None = None
    #: distance (mm) of each slice from slice 0 along the slice normal, for a stack whose
    #: spacing varies (``affine[:3, 2]`` is then the mean step); None when the steps are even
    slice_positions: tuple[float, ...] | None = None

    @property
    def affine_ras(self) -> npt.NDArray[np.float64]:
        """The affine in RAS mm (nibabel / NIfTI convention)."""
        return lps_to_ras(self.affine)

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        """Unit slice normal (row cosines x column cosines), LPS."""
        o = np.asarray(self.orientation, dtype=np.float64)
        return np.asarray(np.cross(o[:3], o[3:]), dtype=np.float64)

    @property
    def bvec_dcm2niix(self) -> tuple[float, float, float] | None:
        """:attr:`bvec` in dcm2niix's ``.bvec`` convention (FSL's): components along the voxel
        axes of the NIfTI image dcm2niix writes from the source frames, i.e. along the row
        direction, *minus* the column direction (dcm2niix flips the rows) and the slice
        normal; slices ascend along the normal, so that image is stored radiologically
        (negative determinant) and FSL's x flip does not apply."""
        if self.bvec is None:
            return None
        o = np.asarray(self.orientation, dtype=np.float64)
        v = np.asarray(self.bvec, dtype=np.float64)
        row, col = o[:3], o[3:]
        x, y, z = float(v @ row), -float(v @ col), float(v @ np.cross(row, col))
        return (x + 0.0, y + 0.0, z + 0.0)

    @property
    def on_source_grid(self) -> bool:
        """Whether slice ``k`` is frame ``frame_numbers[k]`` of ``sop_instance_uids[k]``."""
        return self.grid is VolumeGrid.NATIVE

    @classmethod
    def from_tensor_row(cls, row: Mapping[str, Any], array: npt.NDArray[Any]) -> Volume:
        """The volume a ``tensors`` table row describes, with ``array`` as its voxels (the
        stored tensor, or a mask in the same geometry).

        Parameters
        ----------
        row:
            ``affine`` (16 numbers, row-major), ``spacing``, ``sop_instance_uids``,
            ``frame_numbers``, ``rescaled`` and ``preprocessing`` (canonical JSON) of the row;
            the slice UIDs and frame numbers are those of the raw grid (as many as the
            array's slices when the grid is native).
        array:
            Voxels shaped like the row's ``shape``.

        Raises
        ------
        ValueError
            If the row's geometry is incomplete or does not match ``array``.
        """
        try:
            affine = np.asarray(row["affine"], dtype=np.float64).reshape(4, 4)
            spacing = tuple(float(s) for s in row["spacing"])
            sops = tuple(str(s) for s in row.get("sop_instance_uids") or ())
            frames = tuple(int(f) for f in row.get("frame_numbers") or ())
        except (KeyError, TypeError, ValueError):
            raise ValueError("the tensors row has no usable affine and spacing") from None
        if len(spacing) != 3:
            raise ValueError(f"spacing needs 3 values, the row has {len(spacing)}")
        grid = VolumeGrid.from_preprocessing(row.get("preprocessing"))
        native = grid is VolumeGrid.NATIVE  # reoriented/resampled: slices are not the frames
        if sops and (len(frames) != len(sops) or (native and len(sops) != array.shape[0])):
            raise ValueError(
                f"{len(sops)} slice UID(s) and {len(frames)} frame number(s) for "
                f"{array.shape[0]} slices"
            )
        cosines = [affine[:3, c] / (np.linalg.norm(affine[:3, c]) or 1.0) for c in (0, 1)]
        o = [float(v) for v in np.concatenate(cosines)]
        return cls(
            array=array,
            affine=affine,
            spacing=(spacing[0], spacing[1], spacing[2]),
            orientation=(
                float(o[0]),
                float(o[1]),
                float(o[2]),
                float(o[3]),
                float(o[4]),
                float(o[5]),
            ),
            sop_instance_uids=sops,
            frame_numbers=frames,
            rescaled=bool(row.get("rescaled")),
            grid=grid,
        )
