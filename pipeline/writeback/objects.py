"""DICOM SEG and TID 1500 SR for one volume's findings, made with highdicom.

:func:`build_seg` turns a label map in tensor geometry -- ``(slices, rows, cols)``, slice ``k``
being frame ``frame_numbers[k]`` of source image ``k`` -- into a BINARY Segmentation whose
frame for source image ``k`` holds ``mask[k] == label``: the tensors stage stores the raw
grid (no resampling), so the mapping back onto the original frames is exact, voxel for voxel.
Each segment carries its category and type codes (and type modifier, anatomic region and
display colour where known), resolved at write-back by :mod:`pipeline.codes` (the model
registry, the shipped tables, or a local ``99PACSFLOW`` code, declared in the Coding Scheme
Identification Sequence), the algorithm (model name, version, weights sha256) and a tracking
UID. Frames without any segment voxel are left out (highdicom's default); each kept frame
references its source image and carries its own Plane Position, so viewers place it by
geometry, never by frame index.

:func:`build_sr` makes a Comprehensive 3D SR with a TID 1500 Measurement Report: per segment a
volumetric measurement group (tracking identifier and UID, finding type, the SEG segment
referenced, volume in mL, mean HU where measured), the model as the observer device, the
study's procedure as the procedure reported, and the finding site (with laterality) where the
codes give one. A SEG of one segment is referenced too: highdicom's
``ReferencedSegment.from_segmentation`` cannot read the segment identification that a
single-segment SEG keeps in its shared functional groups, so :func:`referenced_segment` builds
the reference from the frames' derivation items.

Nothing here reads the lake: callers pass the original (re-identified) source headers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from pipeline.errors import WritebackError

__all__ = [
    "ReviewerObserver",
    "SegmentSpec",
    "build_seg",
    "build_sr",
    "referenced_segment",
    "segment_of_frames",
]

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
    type_modifier: tuple[str, str, str] | None = None  # e.g. (7771000, SCT, Left)
    region: tuple[str, str, str] | None = None  # anatomic region
    region_modifier: tuple[str, str, str] | None = None
    rgb: tuple[int, int, int] | None = None  # recommended display colour


@dataclass(frozen=True)
class ReviewerObserver:
    """The reviewer who corrected a mask, as the observer (content creator) of its SEG.

    ``login`` is the review app's account name, the name its audit log records: staff, never a
    patient's. It becomes the Content Creator's Name (a PN of one component, the family name,
    DICOM-unsafe characters replaced) and a person identification code in pacsflow's local
    scheme.

    Raises:
        WritebackError: an empty login.
    """

    login: str

    def __post_init__(self) -> None:
        if not self.login.strip():
            raise WritebackError("a correction's reviewer has no name")

    @property
    def person_name(self) -> str:
        """The login as a DICOM PN of one component, the family name (a trailing caret says
        so; no other component or group separator, at most 64 chars)."""
        return re.sub(r"[^A-Za-z0-9 ._@-]", "_", self.login.strip())[:63] + "^"

    def code(self) -> Any:
        """The reviewer's person identification code (local scheme ``99PACSFLOW``)."""
        from pipeline.codes import LOCAL_SCHEME

        name = self.person_name.removesuffix("^")
        return _code((self.login.strip()[:64], LOCAL_SCHEME, f"review user {name}"))


#: SNOMED CT laterality codes (CID 244) a type or region modifier may carry into an SR site
_LATERALITY: Final = {"7771000", "24028007", "51440002", "66459002"}


def _coding_schemes(segments: Sequence[SegmentSpec], *, local: bool = False) -> list[Any]:
    """Coding Scheme Identification items for the private schemes ``segments`` use (and the
    local scheme when ``local``: a reviewer's identification code)."""
    from pydicom.dataset import Dataset

    from pipeline.codes import LOCAL_SCHEME, LOCAL_SCHEME_NAME

    used = {
        t[1]
        for spec in segments
        for t in (spec.category, spec.type, spec.type_modifier, spec.region)
        if t is not None
    }
    items = []
    if local or LOCAL_SCHEME in used:
        item = Dataset()
        item.CodingSchemeDesignator = LOCAL_SCHEME
        item.CodingSchemeName = LOCAL_SCHEME_NAME
        item.CodingSchemeResponsibleOrganization = MANUFACTURER
        items.append(item)
    return items


