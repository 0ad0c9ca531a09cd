"""Detected boxes as a TID 1500 Measurement Report (Comprehensive 3D SR), made with highdicom.

Per box one TID 1411 volumetric ROI measurement group: tracking identifier and UID, the finding
type and category (registry codes of the box's class), and the box as a Volume Surface, a
SCOORD3D ``ELLIPSOID`` in the source series' frame of reference: its 6 points are the ends of
the 3 axes of the ellipsoid inscribed in the box, ``(x0, cy, cz), (x1, cy, cz), (cx, y0, cz),
(cx, y1, cz), (cx, cy, z0), (cx, cy, z1)``, so the box's LPS bounds are read back exactly from
them (:func:`box_of_ellipsoid`). Measurements: the detector's score (DCM 122157 Probability,
unit 1) and the box's extents along x, y, z (Width, Height, Depth, mm). No SEG is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.errors import WritebackError
from pipeline.writeback.objects import _code, device_observer, measurement_sr

__all__ = ["BoxSpec", "box_of_ellipsoid", "build_box_sr", "ellipsoid_of_box"]

_PROBABILITY = ("122157", "DCM", "Probability")
_EXTENTS = (
    ("103355008", "SCT", "Width"),
    ("121207", "DCM", "Height"),
    ("131197000", "SCT", "Depth"),
)


@dataclass(frozen=True)
class BoxSpec:
    """One box finding."""

    label: str
    category: tuple[str, str, str]
    type: tuple[str, str, str]
    box_mm: tuple[float, float, float, float, float, float]  # LPS x0, y0, z0, x1, y1, z1
    score: float | None = None
    tracking_uid: str | None = None


def ellipsoid_of_box(box_mm: Sequence[float]) -> npt.NDArray[np.float64]:
    """The 6 SCOORD3D ELLIPSOID points (axis ends) of the ellipsoid inscribed in the box."""
    lo, hi = np.asarray(box_mm[:3], dtype=np.float64), np.asarray(box_mm[3:], dtype=np.float64)
    centre = (lo + hi) / 2
    points = np.repeat(centre[None], 6, axis=0)
    for axis in range(3):
        points[2 * axis, axis] = lo[axis]
        points[2 * axis + 1, axis] = hi[axis]
    return points


def box_of_ellipsoid(points: npt.NDArray[Any]) -> tuple[float, ...]:
    """The box (x0, y0, z0, x1, y1, z1) whose inscribed ellipsoid has these axis ends."""
    pts = np.asarray(points, dtype=np.float64).reshape(6, 3)
    return tuple(float(v) for v in (*pts.min(0), *pts.max(0)))


def build_box_sr(
    source_images: Sequence[Any],
    boxes: Sequence[BoxSpec],
    *,
    model: str,
    model_version: str,
    weights_sha256: str,
    device_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9902,
) -> Any:
    """A ``highdicom.sr.Comprehensive3DSR``: a TID 1500 report with a group per box."""
    import highdicom as hd

    if not boxes:
        raise WritebackError("no boxes to write")
    study = source_images[0]
    frame_uid = str(getattr(study, "FrameOfReferenceUID", "") or "")
    if not frame_uid:
        raise WritebackError("the source images have no FrameOfReferenceUID")
    observer = device_observer(model, model_version, weights_sha256, device_uid)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model, version=model_version, parameters=[f"weights {weights_sha256}"]
    )
    series = hd.sr.SourceSeriesForSegmentation(str(study.SeriesInstanceUID))
    groups = []
    for spec in boxes:
        lo, hi = spec.box_mm[:3], spec.box_mm[3:]
        measurements = [
            hd.sr.Measurement(
                name=_code(concept),
                value=float(hi[axis] - lo[axis]),
                unit=_code(("mm", "UCUM", "millimeter")),
                algorithm_id=algorithm,
            )
            for axis, concept in enumerate(_EXTENTS)
        ]
        if spec.score is not None:
            measurements.insert(
                0,
                hd.sr.Measurement(
                    name=_code(_PROBABILITY),
                    value=float(spec.score),
                    unit=_code(("1", "UCUM", "no units")),
                    algorithm_id=algorithm,
                ),
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=spec.tracking_uid or hd.UID(), identifier=spec.label
                ),
                referenced_volume_surface=hd.sr.VolumeSurface(
                    graphic_type=hd.sr.GraphicTypeValues3D.ELLIPSOID,
                    graphic_data=ellipsoid_of_box(spec.box_mm),
                    frame_of_reference_uid=frame_uid,
                    source_series=series,
                ),
                finding_type=_code(spec.type),
                finding_category=_code(spec.category),
                algorithm_id=algorithm,
                measurements=measurements,
            )
        )
    return measurement_sr(
        list(source_images),
        groups,
        observer,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        description=f"{model} {model_version} detections",
    )
