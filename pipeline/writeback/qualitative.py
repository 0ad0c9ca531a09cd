"""A classifier's result as a TID 1500 SR: qualitative evaluation and class probabilities.

One image (or volume) classified by a model becomes one Comprehensive 3D SR with a TID 1500
Measurement Report holding one TID 1501 measurement group
(:class:`highdicom.sr.MeasurementsAndQualitativeEvaluations`) that references the source
image(s) (``source_images``):

- the **qualitative evaluation**: concept name = the classes' *category* code (what is being
  classified, e.g. breast composition), value = the predicted class's *type* code;
- one **measurement per class**: concept name = that class's type code, value = its score
  (the bundle's probability, unit ``1``), so the whole class vector survives;
- the model as observer device and algorithm (name, version, weights sha256).

Codes come from the model registry (copied into the findings); a classification whose
predicted class has no codes is not written (the caller counts it as skipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.writeback.objects import _code, device_observer, measurement_sr

__all__ = ["build_classification_sr"]


def build_classification_sr(
    source_images: Sequence[Any],
    classes: Sequence[Mapping[str, Any]],
    *,
    model: str,
    model_version: str,
    weights_sha256: str,
    device_uid: str,
    tracking_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9903,
) -> Any | None:
    """The SR of one classification, or None when the predicted class has no codes.

    ``classes``: the findings' rows of the image (``label``, ``value``, ``category``,
    ``type``, ``score``, ``predicted``), in class order.

    Raises:
        WritebackError: highdicom refuses the content.
    """
    import highdicom as hd

    top = [c for c in classes if c.get("predicted")]
    if not top or not top[0].get("category") or not top[0].get("type"):
        return None
    predicted = top[0]
    algorithm = hd.sr.AlgorithmIdentification(
        name=model, version=model_version, parameters=[f"weights {weights_sha256}"]
    )
    observer = device_observer(model, model_version, weights_sha256, device_uid)
    measurements = [
        hd.sr.Measurement(
            name=_code(c["type"]),
            value=float(c["score"]),
            unit=_code(("1", "UCUM", "no units")),
            algorithm_id=algorithm,
        )
        for c in classes
        if c.get("type") and c.get("score") is not None
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{model} {predicted['label']}"[:64]
        ),
        finding_type=_code(predicted["category"]),
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=_code(predicted["category"]), value=_code(predicted["type"])
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in source_images
        ],
    )
    return measurement_sr(
        list(source_images),
        [group],
        observer,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        description=f"{model} {model_version} classification",
    )
