"""DICOM SEG and TID 1500 SR for one volume's findings, made with highdicom.

:func:`build_seg` turns a label map in tensor geometry -- ``(slices, rows, cols)``, slice ``k``
being frame ``frame_numbers[k]`` of source image ``k`` -- into a BINARY Segmentation whose
frame for source image ``k`` holds ``mask[k] == label``: the tensors stage stores the raw
grid (no resampling), so the mapping back onto the original frames is exact, voxel for voxel.
Each segment carries its SNOMED CT / DCM category and type codes (from the model registry),
the algorithm (model name, version, weights sha256) and a tracking UID. Frames without any
segment voxel are left out (highdicom's default); each kept frame references its source image
and carries its own Plane Position, so viewers place it by geometry, never by frame index.

:func:`build_sr` makes a Comprehensive 3D SR with a TID 1500 Measurement Report: per segment a
volumetric measurement group (tracking identifier and UID, finding type, the SEG segment
referenced, volume in mL, mean HU where measured), the model as the observer device, the
study's procedure as the procedure reported.

Nothing here reads the lake: callers pass the original (re-identified) source headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from pipeline.errors import WritebackError

__all__ = ["SegmentSpec", "build_seg", "build_sr"]

MANUFACTURER: Final = "pacsflow"
_PROCEDURE_FALLBACK: Final = ("363679005", "SCT", "Imaging procedure")


@dataclass(frozen=True)
class SegmentSpec:
    """One label of the model as a SEG segment and an SR measurement group."""

    label: str
    value: int  # the label's value in the mask
    category: tuple[str, str, str]  # (code value, scheme, meaning)
    type: tuple[str, str, str]
    volume_ml: float | None = None
    mean_hu: float | None = None
    tracking_uid: str | None = None


def _code(triple: Sequence[str]) -> Any:
    from highdicom.sr import CodedConcept

    value, scheme, meaning = triple
    return CodedConcept(value=str(value), scheme_designator=str(scheme), meaning=str(meaning))


def _algorithm(model: str, version: str, weights_sha256: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name=model,
        family=codes.cid7162.ArtificialIntelligence,
        version=version,
        source=MANUFACTURER,
        parameters={"weights_sha256": weights_sha256},
    )


def build_seg(
    source_images: Sequence[Any],
    frame_numbers: Sequence[int],
    mask: npt.NDArray[np.uint8],
    segments: Sequence[SegmentSpec],
    *,
    model: str,
    model_version: str,
    weights_sha256: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
) -> Any:
    """A BINARY ``highdicom.seg.Segmentation`` of ``segments`` over ``source_images``.

    ``source_images[k]`` is the original dataset of slice ``k`` (one per slice; the same
    multi-frame dataset repeated for an enhanced source, with ``frame_numbers[k]`` its frame).

    Raises:
        WritebackError: the mask does not fit the source images, or no segment is given.
    """
    import highdicom as hd

    if not segments:
        raise WritebackError("no segments to write")
    if mask.ndim != 3 or mask.shape[0] != len(source_images) != 0:
        raise WritebackError(
            f"mask of shape {mask.shape} does not match {len(source_images)} source slices"
        )
    singles = {id(ds) for ds in source_images}
    if len(singles) == 1 and len(source_images) > 1:
        # one enhanced multi-frame source: frames in the source's frame order
        order = np.argsort(np.asarray(frame_numbers))
        if list(np.asarray(frame_numbers)[order]) != list(range(1, len(frame_numbers) + 1)):
            raise WritebackError("the volume does not cover its multi-frame source frame by frame")
        sources = [source_images[0]]
        pixel = mask[order]
    elif len(singles) == len(source_images):
        sources = list(source_images)
        pixel = mask
    else:
        raise WritebackError("slices of one volume from both single- and multi-frame objects")
    rows, cols = int(sources[0].Rows), int(sources[0].Columns)
    if pixel.shape[1:] != (rows, cols):
        raise WritebackError(
            f"mask frames {pixel.shape[1:]} differ from the source frames {(rows, cols)}"
        )
    # label map -> one binary plane per segment, segment numbers 1..n in the given order
    labelmap = np.zeros(pixel.shape, dtype=np.uint8)
    descriptions = []
    for number, spec in enumerate(segments, start=1):
        labelmap[pixel == spec.value] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=spec.label,
                segmented_property_category=_code(spec.category),
                segmented_property_type=_code(spec.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=_algorithm(model, model_version, weights_sha256),
                tracking_uid=spec.tracking_uid or hd.UID(),
                tracking_id=spec.label,
            )
        )
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=labelmap,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=model[:64],
            software_versions=model_version[:64],
            device_serial_number=weights_sha256.removeprefix("sha256:")[:16],
            series_description=f"{model} {model_version} segmentation"[:64],
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise WritebackError(f"highdicom refused the SEG: {str(exc).splitlines()[0]}") from None


def build_sr(
    seg: Any,
    source_images: Sequence[Any],
    segments: Sequence[SegmentSpec],
    *,
    model: str,
    model_version: str,
    weights_sha256: str,
    device_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9902,
) -> Any:
    """A ``highdicom.sr.Comprehensive3DSR`` with a TID 1500 report of ``segments``' measurements,
    each group referencing its segment of ``seg``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=model[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{model} {model_version}"[:64],
            serial_number=weights_sha256.removeprefix("sha256:")[:16],
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=model, version=model_version, parameters=[f"weights {weights_sha256}"]
    )
    groups = []
    for number, spec in enumerate(segments, start=1):
        measurements = []
        if spec.volume_ml is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=codes.SCT.Volume,
                    value=float(spec.volume_ml),
                    unit=_code(("ml", "UCUM", "milliliter")),
                    algorithm_id=algorithm,
                )
            )
        if spec.mean_hu is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=_code(("112031", "DCM", "Attenuation Coefficient")),
                    value=float(spec.mean_hu),
                    unit=_code(("[hnsf'U]", "UCUM", "Hounsfield unit")),
                    derivation=codes.SCT.Mean,
                    algorithm_id=algorithm,
                )
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=str(seg.SegmentSequence[number - 1].TrackingUID),
                    identifier=spec.label,
                ),
                referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, number),
                finding_type=_code(spec.type),
                finding_category=_code(spec.category),
                algorithm_id=algorithm,
                measurements=measurements or None,
            )
        )
    study = source_images[0]
    procedure = (
        _code(
            (
                str(study.ProcedureCodeSequence[0].CodeValue),
                str(study.ProcedureCodeSequence[0].CodingSchemeDesignator),
                str(study.ProcedureCodeSequence[0].CodeMeaning),
            )
        )
        if "ProcedureCodeSequence" in study and len(study.ProcedureCodeSequence)
        else _code(_PROCEDURE_FALLBACK)
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    try:
        return hd.sr.Comprehensive3DSR(
            evidence=[seg, *source_images],
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            series_description=f"{model} {model_version} measurements"[:64],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise WritebackError(f"highdicom refused the SR: {str(exc).splitlines()[0]}") from None
