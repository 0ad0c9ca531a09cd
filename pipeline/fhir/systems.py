"""The code and identifier systems both FHIR directions use, in one place.

The export (:mod:`pipeline.fhir.bundle`) writes codes under :data:`SYSTEMS` and identifies a
study by :func:`study_identifier` and its accession number by the type :data:`ACSN`; the import
(:mod:`pipeline.fhir.context`, :mod:`pipeline.fhir.search`) finds studies by the same
identifiers and names an EHR's code systems by their DICOM designators (:data:`SCHEMES`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "ACSN",
    "DICOM_UID",
    "SCHEMES",
    "SYSTEMS",
    "V2_0203",
    "is_accession",
    "oid",
    "study_identifier",
    "uid_of",
]

#: DICOM Coding Scheme Designator -> the FHIR code system the export writes it as
SYSTEMS: Final = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "LN": "http://loinc.org",
    "99PACSFLOW": "urn:pacsflow:local-codes",
    "HL70074": "http://terminology.hl7.org/CodeSystem/v2-0074",
}

#: FHIR code system URI -> DICOM Coding Scheme Designator (PS3.16 Table 8-1), for reading an
#: EHR's codes; other systems are named by their URI (which ``deid.keep_code_meanings`` may
#: then name)
SCHEMES: Final = {SYSTEMS[d]: d for d in ("SCT", "LN", "DCM", "UCUM")} | {
    "http://radlex.org": "RADLEX",
    "http://www.radlex.org": "RADLEX",
    "http://ncimeta.nci.nih.gov": "NCIt",
    "http://hl7.org/fhir/sid/icd-10": "I10",
    "http://hl7.org/fhir/sid/icd-10-cm": "I10C",
}

#: the identifier system of DICOM UIDs (values ``urn:oid:<uid>``)
DICOM_UID: Final = "urn:dicom:uid"
#: HL7 v2-0203 identifier types; ``ACSN`` is an accession number
V2_0203: Final = "http://terminology.hl7.org/CodeSystem/v2-0203"
ACSN: Final = "ACSN"


def oid(uid: str) -> str:
    """A DICOM UID as a URI: ``urn:oid:<uid>``."""
    return f"urn:oid:{uid}"


def uid_of(value: str) -> str:
    """The DICOM UID of an identifier value in :data:`DICOM_UID` (``urn:oid:`` dropped)."""
    return value.removeprefix("urn:oid:")


def study_identifier(uid: str) -> str:
    """The search token of the study with Study Instance UID ``uid``: ``system|value``."""
    return f"{DICOM_UID}|{oid(uid)}"


def is_accession(identifier: Mapping[str, Any]) -> bool:
    """True when ``identifier`` (a FHIR Identifier as JSON) is typed ``ACSN``."""
    typ = identifier.get("type") or {}
    if not isinstance(typ, Mapping):
        return False
    return any(isinstance(c, Mapping) and c.get("code") == ACSN for c in (typ.get("coding") or []))
