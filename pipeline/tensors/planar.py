"""2D tensors: radiographs, mammograms, ultrasound and cine loops, one tensor per object.

A series of projection images (CR, DX, MG, IO...), ultrasound, angiography or endoscopy has
no slice geometry: its objects are not slices of one volume but images in their own right.
:func:`is_planar` says whether a series is one (its Modality is in
``tensors.planar_modalities`` and no object carries a patient position, or the whole series
is a single frame); :func:`build_planar` makes one :class:`PlanarImage` per object.

Conventions
-----------
- ``array``: ``(rows, columns)`` or ``(rows, columns, samples)`` for a single frame (kind
  ``planar``), ``(frames, rows, columns[, samples])`` for a multi-frame object (kind
  ``cine``), frames in stored order. Objects are never stacked together, so a series holding
  FOR PRESENTATION and FOR PROCESSING images (or two views) yields a tensor per image.
- Values, in DICOM's order (PS3.4 N.2): stored values (bits above Bits Stored masked, as
  :mod:`pipeline.tensors.decode` gives them); the Modality LUT (Rescale Slope/Intercept:
  integers stay integers when slope and intercept are integral, else float32; a Modality LUT
  Sequence through pydicom's ``apply_modality_lut``); the VOI transformation as
  ``tensors.voi`` says (pydicom's ``apply_voi_lut``, float32 for a window); then MONOCHROME1
  is inverted over the output range of the step before (``lo + hi - value``, the range
  pydicom's windowing uses: Bits Stored through the rescale, the Modality LUT's or the VOI
  LUT's output bits), so that a larger value is always brighter (MONOCHROME2).
- Colour: RGB as stored (planar configuration undone); YBR_FULL and YBR_FULL_422 converted to
  RGB exactly as pydicom's ``convert_color_space`` does, compressed YBR as the decoders
  deliver it (JPEG: RGB); PALETTE COLOR through pydicom's ``apply_color_lut``. No VOI on
  colour.
- Spacing ``(row, column)`` in mm, and which attribute gave it (``pixel_spacing_source``):
  Pixel Spacing when present (calibrated at the patient, or as its Pixel Spacing Calibration
  Type says), else Imager Pixel Spacing (at the detector: not corrected for the geometric
  magnification, whose Estimated Radiographic Magnification Factor is recorded), else for
  ultrasound the one calibrated region (or regions that agree) of the Sequence of Ultrasound
  Regions in cm; none otherwise.
- Recorded coded values (PHI-free by construction: only the standard's defined terms pass):
  Presentation Intent Type, View Position, Image Laterality, Laterality, VOI LUT Function,
  Photometric Interpretation, Pixel Spacing Calibration Type; and Frame Time / Frame Time
  Vector (ms) of cine.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from pipeline.config import TensorsConfig
from pipeline.errors import GeometryError

__all__ = [
    "PLANAR_COLUMNS",
    "PlanarImage",
    "build_planar",
    "is_planar",
    "planar_preprocessing",
]

#: The tensors table columns a planar tensor fills beyond a volume's (also null for volumes).
PLANAR_COLUMNS: Final = (
    "tensor_kind",
    "PhotometricInterpretation",
    "monochrome1_inverted",
    "pixel_spacing_source",
    "PixelSpacingCalibrationType",
    "EstimatedRadiographicMagnificationFactor",
    "voi",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PresentationIntentType",
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "FrameTime",
    "FrameTimeVector",
)

#: Defined terms kept in the table; anything else is recorded as null (a free-text value in a
#: coded attribute could hold anything, a name included).
_TERMS: Final[dict[str, frozenset[str]]] = {
    "PresentationIntentType": frozenset({"FOR PRESENTATION", "FOR PROCESSING"}),
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),
    "Laterality": frozenset({"R", "L"}),
    # DX (PS3.3 C.8.11.7) and MG (C.8.11.7.1) view terms: any other value is recorded null
    "ViewPosition": frozenset(
        {
            "AP",
            "PA",
            "LL",
            "RL",
            "RLD",
            "LLD",
            "RLO",
            "LLO",
            "LAT",
            "LATERAL",
            "OBL",
            "CC",
            "FB",
            "LM",
            "LMO",
            "ML",
            "MLO",
            "SIO",
            "XCC",
            "XCCL",
            "XCCM",
            "ISO",
            "AXIAL",
        }
    ),
    "VOILUTFunction": frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"}),
    "PixelSpacingCalibrationType": frozenset({"GEOMETRY", "FIDUCIAL"}),
    "PhotometricInterpretation": frozenset(
        {
            "MONOCHROME1",
            "MONOCHROME2",
            "RGB",
            "YBR_FULL",
            "YBR_FULL_422",
            "PALETTE COLOR",
            "YBR_ICT",
            "YBR_RCT",
            "YBR_PARTIAL_420",
            "YBR_PARTIAL_422",
            "XYB",
        }
    ),
}
_IS_CS: Final = re.compile(r"^[A-Z0-9 _]{0,16}$")
#: an ultrasound region's physical units code for centimetres (PS3.3 C.8.5.5.1.15)
_US_CM: Final = 3

Kind = Literal["planar", "cine"]


@dataclass(frozen=True)
class PlanarImage:
    """One object of a planar series as a tensor, with what its table row records."""

    #: pixel values (see the module docstring for the shape and the value pipeline)
    array: npt.NDArray[Any]
    #: ``planar`` (one frame) or ``cine`` (several)
    kind: Kind
    #: (row, column) spacing in mm, or None when the object does not say
    spacing: tuple[float, float] | None
    #: the SOP Instance UID of the object (the stage maps it to its pseudonym)
    sop_uid: str
    #: the number of frames
    n_frames: int
    #: True when a Modality LUT (rescale or LUT sequence) was applied
    rescaled: bool
    #: the :data:`PLANAR_COLUMNS` values but ``tensor_kind``
    columns: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The tensors columns of this image (geometry, kind and recorded attributes)."""
        return {
            "tensor_kind": self.kind,
            "shape": list(self.array.shape),
            "spacing": None if self.spacing is None else [float(s) for s in self.spacing],
            "affine": None,  # no patient frame: a projection or a cine has no slice geometry
            "rescaled": self.rescaled,
            "frame_numbers": list(range(1, self.n_frames + 1)),
            **self.columns,
        }


