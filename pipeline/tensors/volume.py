"""Turn the datasets of one DICOM series into volume(s) with exact patient geometry.

Pure numpy + pydicom (no torch/monai), so it is cheap to import anywhere.

Conventions
-----------
:class:`~pipeline.dicom.volume.Volume` lives in :mod:`pipeline.dicom.volume`, one layer down,
so that infer and write-back share it; it is re-exported here.

- ``Volume.array`` has shape ``(slices, rows, columns)`` -- array index ``[k, j, i]`` -- or
  ``(slices, rows, columns, samples)`` for colour images (SamplesPerPixel > 1).
- ``Volume.affine`` (4x4 float64) maps the voxel index ``(i, j, k, 1)`` with ``i`` = column,
  ``j`` = row, ``k`` = slice (note: the *reverse* of the array axis order) to patient
  coordinates in DICOM **LPS** millimetres (+x = patient Left, +y = Posterior, +z = Superior),
  voxel centres at integer indices::

      affine[:3, 0] = row direction cosines (IOP[0:3]) * column spacing  (PixelSpacing[1])
      affine[:3, 1] = column direction cosines (IOP[3:6]) * row spacing  (PixelSpacing[0])
      affine[:3, 2] = (position of last slice - position of first slice) / (slices - 1)
      affine[:3, 3] = ImagePositionPatient of slice k = 0

  Slices are ordered by increasing position along the slice normal ``n = row x column``
  cosines, so ``affine[:3, 2]`` is ``+n * spacing`` (plus the in-plane shift per slice of a
  gantry-tilted stack, see the rules below). For RAS (NIfTI / nibabel / ITK-RAS)
  use :func:`lps_to_ras` (``diag(-1, -1, 1, 1) @ affine``) or :attr:`Volume.affine_ras`.
  A nibabel image of the same data is ``nib.Nifti1Image(vol.array.transpose(2, 1, 0),
  vol.affine_ras)``.
- ``Volume.spacing`` is ``(slice, row, column)`` spacing in mm, in array axis order.
- Pixel values: when any frame carries a Modality LUT (Rescale Slope / Intercept, or the
  enhanced Pixel Value Transformation Sequence), it is applied and ``rescaled`` is True. The
  result is ``int16`` (or ``int32`` when the range needs it) when every slope and intercept
  is an integer, otherwise ``float32``. Without a rescale the decoded dtype is kept.

Rules (each refusal is a :class:`~pipeline.errors.GeometryError`, PHI-free message)
-----------------------------------------------------------------------------------
- slices are ordered by position along the normal, never by InstanceNumber;
- one orientation (every IOP component within :data:`ORIENTATION_TOL`) and one frame size;
- fewer than two slices is not a volume;
- duplicate positions (closer than :data:`POSITION_TOL` mm along the normal) are refused
  unless they split into several volumes at the same positions by one of
  :data:`_SPLIT_KEYS` (:func:`build_volumes` returns them; :func:`build_volume` refuses);
- gantry tilt: a slice stack not along the normal by more than :data:`TILT_TOL_DEG`
  degrees is refused ("gantry tilt of N degrees") unless ``allow_tilt``; then the volume keeps
  the frames as stored with an exact non-orthogonal affine (``affine[:3, 2]`` the real slice
  step; :func:`pipeline.tensors.preprocess.detilt` resamples it onto an orthogonal grid), and a
  stack whose in-plane shift is not proportional to its distance along the normal (a tilt
  that varies) is refused;
- spacing: every step along the normal must lie within :data:`SPACING_REL_TOL` (relative) or
  :data:`SPACING_ABS_TOL` mm of the mean step (jitter: the mean is used); otherwise the
  series is refused as having a gap (every step near a multiple of the smallest one, and at
  least half of them equal to it) or as variable spacing -- unless ``allow_variable``, where
  the one volume of a 3D series keeps each slice's distance along the normal
  (``Volume.slice_positions``, for :func:`pipeline.tensors.preprocess.equalize`) and only
  missing slices are refused (the gap pattern above, or Instance Numbers that span more
  images than the stack holds: dcm2niix's "Missing images?" test);
- enhanced multi-frame objects (NumberOfFrames > 1) take geometry from their Per-frame /
  Shared Functional Groups;
- Siemens MOSAIC images are cut into their slices with the layout of their CSA image header
  (read with nibabel's ``csareader``; see :func:`_mosaic_frames`); without a readable CSA
  header they are refused.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydicom import Dataset

from pipeline.dicom.sopclass import is_volume_candidate_class
from pipeline.dicom.volume import Volume, lps_to_ras
from pipeline.errors import GeometryError
from pipeline.tensors._diffusion import diffusion_of

__all__ = [
    "ORIENTATION_TOL",
    "POSITION_TOL",
    "SPACING_ABS_TOL",
    "SPACING_REL_TOL",
    "TILT_TOL_DEG",
    "Volume",
    "build_volume",
    "build_volumes",
    "is_volume_candidate",
    "lps_to_ras",
]

#: largest difference between two frames' direction cosines that still counts as one orientation
ORIENTATION_TOL: Final = 1e-4
#: two slices closer than this along the normal (mm) are at the same position
POSITION_TOL: Final = 1e-3
#: spacing jitter accepted, relative to the mean step ...
SPACING_REL_TOL: Final = 0.01
#: ... or absolute, in mm (whichever is larger)
SPACING_ABS_TOL: Final = 0.01
#: largest angle (degrees) between the slice stack direction and the normal that is not a tilt
TILT_TOL_DEG: Final = 0.05


@dataclass(frozen=True)
class _Frame:
    """One 2D frame with its geometry and a way to get its pixels."""

    position: npt.NDArray[np.float64]
    orientation: npt.NDArray[np.float64]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    shape: tuple[int, int, int]  # rows, columns, samples
    slope: float | None
    intercept: float | None
    sop_uid: str
    frame_number: int
    keys: dict[str, Hashable] = field(compare=False)
    pixels: Callable[[], npt.NDArray[Any]] = field(compare=False, repr=False)


# 4D discriminators, tried in order (the first that splits duplicates cleanly wins)
_SPLIT_KEYS: Final = (
    "TemporalPosition",
    "AcquisitionNumber",
    "TriggerTime",
    "Echo",
    "Diffusion",
    "FrameType",
    "Instance",
)


def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _vec(value: Any, n: int, what: str) -> npt.NDArray[np.float64]:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise GeometryError(f"{what} is not numeric") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise GeometryError(f"{what} must have {n} finite values")
    return arr


def _item(ds: Dataset, seq: str) -> Dataset | None:
    value = ds.get(seq)
    if value is None or len(value) == 0:
        return None
    item: Dataset = value[0]
    return item


def _group(per: Dataset | None, shared: Dataset | None, seq: str) -> Dataset | None:
    """The first item of a functional group macro, per-frame first, then shared."""
    for src in (per, shared):
        if src is not None:
            item = _item(src, seq)
            if item is not None:
                return item
    return None


class _PixelCache:
    """Decode a dataset's pixel data once, on first use (:func:`~pipeline.tensors.decode.
    decode_frames`: every codec the survey found, stored bits masked, frames first)."""

    def __init__(self, ds: Dataset, decoded: npt.NDArray[Any] | None = None) -> None:
        self._ds = ds
        self._arr: npt.NDArray[Any] | None = decoded

    def get(self) -> npt.NDArray[Any]:
        if self._arr is None:
            from pipeline.tensors.decode import decode_frames

            self._arr = decode_frames(self._ds)
        return self._arr


def _shape(ds: Dataset) -> tuple[int, int, int]:
    try:
        return int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise GeometryError("image has no Rows/Columns") from None


def _time_s(value: Any) -> float | None:
    """Seconds since midnight of a TM value (HHMMSS.frac), or None."""
    text = str(value or "").strip()
    try:
        whole, _, frac = text.partition(".")
        if not whole.isdigit() or len(whole) < 2:
            return None
        h, m, sec = int(whole[0:2]), int(whole[2:4] or 0), int(whole[4:6] or 0)
        return h * 3600.0 + m * 60.0 + sec + (float(f"0.{frac}") if frac.isdigit() else 0.0)
    except ValueError:
        return None


def _order(ds: Dataset, frame_number: int) -> tuple[float, float, int]:
    """Acquisition order of a frame as dcm2niix takes it: InstanceNumber, then
    AcquisitionTime, then the frame's number within its object (missing values last)."""
    number = _num(ds.get("InstanceNumber"))
    time = _time_s(ds.get("AcquisitionTime"))
    return (
        math.inf if number is None else number,
        math.inf if time is None else time,
        frame_number,
    )


def _classic_frames(
    ds: Dataset,
    decoded: npt.NDArray[Any] | None = None,
    *,
    position: npt.NDArray[np.float64] | None = None,
) -> list[_Frame]:
    if (
        "ImagePositionPatient" not in ds and position is None
    ) or "ImageOrientationPatient" not in ds:
        raise GeometryError("image has no ImagePositionPatient/ImageOrientationPatient")
    if "PixelSpacing" not in ds:
        raise GeometryError("image has no PixelSpacing")
    spacing = _vec(ds.PixelSpacing, 2, "PixelSpacing")
    cache = _PixelCache(ds, decoded)

    def pixels() -> npt.NDArray[Any]:
        arr = cache.get()
        return arr[0]

    orientation = _vec(ds.ImageOrientationPatient, 6, "ImageOrientationPatient")
    return [
        _Frame(
            position=_vec(ds.ImagePositionPatient, 3, "ImagePositionPatient")
            if position is None
            else position,
            orientation=orientation,
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            shape=_shape(ds),
            slope=_num(ds.get("RescaleSlope")),
            intercept=_num(ds.get("RescaleIntercept")),
            sop_uid=str(ds.get("SOPInstanceUID", "")),
            frame_number=1,
            keys={
                "TemporalPosition": _num(ds.get("TemporalPositionIdentifier")),
                "AcquisitionNumber": _num(ds.get("AcquisitionNumber")),
                "TriggerTime": _num(ds.get("TriggerTime")),
                "Echo": _num(ds.get("EchoNumbers")),
                "Diffusion": diffusion_of(ds, orientation),
                "FrameType": tuple(ds.get("ImageType", ())),
                "Instance": str(ds.get("SOPInstanceUID", "")),
                "Order": _order(ds, 1),
                "TemporalPositions": _num(ds.get("NumberOfTemporalPositions")),
            },
            pixels=pixels,
        )
    ]


def is_mosaic(ds: Dataset) -> bool:
    """Whether ``ds`` is a Siemens MOSAIC image (ImageType holds ``MOSAIC``)."""
    image_type = ds.get("ImageType", ())
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "MOSAIC" for v in values)


def _mosaic_layout(ds: Dataset) -> tuple[int, npt.NDArray[np.float64] | None]:
    """(number of slices, CSA slice normal or None) from the Siemens CSA image header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom warns that its readers are experimental
        from nibabel.nicom import csareader

        try:
            csa = csareader.get_csa_header(ds, "image")
            n_slices = csareader.get_n_mosaic(csa) if csa else None
            normal = csareader.get_slice_normal(csa) if csa else None
        except Exception:
            n_slices, normal = None, None
    if not n_slices:
        raise GeometryError(
            "Siemens MOSAIC without a readable CSA header: the number of slices is unknown"
        )
    return int(n_slices), None if normal is None else np.asarray(normal, dtype=np.float64)


def _mosaic_frames(ds: Dataset, decoded: npt.NDArray[Any] | None = None) -> list[_Frame]:
    """The slices of a Siemens MOSAIC image: tiles of ``ceil(sqrt(n))`` per side, row by row.

    The header's ImagePositionPatient is the corner of the whole mosaic; slice 0's position is
    that corner moved by half the difference between mosaic and tile size along rows and
    columns (the rule nibabel's ``MosaicWrapper`` and dcm2niix use). Slices follow the CSA
    SliceNormalVector (or row x column cosines when absent) at SpacingBetweenSlices, else
    SliceThickness. ``frame_number`` is the 1-based tile number within the mosaic.
    """
    (base,) = _classic_frames(ds, decoded)
    n_slices, csa_normal = _mosaic_layout(ds)
    rows, cols, samples = base.shape
    side = math.ceil(math.sqrt(n_slices))
    if samples != 1 or rows % side or cols % side:
        raise GeometryError(f"MOSAIC of {rows}x{cols} does not tile into {side}x{side} slices")
    tile_r, tile_c = rows // side, cols // side
    row_sp, col_sp = base.pixel_spacing
    row_cos, col_cos = base.orientation[:3], base.orientation[3:]
    origin = (
        base.position
        + col_cos * row_sp * (rows - tile_r) / 2
        + row_cos * col_sp * (cols - tile_c) / 2
    )
    normal = csa_normal if csa_normal is not None else np.cross(row_cos, col_cos)
    normal = normal / np.linalg.norm(normal)
    gap = _num(ds.get("SpacingBetweenSlices")) or _num(ds.get("SliceThickness"))
    if not gap:
        raise GeometryError("MOSAIC without SpacingBetweenSlices or SliceThickness")

    def tile(k: int) -> Callable[[], npt.NDArray[Any]]:
        r, c = divmod(k, side)

        def pixels() -> npt.NDArray[Any]:
            return base.pixels()[r * tile_r : (r + 1) * tile_r, c * tile_c : (c + 1) * tile_c]

        return pixels

    return [
        replace(
            base,
            position=origin + k * gap * normal,
            shape=(tile_r, tile_c, 1),
            frame_number=k + 1,
            pixels=tile(k),
        )
        for k in range(n_slices)
    ]


def is_uih_grid(ds: Dataset) -> bool:
    """Whether ``ds`` is a UIH "GRID" image (ImageType ``VFRAME``): one volume's slices tiled
    in one frame, their positions in the private MR VFrame Sequence (0065,xx51)."""
    image_type = ds.get("ImageType", ())
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "VFRAME" for v in values)


def _uih_grid_frames(ds: Dataset, decoded: npt.NDArray[Any] | None = None) -> list[_Frame]:
    """The slices of a UIH GRID image, as dcm2niix cuts them.

    The grid has ``ceil(sqrt(n))`` tiles per row and ``ceil(n / that)`` rows for the ``n``
    slices of MR Number Of Slice In Volume (0065,xx50); tile ``k`` (row by row) is slice
    ``k``, whose top-left voxel is at the ImagePositionPatient of item ``k`` of the MR VFrame
    Sequence (0065,xx51). ``frame_number`` is the 1-based tile number.
    """
    from pipeline.tensors._diffusion import _private

    n_value = _num(_private(ds, 0x0065, 0x1050, "Image Private Header"))
    items = _private(ds, 0x0065, 0x1051, "Image Private Header")
    if not n_value or not items or not isinstance(items, Sequence) or len(items) != n_value:
        raise GeometryError(
            "UIH GRID image without a readable slice count and VFrame sequence: its slices "
            "cannot be cut"
        )
    n_slices = int(n_value)
    positions = []
    for item in items:
        if not isinstance(item, Dataset) or "ImagePositionPatient" not in item:
            raise GeometryError("UIH GRID image: a VFrame item has no ImagePositionPatient")
        positions.append(_vec(item.ImagePositionPatient, 3, "ImagePositionPatient"))
    (base,) = _classic_frames(ds, decoded, position=positions[0])
    rows, cols, samples = base.shape
    tiles_c = math.ceil(math.sqrt(n_slices))
    tiles_r = math.ceil(n_slices / tiles_c)
    if samples != 1 or rows % tiles_r or cols % tiles_c:
        raise GeometryError(
            f"UIH GRID of {rows}x{cols} does not tile into {tiles_r}x{tiles_c} slices"
        )
    tile_r, tile_c = rows // tiles_r, cols // tiles_c

    def tile(k: int) -> Callable[[], npt.NDArray[Any]]:
        r, c = divmod(k, tiles_c)

        def pixels() -> npt.NDArray[Any]:
            return base.pixels()[r * tile_r : (r + 1) * tile_r, c * tile_c : (c + 1) * tile_c]

        return pixels

    return [
        replace(
            base,
            position=positions[k],
            shape=(tile_r, tile_c, 1),
            frame_number=k + 1,
            pixels=tile(k),
        )
        for k in range(n_slices)
    ]


def _enhanced_frames(
    ds: Dataset, n_frames: int, decoded: npt.NDArray[Any] | None = None
) -> list[_Frame]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared: Dataset | None = shared_seq[0] if shared_seq else None
    if per_frame is not None and len(per_frame) != n_frames:
        raise GeometryError(
            f"multi-frame object has {n_frames} frames but {len(per_frame)} per-frame groups"
        )
    cache = _PixelCache(ds, decoded)
    shape = _shape(ds)
    frames = []
    for f in range(n_frames):
        per: Dataset | None = per_frame[f] if per_frame is not None else None
        pos_item = _group(per, shared, "PlanePositionSequence")
        ori_item = _group(per, shared, "PlaneOrientationSequence")
        meas = _group(per, shared, "PixelMeasuresSequence")
        pos = pos_item.get("ImagePositionPatient") if pos_item is not None else None
        ori = ori_item.get("ImageOrientationPatient") if ori_item is not None else None
        pix = meas.get("PixelSpacing") if meas is not None else None
        if pos is None or ori is None:
            raise GeometryError(
                f"frame {f + 1} of a multi-frame object has no plane position/orientation"
            )
        if pix is None:
            raise GeometryError(f"frame {f + 1} of a multi-frame object has no pixel spacing")
        spacing = _vec(pix, 2, "PixelSpacing")
        pvt = _group(per, shared, "PixelValueTransformationSequence")
        slope = _num(pvt.get("RescaleSlope")) if pvt is not None else None
        intercept = _num(pvt.get("RescaleIntercept")) if pvt is not None else None
        if pvt is None:
            slope, intercept = _num(ds.get("RescaleSlope")), _num(ds.get("RescaleIntercept"))
        content = _group(per, None, "FrameContentSequence")
        echo = _group(per, shared, "MREchoSequence")
        diff = _group(per, shared, "MRDiffusionSequence")
        ftype = None
        for seq in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence", "FrameTypeSequence"):
            ftype = _group(per, shared, seq)
            if ftype is not None:
                break
        cardiac = _group(per, shared, "CardiacSynchronizationSequence")

        def pixels(index: int = f) -> npt.NDArray[Any]:
            return cache.get()[index]

        frames.append(
            _Frame(
                position=_vec(pos, 3, "ImagePositionPatient"),
                orientation=_vec(ori, 6, "ImageOrientationPatient"),
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                shape=shape,
                slope=slope,
                intercept=intercept,
                sop_uid=str(ds.get("SOPInstanceUID", "")),
                frame_number=f + 1,
                keys={
                    "TemporalPosition": _num(content.get("TemporalPositionIndex"))
                    if content is not None
                    else None,
                    "AcquisitionNumber": _num(ds.get("AcquisitionNumber")),
                    "TriggerTime": _num(cardiac.get("NominalCardiacTriggerDelayTime"))
                    if cardiac is not None
                    else None,
                    "Echo": _num(echo.get("EffectiveEchoTime")) if echo is not None else None,
                    "Diffusion": diffusion_of(ds, _vec(ori, 6, "ImageOrientationPatient"), diff)
                    if diff is not None
                    else None,
                    "FrameType": (
                        *tuple(ftype.get("FrameType", ())),
                        str(ftype.get("ComplexImageComponent", "")),
                    )
                    if ftype is not None
                    else None,
                    "Instance": str(ds.get("SOPInstanceUID", "")),
                    "Order": _order(ds, f + 1),
                },
                pixels=pixels,
            )
        )
    return frames


def _frames(
    datasets: Sequence[Dataset], pixels: Sequence[npt.NDArray[Any]] | None = None
) -> list[_Frame]:
    frames: list[_Frame] = []
    for index, ds in enumerate(datasets):
        decoded = pixels[index] if pixels is not None else None
        try:
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            raise GeometryError("NumberOfFrames is not a number") from None
        enhanced = (
            "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
        )
        if n_frames > 1 or (enhanced and "ImagePositionPatient" not in ds):
            if not enhanced:
                raise GeometryError(
                    "multi-frame object without functional groups has no per-frame geometry"
                )
            frames.extend(_enhanced_frames(ds, n_frames, decoded))
        elif is_mosaic(ds):
            frames.extend(_mosaic_frames(ds, decoded))
        elif is_uih_grid(ds) and "ImagePositionPatient" not in ds:
            frames.extend(_uih_grid_frames(ds, decoded))
        else:
            frames.extend(_classic_frames(ds, decoded))
    return frames


def _check_common(frames: Sequence[_Frame]) -> npt.NDArray[np.float64]:
    """Check one orientation, frame size and pixel spacing; return the unit normal."""
    first = frames[0]
    for fr in frames[1:]:
        if np.max(np.abs(fr.orientation - first.orientation)) > ORIENTATION_TOL:
            raise GeometryError("mixed orientations: the series has more than one slice plane")
        if fr.shape != first.shape:
            raise GeometryError("mixed frame sizes: the series has more than one image matrix")
        if not np.allclose(fr.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-4):
            raise GeometryError("mixed pixel spacing: the series has more than one in-plane grid")
    row, col = first.orientation[:3], first.orientation[3:]
    if not (
        math.isclose(float(np.linalg.norm(row)), 1.0, abs_tol=1e-3)
        and math.isclose(float(np.linalg.norm(col)), 1.0, abs_tol=1e-3)
        and abs(float(row @ col)) < 1e-3
    ):
        raise GeometryError("ImageOrientationPatient is not two orthogonal unit vectors")
    normal = np.cross(row, col)
    return np.asarray(normal / np.linalg.norm(normal), dtype=np.float64)


def _split(frames: list[_Frame], normal: npt.NDArray[np.float64]) -> list[list[_Frame]]:
    """Split frames with duplicate positions into volumes at the same positions, or refuse."""
    dist = np.array([fr.position @ normal for fr in frames])
    order = np.argsort(dist, kind="stable")
    if len(frames) < 2 or np.all(np.diff(dist[order]) > POSITION_TOL):
        return [frames]
    positions = _distinct(dist)
    if len(positions) < 2:
        raise GeometryError(
            f"duplicate slice positions: all {len(frames)} frames lie at one position, not a volume"
        )
    for key in _SPLIT_KEYS:
        groups: dict[Hashable, list[_Frame]] = {}
        for fr in frames:
            groups.setdefault(fr.keys.get(key), []).append(fr)
        if len(groups) < 2:
            continue
        ok = True
        for members in groups.values():
            d = np.sort([fr.position @ normal for fr in members])
            if len(d) != len(positions) or not np.allclose(d, positions, atol=POSITION_TOL * 10):
                ok = False
                break
        if ok:
            if key in _ACQUISITION_ORDERED:  # no value order: dcm2niix's acquisition order
                return sorted(groups.values(), key=lambda g: min(_frame_order(fr) for fr in g))
            return [groups[k] for k in sorted(groups, key=_sort_key)]
    ordered = _ordered_split(frames, normal, positions)
    if ordered is not None:
        return ordered
    raise GeometryError(
        f"duplicate slice positions: {len(frames)} frames at {len(positions)} positions, "
        "and no temporal/echo/b-value/gradient attribute splits them into complete volumes"
    )


#: split keys whose groups follow acquisition order rather than the order of their values
_ACQUISITION_ORDERED: Final = frozenset({"Diffusion", "Instance"})


def _frame_order(fr: _Frame) -> tuple[float, float, int]:
    order = fr.keys.get("Order")
    if isinstance(order, tuple):
        return order
    return (math.inf, math.inf, fr.frame_number)


def _ordered_split(
    frames: list[_Frame], normal: npt.NDArray[np.float64], positions: npt.NDArray[np.float64]
) -> list[list[_Frame]] | None:
    """Volumes of a series that repeats its positions in time or over diffusion directions
    without an attribute telling them apart, as dcm2niix makes them: the ``t``-th frame at
    each position, in acquisition order (InstanceNumber, then AcquisitionTime), is slice of
    volume ``t``. Applies only where the images say they repeat: every frame carries a
    diffusion b-value, or Number of Temporal Positions > 1. None where they do not.

    Raises:
        GeometryError: the attributes conflict (positions repeated unequally, a count other
            than Number of Temporal Positions, InstanceNumber against AcquisitionTime, or a
            time point mixing b-values/directions).
    """
    diffusion = [fr.keys.get("Diffusion") for fr in frames]
    temporal = {fr.keys.get("TemporalPositions") for fr in frames}
    is_diffusion = all(d is not None for d in diffusion)
    (count,) = temporal if len(temporal) == 1 else (None,)
    if not is_diffusion and not (isinstance(count, float) and count > 1):
        return None
    at: list[list[_Frame]] = [[] for _ in positions]
    for fr in frames:
        index = int(np.argmin(np.abs(positions - float(fr.position @ normal))))
        at[index].append(fr)
    sizes = sorted({len(group) for group in at})
    if len(sizes) != 1:
        raise GeometryError(
            f"repeated slice positions: {len(frames)} frames at {len(positions)} positions "
            f"hold {sizes[0]} to {sizes[-1]} frames each, not complete volumes"
        )
    n_times = sizes[0]
    if isinstance(count, float) and count > 1 and int(count) != n_times:
        raise GeometryError(
            f"Number of Temporal Positions says {int(count)} time points, but each of the "
            f"{len(positions)} positions holds {n_times} frames"
        )
    for group in at:
        group.sort(key=_frame_order)
        keys = [_frame_order(fr) for fr in group]
        if len(set(keys)) != len(keys):
            raise GeometryError(
                "repeated slice positions without InstanceNumber or AcquisitionTime to order "
                "their time points"
            )
        times = [k[1] for k in keys if math.isfinite(k[1])]
        if len(times) == len(keys) and any(b < a for a, b in itertools.pairwise(times)):
            raise GeometryError(
                "InstanceNumber and AcquisitionTime disagree on the order of the time points"
            )
    volumes = [[group[t] for group in at] for t in range(n_times)]
    if is_diffusion:
        for vol in volumes:
            if len({fr.keys.get("Diffusion") for fr in vol}) != 1:
                raise GeometryError(
                    "repeated slice positions: frames of one volume (in acquisition order) "
                    "carry different b-values or gradient directions"
                )
    return volumes


def _sort_key(value: Hashable) -> tuple[int, str]:
    if isinstance(value, float | int):
        return (0, f"{float(value):030.10f}")
    return (1, str(value))


def _distinct(dist: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    d = np.sort(dist)
    keep = [d[0]]
    for x in d[1:]:
        if x - keep[-1] > POSITION_TOL:
            keep.append(x)
    return np.asarray(keep, dtype=np.float64)


#: why a stack of varying spacing is refused by default (:func:`build_volumes` without
#: ``allow_variable``)
_VARIABLE_REFUSED: Final = "tensors.variable_spacing is refuse"


def _stack_geometry(
    frames: list[_Frame],
    normal: npt.NDArray[np.float64],
    allow_tilt: bool = False,
    variable_refusal: str = _VARIABLE_REFUSED,
) -> tuple[list[_Frame], float, npt.NDArray[np.float64], tuple[float, ...] | None]:
    """Order by position along the normal; check tilt and spacing.

    Returns (frames, dk, step, positions): ``positions`` (each slice's distance from the first
    along the normal) only for a stack whose spacing varies, accepted when
    ``variable_refusal`` is empty (``dk`` and ``step`` are then the mean step); None otherwise.
    A varying stack is refused as having missing slices when its steps are a regular grid with
    holes, or when its Instance Numbers span more images than it holds (dcm2niix's "Missing
    images?" test; dcm2niix warns and interpolates across them, pacsflow refuses)."""
    if len(frames) < 2:
        raise GeometryError("single slice: one frame is not a volume")
    frames = sorted(frames, key=lambda fr: float(fr.position @ normal))
    pos = np.stack([fr.position for fr in frames])
    along = pos @ normal
    steps = np.diff(along)
    if np.any(steps <= POSITION_TOL):
        raise GeometryError("duplicate slice positions")
    # tilt: the in-plane part of each slice's offset from the first slice
    offsets = pos - pos[0]
    inplane = offsets - np.outer(offsets @ normal, normal)
    angles = np.degrees(np.arctan2(np.linalg.norm(inplane, axis=1)[1:], (along - along[0])[1:]))
    tilt = float(np.max(np.abs(angles)))
    mean = float(np.mean(steps))
    tol = max(SPACING_REL_TOL * mean, SPACING_ABS_TOL)
    if tilt > TILT_TOL_DEG:
        if not allow_tilt:
            raise GeometryError(
                f"gantry tilt of {tilt:.1f} degrees: slices are not stacked along the slice "
                "normal (tensors.gantry_tilt is refuse)"
            )
        # one tilt: the in-plane shift is proportional to the distance along the normal
        dist = along - along[0]
        shear = (inplane.T @ dist) / float(dist @ dist)
        off = float(np.max(np.linalg.norm(inplane - np.outer(dist, shear), axis=1)))
        if off > tol:
            raise GeometryError(
                f"varying gantry tilt: slice positions leave the tilted stack by up to {off:.3g} mm"
            )
    positions: tuple[float, ...] | None = None
    if np.max(np.abs(steps - mean)) > tol:
        smallest, largest = float(np.min(steps)), float(np.max(steps))
        ratios = steps / smallest
        nominal = np.abs(ratios - 1.0) <= tol / smallest
        multiples = np.abs(ratios - np.round(ratios)) <= tol / smallest
        if np.all(multiples) and np.count_nonzero(nominal) * 2 >= len(steps):
            missing = int(np.sum(np.round(ratios) - 1))
            raise GeometryError(
                f"gap in slice positions: about {missing} missing slice(s) "
                f"(steps of {smallest:.3g} to {largest:.3g} mm)"
            )
        if variable_refusal:
            raise GeometryError(
                f"variable slice spacing: steps from {smallest:.3g} to {largest:.3g} mm "
                f"({variable_refusal})"
            )
        numbers = [_frame_order(fr)[0] for fr in frames]
        if all(math.isfinite(v) for v in numbers) and len(set(numbers)) == len(numbers):
            span = round(max(numbers) - min(numbers)) + 1
            if span != len(frames):  # dcm2niix's "Missing images?" test
                raise GeometryError(
                    f"missing slices: the Instance Numbers span {span} images, {len(frames)} "
                    f"are present (steps of {smallest:.3g} to {largest:.3g} mm)"
                )
        positions = tuple(float(d) for d in along - along[0])
    step = (pos[-1] - pos[0]) / (len(frames) - 1)
    return frames, mean, np.asarray(step, dtype=np.float64), positions


def _pixels(frames: Sequence[_Frame]) -> tuple[npt.NDArray[Any], bool]:
    """Stack the frames' pixels, applying the Modality LUT when any frame has one.

    Integral slopes and intercepts: the output type (int16, else int32, else int64) is chosen
    from each frame's extremes first, then every frame is rescaled straight into its plane (no
    volume-sized int64 temporary); otherwise float32, frame by frame likewise.
    """
    planes = []
    for fr in frames:
        arr = np.asarray(fr.pixels())
        rows, cols, samples = fr.shape
        expected = (rows, cols) if samples == 1 else (rows, cols, samples)
        if arr.shape != expected:
            raise GeometryError(f"decoded frame has shape {arr.shape}, expected {expected}")
        planes.append(arr)
    has_lut = any(fr.slope is not None or fr.intercept is not None for fr in frames)
    if not has_lut or frames[0].shape[2] != 1:
        return np.stack(planes), False
    slopes = [1.0 if fr.slope is None else float(fr.slope) for fr in frames]
    inters = [0.0 if fr.intercept is None else float(fr.intercept) for fr in frames]
    out: npt.NDArray[Any]
    if all(v == round(v) for v in slopes + inters):
        lo = hi = 0
        for index, (plane, m, c) in enumerate(zip(planes, slopes, inters, strict=True)):
            if plane.size:
                ends = (int(plane.min()) * int(m) + int(c), int(plane.max()) * int(m) + int(c))
                lo, hi = (
                    (min(ends), max(ends))
                    if index == 0
                    else (
                        min(lo, *ends),
                        max(hi, *ends),
                    )
                )
        dtype: Any = np.int64
        for candidate in (np.int16, np.int32):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                dtype = candidate
                break
        out = np.empty((len(planes), *planes[0].shape), dtype=dtype)
        for index, (plane, m, c) in enumerate(zip(planes, slopes, inters, strict=True)):
            if m == 1:
                # computed in the promoted type (e.g. uint16 + int16 -> int32), then stored:
                # the range was checked above
                np.add(plane, np.asarray(int(c), dtype=dtype), out=out[index], casting="unsafe")
            else:
                out[index] = plane.astype(np.int64) * int(m) + int(c)
        return out, True
    out = np.empty((len(planes), *planes[0].shape), dtype=np.float32)
    for index, (plane, m, c) in enumerate(zip(planes, slopes, inters, strict=True)):
        out[index] = plane.astype(np.float64) * m + c
    return out, True


def _volume(
    frames: list[_Frame],
    normal: npt.NDArray[np.float64],
    allow_tilt: bool = False,
    padding: float | None = None,
    variable_refusal: str = _VARIABLE_REFUSED,
) -> Volume:
    frames, dk, step, positions = _stack_geometry(frames, normal, allow_tilt, variable_refusal)
    first = frames[0]
    row_sp, col_sp = first.pixel_spacing
    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = first.orientation[:3] * col_sp
    affine[:3, 1] = first.orientation[3:] * row_sp
    affine[:3, 2] = step
    affine[:3, 3] = first.position
    array, rescaled = _pixels(frames)
    if padding is not None and rescaled:  # in the array's units, as the frames' values are
        padding = padding * (1.0 if first.slope is None else first.slope) + (first.intercept or 0.0)
    o = first.orientation
    return Volume(
        array=array,
        affine=affine,
        spacing=(dk, row_sp, col_sp),
        orientation=(float(o[0]), float(o[1]), float(o[2]), float(o[3]), float(o[4]), float(o[5])),
        sop_instance_uids=tuple(fr.sop_uid for fr in frames),
        frame_numbers=tuple(fr.frame_number for fr in frames),
        rescaled=rescaled,
        padding=padding,
        slice_positions=positions,
        **_volume_diffusion(frames),
    )


def _volume_diffusion(frames: Sequence[_Frame]) -> dict[str, Any]:
    """``bvalue``/``bvec`` of a volume whose frames all share one, else nothing."""
    values = {fr.keys.get("Diffusion") for fr in frames}
    if len(values) != 1:
        return {}
    (value,) = values
    if not isinstance(value, tuple):
        return {}
    b, vec = value
    return {"bvalue": b, "bvec": vec}


def is_volume_candidate(ds: Dataset) -> bool:
    """Whether ``ds`` can be a slice of a volume: it has pixel data and is not of a
    non-image SOP class (:func:`pipeline.dicom.sopclass.is_volume_candidate_class`)."""
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    return is_volume_candidate_class(str(ds.get("SOPClassUID", "")), has_pixels)


def _acquisition(ds: Dataset) -> str:
    """What makes objects of one Series Instance UID different acquisitions: the SOP class
    (a classic and an enhanced copy) and value 1 of Image Type (ORIGINAL vs DERIVED)."""
    from pydicom.uid import UID

    sop = str(ds.get("SOPClassUID", "") or "").strip()
    name = UID(sop).name if sop else "unknown SOP class"
    image_type = ds.get("ImageType", ())
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    first = str(values[0]).strip().upper() if values else ""
    return f"{name}/{first}" if first else name


def build_volumes(
    datasets: Sequence[Dataset],
    pixels: Sequence[npt.NDArray[Any]] | None = None,
    *,
    allow_tilt: bool = False,
    allow_variable: bool = False,
) -> list[Volume]:
    """All volumes of one series: one for a 3D series, one per time point/echo/b-value for 4D.

    ``pixels``, when given, holds each dataset's frames already decoded
    (:func:`~pipeline.tensors.decode.decode_frames`), in the same order as ``datasets``.
    ``allow_tilt``: a gantry-tilted stack is a volume on its native (sheared) grid, with the
    exact non-orthogonal affine, instead of a refusal. ``allow_variable``: the one volume of a
    3D series whose slice spacing varies (and no slice is missing) is built with its
    :attr:`~Volume.slice_positions`, for :func:`pipeline.tensors.preprocess.equalize`, instead
    of a refusal; as dcm2niix, a 4D series is never equalized.

    Raises:
        GeometryError: the series cannot be made into volume(s) without distorting it.
    """
    if not datasets:
        raise GeometryError("empty series: no images")
    parts: dict[str, list[int]] = {}
    for index, ds in enumerate(datasets):
        parts.setdefault(_acquisition(ds), []).append(index)
    if len(parts) == 1:
        return _build(datasets, pixels, allow_tilt, allow_variable)
    volumes: list[Volume] = []
    for label, indices in parts.items():
        try:
            built = _build(
                [datasets[i] for i in indices],
                None if pixels is None else [pixels[i] for i in indices],
                allow_tilt,
                allow_variable,
            )
        except GeometryError as exc:
            raise GeometryError(
                f"{len(parts)} acquisitions share the Series Instance UID (split by SOP class "
                f"and image type); {label}: {exc}"
            ) from None
        volumes.extend(replace(v, acquisition=label) for v in built)
    return volumes


def _build(
    datasets: Sequence[Dataset],
    pixels: Sequence[npt.NDArray[Any]] | None,
    allow_tilt: bool = False,
    allow_variable: bool = False,
) -> list[Volume]:
    frames = _frames(datasets, pixels)
    if len(frames) < 2:
        raise GeometryError("single slice: one frame is not a volume")
    normal = _check_common(frames)
    padding = _num(datasets[0].get("PixelPaddingValue"))
    groups = _split(frames, normal)
    refusal = _VARIABLE_REFUSED
    if allow_variable:  # dcm2niix equalizes only a 3D series
        refusal = "" if len(groups) == 1 else "a 4D series is not equalized"
    return [_volume(group, normal, allow_tilt, padding, refusal) for group in groups]


def build_volume(datasets: Sequence[Dataset]) -> Volume:
    """The one 3D volume of a series; a 4D series is refused (use :func:`build_volumes`).

    Raises:
        GeometryError: not exactly one volume can be made from the series.
    """
    volumes = build_volumes(datasets)
    if len(volumes) != 1:
        raise GeometryError(
            f"4D series: {len(volumes)} volumes at the same slice positions (use build_volumes)"
        )
    return volumes[0]
