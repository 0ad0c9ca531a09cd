"""A written-back result as a FHIR R4 transaction Bundle (pure: no I/O, no lake).

One Bundle per result (a volume's SEG + SR of one model identity), every resource validated by
``fhir.resources`` (its R4B models) before the Bundle exists:

- ``ImagingStudy``: the original study (re-identified: the original Study Instance UID and
  accession number), its source series with their instances, and the SEG and SR series
  pacsflow wrote back;
- ``DocumentReference``: the SR as a document (a DICOM SR instance cannot be the target of a
  reference: an ``ImagingStudy`` is a study, not an instance), so that each ``Observation`` can be
  ``derivedFrom`` the ImagingStudy *and* the SR; its ``masterIdentifier`` is the SR's SOP
  Instance UID (``urn:oid:...``);
- ``Device``: the model, its version and its weights' SHA-256;
- per label of a segmentation, a grouping ``Observation`` (code: the label's finding type)
  whose ``hasMember`` are one ``Observation`` per measurement (volume mL, mean HU, diameter
  mm; UCUM units; the registry's SNOMED CT / DCM concepts);
- per detected box, one ``Observation`` (code: the box class's finding type) whose
  ``component`` are the detector's probability (UCUM ``1``) and the box's centre and extents
  (LPS, UCUM ``mm``);
- per classification (an image's or volume's class vector), one ``Observation`` (code: what
  is classified, the classes' category) whose ``valueCodeableConcept`` is the predicted class's
  code, with the probability of the predicted class and of every class as ``component``;
- ``DiagnosticReport``: ``preliminary`` until the QA review accepts it (then ``final``),
  ``conclusion`` generated from the findings, code and category from the registry.

The patient is referred to, never created: ``Patient?identifier=<system>|<PatientID>`` (a
conditional reference the server resolves), with the same identifier as a logical reference.
Every resource is ``PUT`` under an id that is a UUID 5 of the result's identity, so the same
result always gives the same ids: a rerun updates, never duplicates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.fhir.systems import ACSN, DICOM_UID, SYSTEMS, V2_0203, oid

__all__ = [
    "BOX_CENTRE",
    "BOX_SIZE",
    "DEFAULT_MEASUREMENTS",
    "MILLIMETRE",
    "NAMESPACE",
    "PROBABILITY",
    "UNIT_ONE",
    "BuiltBundle",
    "FindingRecord",
    "MeasurementRecord",
    "ResultRecord",
    "SeriesRecord",
    "build_bundle",
    "coding",
    "report_status",
    "resource_id",
    "validate_resource",
]

Triple = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)

#: the namespace of every id pacsflow gives a FHIR resource (UUID 5)
NAMESPACE: Final = uuid.UUID("5b0f3c4e-5d0a-5a83-9d6c-2a3f7c1e9b11")

RESULT_SYSTEM: Final = "urn:pacsflow:result"
WEIGHTS_SYSTEM: Final = "urn:pacsflow:weights-sha256"
SOP_CLASS_SEG: Final = "1.2.840.10008.5.1.4.1.1.66.4"
SOP_CLASS_COMPREHENSIVE_3D_SR: Final = "1.2.840.10008.5.1.4.1.1.88.34"

#: measurement name (a findings row's) -> (concept, unit, derivation) when the registry
#: entry's ``measurements`` does not say
DEFAULT_MEASUREMENTS: Final[dict[str, tuple[Triple, Triple, Triple | None]]] = {
    "volume_ml": (("118565006", "SCT", "Volume"), ("mL", "UCUM", "milliliter"), None),
    "mean_hu": (
        ("112031", "DCM", "Attenuation Coefficient"),
        ("[hnsf'U]", "UCUM", "Hounsfield unit"),
        ("373098007", "SCT", "Mean"),
    ),
    "diameter_mm": (("81827009", "SCT", "Diameter"), ("mm", "UCUM", "millimeter"), None),
}
#: a detector's score and a class's probability (as the box and classification SRs say)
PROBABILITY: Final[Triple] = ("122157", "DCM", "Probability")
UNIT_ONE: Final[Triple] = ("1", "UCUM", "no units")
MILLIMETRE: Final[Triple] = ("mm", "UCUM", "millimeter")
#: a box's extents along x, y, z (LPS; the box SR's Width, Height, Depth)
BOX_SIZE: Final[tuple[Triple, Triple, Triple]] = (
    ("103355008", "SCT", "Width"),
    ("121207", "DCM", "Height"),
    ("131197000", "SCT", "Depth"),
)
#: a box's centre x, y, z (LPS mm): no standard concept names a coordinate, so local codes
BOX_CENTRE: Final[tuple[Triple, Triple, Triple]] = (
    ("box-centre-x", "99PACSFLOW", "Box centre x (LPS)"),
    ("box-centre-y", "99PACSFLOW", "Box centre y (LPS)"),
    ("box-centre-z", "99PACSFLOW", "Box centre z (LPS)"),
)
#: the report's code and category when the registry entry has no ``report``
DEFAULT_REPORT_CODE: Final[Triple] = ("126000", "DCM", "Imaging Measurement Report")
DEFAULT_REPORT_CATEGORY: Final[tuple[Triple, ...]] = (("RAD", "HL70074", "Radiology"),)


@dataclass(frozen=True)
class MeasurementRecord:
    """One measured value of a label, with its concept and UCUM unit."""

    #: volume_ml | mean_hu | diameter_mm; boxes: probability, centre_<x|y|z>_mm,
    #: size_<x|y|z>_mm; classes: probability, probability_<class>
    name: str
    value: float
    concept: Triple
    unit: Triple
    derivation: Triple | None = None


@dataclass(frozen=True)
class FindingRecord:
    """One label of a result (a findings row) with its codes and its QA decision."""

    finding_key: str
    label: str
    category: Triple
    type: Triple
    region: Triple | None = None
    #: the latest review decision (accept | reject | uncertain), None: not reviewed
    decision: str | None = None
    #: True for a lesion-like output a reviewer decides on; False for a per-series
    #: measurement (tissue volumes: never a worklist row)
    reviewable: bool = True
    measurements: tuple[MeasurementRecord, ...] = ()
    #: segmentation (a grouping Observation and one per measurement) | detection (a box) |
    #: classification (the predicted class): the last two are one Observation each, their
    #: measurements its components
    kind: str = "segmentation"
    #: classification: the predicted class's code (``type`` is then what is classified)
    value: Triple | None = None


@dataclass(frozen=True)
class SeriesRecord:
    """One series of the original study as the ImagingStudy lists it (original UIDs)."""

    uid: str
    modality: str
    #: (SOP Instance UID, SOP Class UID, Instance Number or None), in order
    instances: tuple[tuple[str, str, int | None], ...] = ()
    description: str | None = None


@dataclass(frozen=True)
class ResultRecord:
    """Everything one Bundle says: a result re-identified (restricted zone only)."""

    #: the result's identity (model, version, weights, original source series, volume): the
    #: seed of every id; never leaves the restricted zone
    identity: str
    #: pseudonymous key of the result (tensor key and model reference), for logs and rows
    result_key: str
    patient_id: str
    study_uid: str
    accession: str | None
    #: the study's series pacsflow knows: source series and the SEG/SR written back
    series: tuple[SeriesRecord, ...]
    sr_uid: str
    seg_uid: str | None
    model: str
    model_version: str
    weights_sha256: str
    issued: dt.datetime
    findings: tuple[FindingRecord, ...]
    report_code: Triple = DEFAULT_REPORT_CODE
    report_category: tuple[Triple, ...] = DEFAULT_REPORT_CATEGORY
    study_started: dt.date | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltBundle:
    """A validated transaction Bundle and what the outbox records of it."""

    bundle_id: str
    report_status: str
    json_text: str  # the Bundle, as sent and as written to a folder
    sha256: str
    resources: tuple[tuple[str, str], ...]  # (resource type, id), in entry order


def resource_id(*parts: str) -> str:
    """The deterministic id of a resource: UUID 5 of ``parts`` in :data:`NAMESPACE`."""
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(parts)))


def coding(code: Triple) -> dict[str, str]:
    """A FHIR Coding of a DICOM-style code triple (SCT, DCM, UCUM, LN and pacsflow's local
    scheme map to their FHIR systems; any other designator to ``urn:pacsflow:scheme:<it>``)."""
    value, scheme, meaning = code
    system = SYSTEMS.get(scheme) or f"urn:pacsflow:scheme:{scheme}"
    return {"system": system, "code": value, "display": meaning}


def _instant(when: dt.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def report_status(findings: Sequence[FindingRecord]) -> str:
    """The DiagnosticReport's status from the QA decisions of its findings.

    ``final`` once the review accepted it: at least one accepted finding, every reviewable
    finding decided (accept or reject) and none left ``uncertain``; ``cancelled`` when every
    reviewable finding was rejected; ``preliminary`` otherwise (not yet, or not fully,
    reviewed).

    >>> f = FindingRecord("k", "a", ("1", "SCT", "x"), ("2", "SCT", "y"))
    >>> report_status([f]), report_status([FindingRecord(**{**f.__dict__, "decision": "accept"})])
    ('preliminary', 'final')
    """
    decisions = [f.decision for f in findings if f.reviewable]
    every = [f.decision for f in findings]
    if "uncertain" in every or "accept" not in every:
        if decisions and all(d == "reject" for d in decisions):
            return "cancelled"
        return "preliminary"
    if any(d is None for d in decisions):
        return "preliminary"
    return "final"


def _observation_status(finding: FindingRecord) -> str:
    return {"accept": "final", "reject": "entered-in-error"}.get(
        finding.decision or "", "preliminary"
    )


def _number(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def conclusion(result: ResultRecord, status: str) -> str:
    """The report's conclusion, generated from the findings (labels, values, decisions)."""
    head = {
        "final": "reviewed and accepted",
        "cancelled": "rejected on review",
    }.get(status, "not yet accepted on review")
    lines = [f"AI result of {result.model} {result.model_version} ({head})."]
    rejected = []
    for f in result.findings:
        if f.decision == "reject":
            rejected.append(f.label)
            continue
        if f.kind == "classification" and f.value is not None:
            p = next((m.value for m in f.measurements if m.name == "probability"), None)
            said = f", probability {p:.2f}" if p is not None else ""
            lines.append(f"{f.type[2]}: {f.value[2]} ({f.label}{said}).")
            continue
        parts = []
        for m in f.measurements:
            if m.name.startswith("centre_"):
                continue  # a position, not a finding's size: in the Observation only
            unit = {"[hnsf'U]": "HU"}.get(m.unit[0], m.unit[0])
            what = {"volume_ml": "volume", "mean_hu": "mean", "diameter_mm": "diameter"}.get(
                m.name, m.concept[2].lower()
            )
            parts.append(f"{what} {_number(m.value)}" + (f" {unit}" if unit != "1" else ""))
        lines.append(f"{f.label} ({f.type[2]}): {', '.join(parts) or 'no measurement'}.")
    if rejected:
        lines.append(f"Rejected on review: {', '.join(rejected)}.")
    return " ".join(lines)