def _modality(ds: Any) -> str:
    return str(ds.get("Modality", "") or "").strip().upper()


def _has_position(ds: Any) -> bool:
    """Whether ``ds`` places its frames in the patient (a slice of something)."""
    if "ImagePositionPatient" in ds:
        return True
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(seq) or ()
        if any("PlanePositionSequence" in item for item in groups):
            return True
    return False


def _n_frames(ds: Any) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        raise GeometryError("NumberOfFrames is not a number") from None


def is_planar(datasets: Sequence[Any], cfg: TensorsConfig) -> bool:
    """Whether a series becomes 2D tensors rather than a volume.

    True when every object's Modality is in ``cfg.planar_modalities`` and either no object
    has a patient position (projection images, ultrasound, cine) or the series is one frame
    in all (a single-slice secondary capture).
    """
    if not datasets:
        return False
    allowed = set(cfg.planar_modalities)
    if not all(_modality(ds) in allowed for ds in datasets):
        return False
    if not any(_has_position(ds) for ds in datasets):
        return True
    try:
        return sum(_n_frames(ds) for ds in datasets) == 1
    except GeometryError:
        return False


def _term(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    if not isinstance(value, str):  # several values: the first
        try:
            value = value[0]
        except (TypeError, IndexError):
            return None
    text = str(value).strip().upper()
    if not _IS_CS.match(text) or text not in _TERMS[keyword]:
        return None
    return text


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str | int | float):
        try:
            value = value[0]  # a multi-valued DS: the first
        except (TypeError, IndexError):
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _pair(ds: Any, keyword: str) -> tuple[float, float] | None:
    value = ds.get(keyword)
    try:
        pair = (float(value[0]), float(value[1])) if value is not None and len(value) == 2 else None
    except (TypeError, ValueError, IndexError):
        return None
    if pair is None or not all(math.isfinite(v) and v > 0 for v in pair):
        return None
    return pair