def declare_schemes(ds: Any, triples: Sequence[Sequence[str] | None]) -> None:
    """Set ``ds``'s Coding Scheme Identification Sequence for the private schemes that the
    code ``triples`` it carries use (pacsflow's local scheme of uncoded labels)."""
    from pydicom.dataset import Dataset

    from pipeline.codes import LOCAL_SCHEME, LOCAL_SCHEME_NAME

    if any(t is not None and t[1] == LOCAL_SCHEME for t in triples):
        item = Dataset()
        item.CodingSchemeDesignator = LOCAL_SCHEME
        item.CodingSchemeName = LOCAL_SCHEME_NAME
        item.CodingSchemeResponsibleOrganization = MANUFACTURER
        ds.CodingSchemeIdentificationSequence = [item]


def device_observer(model: str, model_version: str, weights_sha256: str, device_uid: str) -> Any:
    """The SR observer context of a model: a device named by the model, its version and the
    first 16 hex digits of its weights' sha256 as serial number."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=model[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{model} {model_version}"[:64],
            serial_number=weights_sha256.removeprefix("sha256:")[:16],
        ),
    )


def measurement_sr(
    evidence: Sequence[Any],
    groups: Sequence[Any],
    observer: Any,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    description: str,
) -> Any:
    """A TID 1500 ``Comprehensive3DSR`` of measurement ``groups`` by ``observer`` about the
    study of ``evidence``'s last item (the source images), reporting its procedure (the
    study's Procedure Code, else "Imaging procedure").

    Raises:
        WritebackError: highdicom refuses the SR.
    """
    import highdicom as hd

    study = evidence[-1]
    seq = study.get("ProcedureCodeSequence")
    procedure = (
        _code((str(seq[0].CodeValue), str(seq[0].CodingSchemeDesignator), str(seq[0].CodeMeaning)))
        if seq
        else _code(_PROCEDURE_FALLBACK)
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=list(groups),
    )
    try:
        return hd.sr.Comprehensive3DSR(
            evidence=list(evidence),
            content=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            series_description=description[:64],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise WritebackError(f"highdicom refused the SR: {str(exc).splitlines()[0]}") from None


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
    reviewer: ReviewerObserver | None = None,
) -> Any:
    """A BINARY ``highdicom.seg.Segmentation`` of ``segments`` over ``source_images``.

    ``source_images[k]`` is the original dataset of slice ``k`` (one per slice; the same
    multi-frame dataset repeated for an enhanced source, with ``frame_numbers[k]`` its frame).
    With a ``reviewer`` the SEG is a reviewer's correction of the model's mask: the segments are
    SEMIAUTOMATIC (the model still named as their algorithm), the reviewer is the content
    creator (Content Creator's Name and Identification), labelled ``CORRECTED``.

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
        region = None
        if spec.region is not None:
            region = _code(spec.region)
            if spec.region_modifier is not None:
                region.AnatomicRegionModifierSequence = [_code(spec.region_modifier)]
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label[:64],
            segmented_property_category=_code(spec.category),
            segmented_property_type=_code(spec.type),
            algorithm_type=(
                hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
                if reviewer is None
                else hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
            ),
            algorithm_identification=_algorithm(model, model_version, weights_sha256),
            tracking_uid=spec.tracking_uid or hd.UID(),
            tracking_id=spec.label,
            anatomic_regions=[region] if region is not None else None,
            display_color=(
                hd.color.CIELabColor.from_rgb(*(c / 255.0 for c in spec.rgb))
                if spec.rgb is not None
                else None
            ),
        )
        if spec.type_modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[
                0
            ].SegmentedPropertyTypeModifierCodeSequence = [_code(spec.type_modifier)]
        descriptions.append(description)
    creator: dict[str, Any] = {}
    series_description = f"{model} {model_version} segmentation"
    if reviewer is not None:
        institution = str(sources[0].get("InstitutionName") or "") or f"{MANUFACTURER} review"
        creator = {
            "content_label": "CORRECTED",
            "content_description": f"{model} {model_version} corrected in review"[:64],
            "content_creator_name": reviewer.person_name,
            "content_creator_identification": hd.ContentCreatorIdentificationCodeSequence(
                person_identification_codes=[reviewer.code()],
                institution_name=institution[:64],
            ),
        }
        series_description = f"{model} {model_version} corrected"
    try:
        seg = hd.seg.Segmentation(
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
            series_description=series_description[:64],
            omit_empty_frames=True,
            **creator,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise WritebackError(f"highdicom refused the SEG: {str(exc).splitlines()[0]}") from None
    schemes = _coding_schemes(segments, local=reviewer is not None)
    if schemes:
        seg.CodingSchemeIdentificationSequence = schemes
    return seg


def segment_of_frames(seg: Any) -> list[int]:
    """The segment number of each frame of ``seg``: from each frame's Segment Identification,
    or, in a SEG of one segment, from the shared functional groups (where highdicom and other
    writers put it when every frame belongs to the same segment).

    Raises:
        WritebackError: a frame whose segment is given nowhere.
    """
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    shared_id = shared.get("SegmentIdentificationSequence") if shared is not None else None
    out = []
    for index, fg in enumerate(seg.get("PerFrameFunctionalGroupsSequence", [])):
        ident = fg.get("SegmentIdentificationSequence") or shared_id
        if not ident:
            raise WritebackError(f"SEG frame {index + 1} has no Segment Identification")
        out.append(int(ident[0].ReferencedSegmentNumber))
    return out


def referenced_segment(seg: Any, number: int) -> Any:
    """An SR ``ReferencedSegment`` for segment ``number`` of ``seg``, with the source images
    its frames were derived from (the reference ``ReferencedSegment.from_segmentation`` makes,
    also for a SEG of one segment, which it cannot read).

    Raises:
        WritebackError: the SEG has no frame of that segment, or its frames name no source.
    """
    import highdicom as hd
    from pydicom.multival import MultiValue

    numbers = segment_of_frames(seg)
    if number not in numbers:
        raise WritebackError(f"the SEG has no frame of segment {number}")
    sources: dict[str, Any] = {}
    for fg, frame_segment in zip(seg.PerFrameFunctionalGroupsSequence, numbers, strict=True):
        if frame_segment != number:
            continue
        for derivation in fg.get("DerivationImageSequence", []):
            for src in derivation.get("SourceImageSequence", []):
                uid = str(src.ReferencedSOPInstanceUID)
                if uid not in sources:
                    frames = src.get("ReferencedFrameNumber")
                    if frames is not None and not isinstance(frames, MultiValue | list):
                        frames = [frames]
                    sources[uid] = hd.sr.SourceImageForSegmentation(
                        referenced_sop_class_uid=str(src.ReferencedSOPClassUID),
                        referenced_sop_instance_uid=uid,
                        referenced_frame_numbers=(
                            None if frames is None else [int(f) for f in frames]
                        ),
                    )
    if not sources:
        raise WritebackError(f"the frames of segment {number} reference no source image")
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=number,
        source_images=list(sources.values()),
    )


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

    observer = device_observer(model, model_version, weights_sha256, device_uid)
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
                referenced_segment=referenced_segment(seg, number),
                finding_type=_code(spec.type),
                finding_category=_code(spec.category),
                finding_sites=_finding_sites(spec),
                algorithm_id=algorithm,
                measurements=measurements or None,
            )
        )
    sr = measurement_sr(
        [seg, *source_images],
        groups,
        observer,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        description=f"{model} {model_version} measurements",
    )
    schemes = _coding_schemes(segments)
    if schemes:
        sr.CodingSchemeIdentificationSequence = schemes
    return sr


def _finding_sites(spec: SegmentSpec) -> list[Any] | None:
    """The SR finding site of a segment: its anatomic region, or its type when a laterality
    modifier qualifies it (left adrenal gland), with that laterality."""
    import highdicom as hd

    if spec.region is not None:
        laterality = spec.region_modifier
        location = spec.region
    elif spec.type_modifier is not None:
        laterality = spec.type_modifier
        location = spec.type
    else:
        return None
    if laterality is None or laterality[1] != "SCT" or laterality[0] not in _LATERALITY:
        laterality = None
    return [
        hd.sr.FindingSite(
            anatomic_location=_code(location),
            laterality=_code(laterality) if laterality is not None else None,
        )
    ]