def validate_resource(resource: Mapping[str, Any]) -> Any:
    """The ``fhir.resources`` (R4B) model of ``resource``: raises ``pydantic.ValidationError``
    when it is not a valid resource of its type."""
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(str(resource["resourceType"])).model_validate(dict(resource))


def build_bundle(result: ResultRecord, *, patient_system: str) -> BuiltBundle:
    """The transaction Bundle of ``result`` (every resource and the Bundle validated).

    Parameters
    ----------
    result:
        The re-identified result.
    patient_system:
        The site's patient identifier system (``fhir.patient_identifier_system``).

    Returns
    -------
    BuiltBundle
        The Bundle's JSON (deterministic: the same result gives the same bytes), its SHA-256,
        the report status and the resources' ids.

    Raises
    ------
    pydantic.ValidationError
        A resource is not valid FHIR (a bug, or a value FHIR cannot carry).
    """
    ident = result.identity
    rid = resource_id("Result", ident)  # the result's identifier value: opaque, stable
    patient = {
        "reference": f"Patient?identifier={patient_system}|{result.patient_id}",
        "identifier": {"system": patient_system, "value": result.patient_id},
    }
    status = report_status(result.findings)
    study_id = resource_id("ImagingStudy", result.study_uid)
    device_id = resource_id("Device", result.model, result.model_version, result.weights_sha256)
    doc_id = resource_id("DocumentReference", ident)
    report_id = resource_id("DiagnosticReport", ident)
    issued = _instant(result.issued)
    resources: list[dict[str, Any]] = []

    identifiers: list[dict[str, Any]] = [{"system": DICOM_UID, "value": oid(result.study_uid)}]
    if result.accession:
        acsn = {"coding": [{"system": V2_0203, "code": ACSN}]}
        identifiers.append({"type": acsn, "value": result.accession})
    modalities = sorted({s.modality for s in result.series if s.modality})
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": study_id,
        "identifier": identifiers,
        "status": "available",
        "subject": patient,
        "modality": [coding((m, "DCM", m)) for m in modalities],
        "numberOfSeries": len(result.series),
        "numberOfInstances": sum(len(s.instances) for s in result.series),
        "series": [
            {
                "uid": s.uid,
                "modality": coding((s.modality, "DCM", s.modality)),
                **({"description": s.description} if s.description else {}),
                "numberOfInstances": len(s.instances),
                "instance": [
                    {
                        "uid": sop,
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": oid(cls)},
                        **({"number": number} if number is not None else {}),
                    }
                    for sop, cls, number in s.instances
                ],
            }
            for s in result.series
        ],
    }
    if result.study_started is not None:
        study["started"] = result.study_started.isoformat()
    resources.append(study)
    device = {
        "resourceType": "Device",
        "id": device_id,
        "identifier": [{"system": WEIGHTS_SYSTEM, "value": result.weights_sha256}],
        "status": "active",
        "deviceName": [{"name": result.model, "type": "model-name"}],
        "type": {"text": "AI model (pacsflow inference)"},
        "version": [
            {"type": {"text": "model version"}, "value": result.model_version},
            {"type": {"text": "weights sha256"}, "value": result.weights_sha256},
        ],
    }
    resources.append(device)
    sr_ref = {"reference": f"DocumentReference/{doc_id}"}
    study_ref = {"reference": f"ImagingStudy/{study_id}"}
    document = {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "masterIdentifier": {"system": DICOM_UID, "value": oid(result.sr_uid)},
        "status": "current",
        "docStatus": status if status in ("preliminary", "final") else "entered-in-error",
        "type": {"coding": [coding(result.report_code)]},
        "subject": patient,
        "date": issued,
        "author": [{"reference": f"Device/{device_id}"}],
        "description": f"DICOM SR of {result.model} {result.model_version} measurements",
        "content": [
            {
                "attachment": {
                    "contentType": "application/dicom",
                    "title": f"{result.model} {result.model_version} TID 1500 SR",
                }
            }
        ],
        "context": {"related": [study_ref]},
    }
    resources.append(document)
    groups = []
    for finding in result.findings:
        fid = resource_id("Observation", ident, finding.label)
        if finding.kind != "segmentation":  # a box or a classification: one Observation
            groups.append(
                _single_observation(
                    finding,
                    fid,
                    identifier=f"{rid}/{finding.label}",
                    patient=patient,
                    issued=issued,
                    device_id=device_id,
                    derived=[study_ref, sr_ref],
                )
            )
            continue
        members = []
        for m in finding.measurements:
            mid = resource_id("Observation", ident, finding.label, m.name)
            obs: dict[str, Any] = {
                "resourceType": "Observation",
                "id": mid,
                "identifier": [
                    {"system": RESULT_SYSTEM, "value": f"{rid}/{finding.label}/{m.name}"}
                ],
                "status": _observation_status(finding),
                "category": [_imaging_category()],
                "code": {"coding": [coding(m.concept)], "text": f"{finding.label} {m.concept[2]}"},
                "subject": patient,
                "issued": issued,
                "device": {"reference": f"Device/{device_id}"},
                "derivedFrom": [study_ref, sr_ref],
                "valueQuantity": {
                    "value": float(round(m.value, 6)),
                    "unit": m.unit[2],
                    "system": SYSTEMS["UCUM"],
                    "code": m.unit[0],
                },
            }
            if m.derivation is not None:
                obs["method"] = {"coding": [coding(m.derivation)]}
            if finding.region is not None:
                obs["bodySite"] = {"coding": [coding(finding.region)]}
            members.append(obs)
        group: dict[str, Any] = {
            "resourceType": "Observation",
            "id": fid,
            "identifier": [{"system": RESULT_SYSTEM, "value": f"{rid}/{finding.label}"}],
            "status": _observation_status(finding),
            "category": [_imaging_category()],
            "code": {"coding": [coding(finding.type)], "text": finding.label},
            "subject": patient,
            "issued": issued,
            "device": {"reference": f"Device/{device_id}"},
            "derivedFrom": [study_ref, sr_ref],
            "hasMember": [{"reference": f"Observation/{o['id']}"} for o in members],
        }
        if finding.region is not None:
            group["bodySite"] = {"coding": [coding(finding.region)]}
        if not members:
            del group["hasMember"]
            group["dataAbsentReason"] = {"text": "no measurement"}
        groups.append(group)
        resources.extend(members)
    resources.extend(groups)
    report = {
        "resourceType": "DiagnosticReport",
        "id": report_id,
        "identifier": [{"system": RESULT_SYSTEM, "value": rid}],
        "status": status,
        "category": [{"coding": [coding(c)]} for c in result.report_category],
        "code": {"coding": [coding(result.report_code)]},
        "subject": patient,
        "issued": issued,
        "imagingStudy": [study_ref],
        "result": [{"reference": f"Observation/{g['id']}"} for g in groups],
        "conclusion": conclusion(result, status),
    }
    resources.append(report)
    bundle_id = resource_id("Bundle", ident)
    bundle = {
        "resourceType": "Bundle",
        "id": bundle_id,
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
            for r in resources
        ],
    }
    for r in resources:
        validate_resource(r)
    model = validate_resource(bundle)
    text = json.dumps(
        json.loads(model.model_dump_json(exclude_none=True)), indent=1, ensure_ascii=False
    )
    return BuiltBundle(
        bundle_id=bundle_id,
        report_status=status,
        json_text=text,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        resources=tuple((str(r["resourceType"]), str(r["id"])) for r in resources),
    )