def _us_spacing(ds: Any) -> tuple[float, float] | None:
    """(row, column) mm from the Sequence of Ultrasound Regions: its calibrated regions must
    agree (one grid for the whole image), in cm."""
    regions = ds.get("SequenceOfUltrasoundRegions") or ()
    found: set[tuple[float, float]] = set()
    for region in regions:
        if region.get("PhysicalUnitsXDirection") != _US_CM:
            continue
        if region.get("PhysicalUnitsYDirection") != _US_CM:
            continue
        dx, dy = _number(region.get("PhysicalDeltaX")), _number(region.get("PhysicalDeltaY"))
        if dx is None or dy is None or dx <= 0 or dy <= 0:
            continue
        found.add((abs(dy) * 10.0, abs(dx) * 10.0))
    return found.pop() if len(found) == 1 else None


def _spacing(ds: Any) -> tuple[tuple[float, float] | None, str | None]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        pair = _pair(ds, keyword)
        if pair is not None:
            return pair, keyword
    if _modality(ds) == "US":
        pair = _us_spacing(ds)
        if pair is not None:
            return pair, "SequenceOfUltrasoundRegions"
    return None, None


def _stored_range(ds: Any) -> tuple[int, int]:
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _modality_lut(
    arr: npt.NDArray[Any], ds: Any
) -> tuple[npt.NDArray[Any], bool, tuple[float, float]]:
    """(values, rescaled, output range) of the Modality LUT; the range is pydicom's."""
    from pydicom.pixels import apply_modality_lut

    lo, hi = _stored_range(ds)
    if ds.get("ModalityLUTSequence"):
        item = ds.ModalityLUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        return np.asarray(apply_modality_lut(arr, ds)), True, (0.0, float(2**bits - 1))
    slope, intercept = _number(ds.get("RescaleSlope")), _number(ds.get("RescaleIntercept"))
    if slope is None and intercept is None:
        return arr, False, (float(lo), float(hi))
    m = 1.0 if slope is None else slope
    c = 0.0 if intercept is None else intercept
    ends = sorted((lo * m + c, hi * m + c))
    if m == round(m) and c == round(c):
        lo_i, hi_i = int(ends[0]), int(ends[1])
        dtype: Any = np.int64
        for candidate in (np.int16, np.int32):
            if np.iinfo(candidate).min <= lo_i and hi_i <= np.iinfo(candidate).max:
                dtype = candidate
                break
        out = arr.astype(np.int64) * int(m) + int(c)
        return out.astype(dtype), True, (ends[0], ends[1])
    # float64 as pydicom computes it; stored as float32 once every step is done
    return arr.astype(np.float64) * m + c, True, (ends[0], ends[1])


def _voi(
    arr: npt.NDArray[Any], ds: Any, mode: str, out_range: tuple[float, float]
) -> tuple[npt.NDArray[Any], str, tuple[float, float]]:
    """Apply the VOI transformation ``mode`` asks for; returns (values, what, output range)."""
    from pydicom.pixels import apply_voi_lut

    if mode == "none":
        return arr, "none", out_range
    if mode == "voi_lut" and ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "a VOI LUT on a float input": rescaled floats
            out = np.asarray(apply_voi_lut(arr, ds, prefer_lut=True))
        return out, "voi_lut", (0.0, float(2**bits - 1))
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            out = np.asarray(apply_voi_lut(arr, ds, prefer_lut=False))
        except ValueError as exc:  # a width below what the function allows
            raise GeometryError(f"the VOI window cannot be applied ({exc})") from None
        return out, "window", out_range  # float64: float32 after the inversion
    return arr, "none", out_range


