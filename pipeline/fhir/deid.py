"""De-identify the values of a FHIR resource as the DICOM headers are (issue #25).

Each element is treated as the DICOM attribute that holds the same kind of value
(:data:`COUNTERPARTS`); the configured profile's action for that attribute decides
(:class:`DeidRules`, built by the caller from :mod:`pipeline.deid.rules`: stages do not
import each other):

- dates and date-times: ``K`` keeps them, ``C`` and ``D`` shift them by the patient's keyed
  offset (:meth:`pipeline.lake.keys.Pseudonymizer.date_offset_days` of the original Patient
  ID, the offset of every DICOM date of that patient), anything else removes them; a partial
  date (``2024``, ``2024-03``) cannot be shifted by days and is removed;
- free text (``conclusion``, ``reasonCode.text``, ``note``): kept only where the action is
  ``K``; pacsflow's cleaning (``C``) of text is removal, as no cleaner can prove text free of
  identity, so with the shipped profiles free text never reaches the research zone;
- codes (``Coding``): system and code kept, ``display`` as a DICOM Code Meaning (the
  canonical meaning of a known code; else null unless ``deid.keep_code_meanings`` names the
  scheme); the FHIR system URI is mapped to its DICOM Coding Scheme Designator
  (:data:`pipeline.fhir.systems.SCHEMES`) for that decision;
- identifiers: never copied; the study, patient and accession become the keyed pseudonyms
  the DICOM headers got, the resource ids keyed tokens (:func:`resource_key`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

from pipeline.fhir.systems import SCHEMES
from pipeline.lake.keys import Pseudonymizer

__all__ = [
    "COUNTERPARTS",
    "DeidRules",
    "codings",
    "resource_key",
    "shift_datetime",
    "text",
]

#: FHIR element -> the DICOM attribute (tag) whose profile action it follows
COUNTERPARTS: dict[str, int] = {
    "ServiceRequest.authoredOn": 0x00402004,  # Issue Date of Imaging Service Request
    "ServiceRequest.occurrence": 0x00400002,  # Scheduled Procedure Step Start Date
    "ServiceRequest.reasonCode.text": 0x00401002,  # Reason for the Requested Procedure
    "ServiceRequest.code.text": 0x00321060,  # Requested Procedure Description
    "ServiceRequest.note": 0x00401400,  # Requested Procedure Comments
    "DiagnosticReport.effective": 0x00080020,  # Study Date
    "DiagnosticReport.issued": 0x00080023,  # Content Date
    "DiagnosticReport.conclusion": 0x40080300,  # Impressions
    "DiagnosticReport.code.text": 0x00081030,  # Study Description
    "meta.lastUpdated": 0x00080023,  # Content Date
}

_TIME_KEPT = frozenset({"K"})
_SHIFTED = frozenset({"C", "D"})


class DeidRules(Protocol):
    """The de-identification engine's decisions (:class:`pipeline.deid.rules.ProfileRules`)."""

    def action(self, tag: int) -> str:
        """The profile's action code for DICOM attribute ``tag``."""
        ...

    def code_meaning(self, scheme: str, value: str, meaning: str) -> str | None:
        """What a Code Meaning becomes (None: a dummy)."""
        ...


def resource_key(pseudo: Pseudonymizer, resource_type: str, resource_id: str) -> str:
    """The keyed pseudonym of ``<resource_type>/<id>`` (26 base32 characters, 130 bits): the
    same resource always gets the same key, and the EHR's id never reaches the research zone.

    Examples
    --------
    >>> p = Pseudonymizer(b"k" * 32)
    >>> resource_key(p, "ServiceRequest", "sr-1") == resource_key(p, "ServiceRequest", "sr-1")
    True
    >>> len(resource_key(p, "ServiceRequest", "sr-1"))
    26
    """
    return pseudo.token(f"{resource_type}/{resource_id}", domain="fhir-resource", length=26)


def shift_datetime(value: Any, days: int, rules: DeidRules, element: str) -> dt.datetime | None:
    """``value`` (a FHIR date, dateTime or instant as ``fhir.resources`` parses it) as a UTC
    timestamp, shifted by ``days`` or kept or removed as the profile treats the DICOM
    counterpart of ``element``. A date becomes midnight UTC; a partial date (a string) None.
    """
    if value is None:
        return None
    action = rules.action(COUNTERPARTS[element])
    if action not in _TIME_KEPT and action not in _SHIFTED:
        return None
    if isinstance(value, dt.datetime):
        when = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    elif isinstance(value, dt.date):
        when = dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    else:
        return None  # "2024" or "2024-03": no day to shift
    if action in _SHIFTED:
        when = when + dt.timedelta(days=days)
    return when.astimezone(dt.UTC)


def text(value: str | None, rules: DeidRules, element: str) -> str | None:
    """Free text ``value`` of ``element``: kept where the profile keeps its DICOM counterpart
    (``K``), else None."""
    if not value:
        return None
    return value if rules.action(COUNTERPARTS[element]) == "K" else None


def codings(concepts: Any, rules: DeidRules) -> list[dict[str, str | None]]:
    """The codings of one CodeableConcept or a list of them, de-identified: ``system`` and
    ``code`` as they are, ``display`` by the Code Meaning rule. Codings without a code are
    left out (a display alone is free text)."""
    if concepts is None:
        return []
    items = concepts if isinstance(concepts, list) else [concepts]
    out: list[dict[str, str | None]] = []
    for concept in items:
        for coding in getattr(concept, "coding", None) or []:
            code = (coding.code or "").strip()
            if not code:
                continue
            system = coding.system or None
            display = None
            if coding.display:
                scheme = SCHEMES.get(system or "", system or "")
                display = rules.code_meaning(scheme, code, coding.display.strip())
            out.append({"system": system, "code": code, "display": display})
    return out