def _quantity(m: MeasurementRecord) -> dict[str, Any]:
    return {
        "value": float(round(m.value, 6)),
        "unit": m.unit[2],
        "system": SYSTEMS["UCUM"],
        "code": m.unit[0],
    }


def _single_observation(
    finding: FindingRecord,
    fid: str,
    *,
    identifier: str,
    patient: dict[str, Any],
    issued: str,
    device_id: str,
    derived: list[dict[str, str]],
) -> dict[str, Any]:
    """The one Observation of a detected box or of a classification: its measurements
    (probability, box centre and extents; the class probabilities) as components, the
    predicted class (classification) as its value."""
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": fid,
        "identifier": [{"system": RESULT_SYSTEM, "value": identifier}],
        "status": _observation_status(finding),
        "category": [_imaging_category()],
        "code": {"coding": [coding(finding.type)], "text": finding.label},
        "subject": patient,
        "issued": issued,
        "device": {"reference": f"Device/{device_id}"},
        "derivedFrom": derived,
    }
    if finding.region is not None:
        obs["bodySite"] = {"coding": [coding(finding.region)]}
    if finding.value is not None:
        obs["valueCodeableConcept"] = {"coding": [coding(finding.value)]}
    components = []
    for m in finding.measurements:
        component: dict[str, Any] = {
            "code": {"coding": [coding(m.concept)], "text": m.name},
            "valueQuantity": _quantity(m),
        }
        components.append(component)
    if components:
        obs["component"] = components
    elif finding.value is None:
        obs["dataAbsentReason"] = {"text": "no measurement"}
    return obs


def _imaging_category() -> dict[str, Any]:
    return {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "imaging",
                "display": "Imaging",
            }
        ]
    }