def _colour(arr: npt.NDArray[Any], ds: Any, photometric: str) -> npt.NDArray[Any]:
    """Colour frames as RGB (decode.py already converted YBR the way pydicom does)."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return np.asarray(apply_color_lut(arr, ds))
    return arr


def _image(ds: Any, frames: npt.NDArray[Any], cfg: TensorsConfig) -> PlanarImage:
    n_frames = _n_frames(ds)
    if frames.shape[0] != n_frames:
        raise GeometryError(f"decoded {frames.shape[0]} frames, the header says {n_frames}")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    arr: npt.NDArray[Any] = frames
    inverted, voi, rescaled = False, "none", False
    if samples == 1 and photometric != "PALETTE COLOR":
        arr, rescaled, out_range = _modality_lut(arr, ds)
        arr, voi, out_range = _voi(arr, ds, cfg.voi, out_range)
        if photometric == "MONOCHROME1":
            lo, hi = out_range
            if arr.dtype.kind in "iu" and lo == round(lo) and hi == round(hi):
                total = int(lo) + int(hi)
                arr = (total - arr.astype(np.int64)).astype(arr.dtype)
            else:
                arr = (lo + hi) - arr.astype(np.float64)
            inverted = True
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
    else:
        arr = _colour(arr, ds, photometric)
    if n_frames == 1:
        arr = arr[0]
    spacing, source = _spacing(ds)
    frame_time = _number(ds.get("FrameTime"))
    vector = ds.get("FrameTimeVector")
    times = None
    if vector is not None and n_frames > 1:
        values = [_number(v) for v in (vector if not isinstance(vector, str | float) else [vector])]
        times = [v for v in values if v is not None]
        times = times if len(times) == n_frames else None
    columns = {
        "PhotometricInterpretation": _term(ds, "PhotometricInterpretation"),
        "monochrome1_inverted": inverted,
        "pixel_spacing_source": source,
        "PixelSpacingCalibrationType": _term(ds, "PixelSpacingCalibrationType"),
        "EstimatedRadiographicMagnificationFactor": _number(
            ds.get("EstimatedRadiographicMagnificationFactor")
        ),
        "voi": voi,
        "WindowCenter": _number(ds.get("WindowCenter")),
        "WindowWidth": _number(ds.get("WindowWidth")),
        "VOILUTFunction": _term(ds, "VOILUTFunction"),
        "PresentationIntentType": _term(ds, "PresentationIntentType"),
        "ViewPosition": _term(ds, "ViewPosition"),
        "ImageLaterality": _term(ds, "ImageLaterality"),
        "Laterality": _term(ds, "Laterality"),
        "FrameTime": frame_time if n_frames > 1 else None,
        "FrameTimeVector": times,
    }
    return PlanarImage(
        array=np.ascontiguousarray(arr),
        kind="cine" if n_frames > 1 else "planar",
        spacing=spacing,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        n_frames=n_frames,
        rescaled=rescaled,
        columns=columns,
    )


def _order(ds: Any) -> tuple[float, str]:
    number = _number(ds.get("InstanceNumber"))
    return (math.inf if number is None else number, str(ds.get("SOPInstanceUID", "")))


def build_planar(
    datasets: Sequence[Any], pixels: Sequence[npt.NDArray[Any]], cfg: TensorsConfig
) -> list[PlanarImage]:
    """One :class:`PlanarImage` per object of a planar series, by Instance Number.

    ``pixels`` holds each dataset's decoded frames (:func:`~pipeline.tensors.decode.
    decode_frames`), in the order of ``datasets``; the datasets are full pydicom datasets
    (the fast reader leaves planar modalities to ``dcmread``).

    Raises:
        GeometryError: an object's frames do not match its header, or its VOI window cannot
            be applied (PHI-free message).
    """
    if not datasets:
        raise GeometryError("empty series: no images")
    pairs = sorted(zip(datasets, pixels, strict=True), key=lambda p: _order(p[0]))
    return [_image(ds, frames, cfg) for ds, frames in pairs]


def planar_preprocessing(cfg: TensorsConfig) -> TensorsConfig:
    """The part of the preprocessing that applies to a 2D tensor: the intensity window,
    normalisation and dtype (no reorientation or resampling: there is no patient grid)."""
    return cfg.model_copy(update={"orientation": "native", "spacing": None})
