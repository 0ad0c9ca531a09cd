"""Radiology context from the EHR into the research tables ``orders`` and ``reports`` (issue #25).

:func:`import_context` reads a FHIR Bulk Data export folder (:mod:`pipeline.fhir.ndjson`) and,
for each ``ServiceRequest`` (the order: the reason for the exam) and ``DiagnosticReport`` (the
radiology report) that belongs to a crawled study, writes one de-identified row:

1. **Validation.** Every line is parsed and validated with ``fhir.resources`` (R4B models). A
   line that is not JSON, not a known resource, not valid, or without an id becomes a row of
   the restricted quarantine table (stage ``fhir``, reason ``unreadable`` or ``invalid``,
   location ``<file>:<line>``, a message naming the failing elements, never their values)
   and the import goes on.
2. **Matching, in the restricted zone.** A resource belongs to a study through an accession
   number: its own identifier of type ``ACSN`` (HL7 v2-0203), or that of the ServiceRequest
   it is ``basedOn``, or of an ``ImagingStudy`` it references or that references it (whose
   ``urn:dicom:uid`` identifier, the Study Instance UID, matches too). The vault (the way back
   from pseudonyms to originals, decrypted with the lake's key where it is encrypted) maps the
   original accession number and Study Instance UID to the study's pseudonym, the patient's
   token and the patient's date offset. A resource matching no study is counted
   (``unmatched``), one matching several (an accession number reused) too (``ambiguous``);
   neither reaches a table.
3. **De-identification** as the DICOM headers' (:mod:`pipeline.fhir.deid`): coded fields
   kept, free text by the profile's rule for the DICOM attribute of the same meaning, dates
   shifted by the patient's offset, identifiers replaced by the keyed pseudonyms.
4. **Commit**, in batches, one Delta transaction per table and batch, by resource key: a
   resource already held is replaced only by a newer version (``meta.versionId``, then
   ``meta.lastUpdated``, then the status's progress: a preliminary report is superseded by
   the final one); the same export imported again adds nothing.

Nothing identifying is logged: counts, file names and line numbers only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as ds

from pipeline.enums import QuarantineReason, Stage
from pipeline.errors import InputError
from pipeline.fhir.deid import DeidRules, codings, resource_key, shift_datetime, text
from pipeline.fhir.ndjson import NdjsonLine, export_files, read_lines
from pipeline.fhir.systems import DICOM_UID, is_accession, uid_of
from pipeline.lake.io import commit_rows, read_table, write_partition
from pipeline.lake.keys import Pseudonymizer
from pipeline.lake.paths import LakePaths

if TYPE_CHECKING:
    from pipeline.fhir.client import FhirClient

logger = logging.getLogger(__name__)

__all__ = [
    "ContextResult",
    "StudyLink",
    "import_context",
    "import_from_server",
    "study_links",
]

#: how far each status has come (a later status supersedes an earlier one of one version)
_STATUS_RANK: dict[str, int] = {
    # DiagnosticReport
    "registered": 0,
    "partial": 1,
    "preliminary": 2,
    "final": 3,
    "amended": 4,
    "corrected": 4,
    "appended": 4,
    "cancelled": 5,
    "entered-in-error": 6,
    # ServiceRequest
    "draft": 0,
    "active": 1,
    "on-hold": 1,
    "completed": 3,
    "revoked": 5,
}
_TABLES = {"ServiceRequest": ("orders", "order_key"), "DiagnosticReport": ("reports", "report_key")}
_UTC_MIN = dt.datetime.min.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class StudyLink:
    """A crawled study as the research zone knows it (no original value in it)."""

    study: str  #: Study Instance UID pseudonym
    patient_token: str
    days: int  #: the patient's date offset


@dataclass
class ContextResult:
    """What one import did, in counts (no values)."""

    lines: int = 0
    orders: int = 0  #: rows added to ``orders``
    reports: int = 0  #: rows added to ``reports``
    superseded: int = 0  #: rows replaced by a newer version of their resource
    unchanged: int = 0  #: resources held already in this version
    stale: int = 0  #: resources older than the version held
    unmatched: int = 0
    ambiguous: int = 0
    quarantined: int = 0
    other: int = 0  #: valid resources of other types (Patient, ImagingStudy, ...)
    versions: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"fhir import: {self.lines} resources: orders +{self.orders}, reports "
            f"+{self.reports}, superseded {self.superseded}, unchanged {self.unchanged}, "
            f"stale {self.stale}, unmatched {self.unmatched}, ambiguous {self.ambiguous}, "
            f"quarantined {self.quarantined}, other {self.other}"
        )

    def counts(self) -> dict[str, int]:
        """The counts as a mapping (for the audit record)."""
        return {
            k: v for k, v in self.__dict__.items() if isinstance(v, int) and not isinstance(v, bool)
        }


# ------------------------------------------------------------------------------- the vault


def study_links(
    lake: LakePaths, pseudo: Pseudonymizer
) -> tuple[dict[str, list[StudyLink]], dict[str, StudyLink]]:
    """(original accession number -> its studies, original Study Instance UID -> study), from
    the vault (decrypted with ``lake.keys`` where encrypted). Held in memory: one entry per
    study, never written anywhere."""
    vault = read_table(
        lake,
        "vault",
        columns=[
            "AccessionNumber",
            "PatientID",
            "StudyInstanceUID",
            "study_pseudonym",
            "patient_token",
        ],
    )
    distinct = vault.group_by(vault.column_names, use_threads=False).aggregate([])
    by_accession: dict[str, dict[str, StudyLink]] = {}
    by_uid: dict[str, StudyLink] = {}
    days: dict[str, int] = {}
    for row in distinct.to_pylist():
        patient = row["PatientID"] or ""
        if patient not in days:
            days[patient] = pseudo.date_offset_days(patient)
        link = StudyLink(row["study_pseudonym"], row["patient_token"], days[patient])
        by_uid[row["StudyInstanceUID"]] = link
        accession = (row["AccessionNumber"] or "").strip()
        if accession:
            by_accession.setdefault(accession, {})[link.study] = link
    return {a: list(v.values()) for a, v in by_accession.items()}, by_uid


# ------------------------------------------------------------------------------- references


def _identifiers(resource: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """(accession numbers, Study Instance UIDs) among ``resource``'s identifiers."""
    accessions: set[str] = set()
    uids: set[str] = set()
    for ident in resource.get("identifier") or []:
        if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
            continue
        value = ident["value"].strip()
        if is_accession(ident):
            accessions.add(value)
        elif ident.get("system") == DICOM_UID:
            uids.add(uid_of(value))
    return accessions, uids


def _refs(resource: Mapping[str, Any], element: str, kind: str) -> list[str]:
    """The ids of the ``kind`` resources that ``element`` (a Reference or a list) points to
    (relative, absolute or versioned references)."""
    value = resource.get(element)
    items = value if isinstance(value, list) else [value] if value else []
    out = []
    for ref in items:
        reference = ref.get("reference") if isinstance(ref, dict) else None
        if not isinstance(reference, str):
            continue
        parts = reference.split("/")
        for i, part in enumerate(parts[:-1]):
            if part == kind:
                out.append(parts[i + 1])
                break
    return out


def _logical_accessions(resource: Mapping[str, Any], element: str) -> set[str]:
    """Accession numbers of references by identifier (``basedOn: [{identifier: ...}]``)."""
    value = resource.get(element)
    items = value if isinstance(value, list) else [value] if value else []
    return {
        ref["identifier"]["value"].strip()
        for ref in items
        if isinstance(ref, dict)
        and isinstance(ref.get("identifier"), dict)
        and isinstance(ref["identifier"].get("value"), str)
        and is_accession(ref["identifier"])
    }


@dataclass
class _Bridges:
    """What links a resource to a study, gathered in a first pass over the export."""

    orders: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)
    studies: dict[str, tuple[set[str], set[str]]] = field(default_factory=dict)
    #: ServiceRequest id -> ImagingStudy ids based on it
    studies_of_order: dict[str, set[str]] = field(default_factory=dict)

    def add(self, resource: Mapping[str, Any]) -> None:
        kind, rid = resource.get("resourceType"), resource.get("id")
        if not isinstance(rid, str):
            return
        if kind == "ServiceRequest":
            accessions, uids = _identifiers(resource)
            self.orders[rid] = (accessions, uids)
        elif kind == "ImagingStudy":
            accessions, uids = _identifiers(resource)
            accessions |= _logical_accessions(resource, "basedOn")
            self.studies[rid] = (accessions, uids)
            for order in _refs(resource, "basedOn", "ServiceRequest"):
                self.studies_of_order.setdefault(order, set()).add(rid)

    def keys_of(self, resource: Mapping[str, Any]) -> tuple[set[str], set[str], list[str]]:
        """The accession numbers and Study Instance UIDs ``resource`` belongs to, and the ids
        of the ServiceRequests it is based on that this export does not hold (an incremental
        export: the order came in an earlier one)."""
        accessions, uids = _identifiers(resource)
        orders = []
        studies = list(_refs(resource, "imagingStudy", "ImagingStudy"))
        if resource.get("resourceType") == "ServiceRequest":
            orders.append(str(resource.get("id")))
        else:
            orders += _refs(resource, "basedOn", "ServiceRequest")
            accessions |= _logical_accessions(resource, "basedOn")
        elsewhere = [o for o in orders if o not in self.orders]
        for order in orders:
            a, u = self.orders.get(order, (set(), set()))
            accessions |= a
            uids |= u
            studies += self.studies_of_order.get(order, set())
        for study in studies:
            a, u = self.studies.get(study, (set(), set()))
            accessions |= a
            uids |= u
        return accessions, uids, elsewhere


# ------------------------------------------------------------------------------- rows


#: the values of the coded elements copied as they are (R4 value sets); any other value, which a
#: lenient EHR may fill with free text, is stored as null
_VALUES: dict[str, frozenset[str]] = {
    "ServiceRequest.status": frozenset(
        {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
    ),
    "ServiceRequest.intent": frozenset(
        {
            "proposal",
            "plan",
            "directive",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        }
    ),
    "ServiceRequest.priority": frozenset({"routine", "urgent", "asap", "stat"}),
    "DiagnosticReport.status": frozenset(
        {
            "registered",
            "partial",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "appended",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
}
#: resource types a requester or performer reference may name (the only part of it copied)
_AGENTS = frozenset(
    {
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "CareTeam",
        "Patient",
        "RelatedPerson",
        "Device",
        "HealthcareService",
    }
)


def _coded(element: str, value: Any) -> str | None:
    """``value`` where it is one of the element's value set, else None."""
    return value if isinstance(value, str) and value in _VALUES[element] else None


def _kind(reference: Any) -> str | None:
    """The resource type a requester or performer Reference points to (never its id nor its
    display): one of :data:`_AGENTS`, else None."""
    if reference is None:
        return None
    kind = reference.type
    if not kind and reference.reference:
        path = str(reference.reference).split("/_history/")[0]
        parts = [p for p in path.split("/") if p]
        kind = parts[-2] if len(parts) >= 2 else None
    kind = str(kind).rsplit("/", 1)[-1] if kind else None  # type may be a StructureDefinition URL
    return kind if kind in _AGENTS else None


def _version(resource: Any) -> tuple[str | None, Any]:
    meta = resource.meta
    return (meta.versionId if meta else None), (meta.lastUpdated if meta else None)


def _codes(items: list[dict[str, str | None]]) -> list[str]:
    return [str(c["code"]) for c in items]


def _order_row(sr: Any, link: StudyLink, ctx: _Context) -> dict[str, Any]:
    version_id, last_updated = _version(sr)
    code = codings(sr.code, ctx.rules)
    reason = codings(sr.reasonCode, ctx.rules)
    reason_text = "; ".join(
        t
        for c in sr.reasonCode or []
        if (t := text(c.text, ctx.rules, "ServiceRequest.reasonCode.text"))
    )
    note = "; ".join(
        t for n in sr.note or [] if (t := text(n.text, ctx.rules, "ServiceRequest.note"))
    )
    occurrence = sr.occurrenceDateTime or (
        sr.occurrencePeriod.start if sr.occurrencePeriod else None
    )
    return {
        "order_key": resource_key(ctx.pseudo, "ServiceRequest", sr.id),
        "version_id": version_id,
        "last_updated": shift_datetime(last_updated, link.days, ctx.rules, "meta.lastUpdated"),
        "StudyInstanceUID": link.study,
        "patient_token": link.patient_token,
        "accession_token": ctx.accession_token(link),
        "status": _coded("ServiceRequest.status", sr.status),
        "intent": _coded("ServiceRequest.intent", sr.intent),
        "priority": _coded("ServiceRequest.priority", sr.priority),
        "category": codings(sr.category, ctx.rules),
        "code": code,
        "code_codes": _codes(code),
        "reason_code": reason,
        "reason_codes": _codes(reason),
        "reason_text": reason_text or None,
        "body_site": codings(sr.bodySite, ctx.rules),
        "note": note or None,
        "requester_kind": _kind(sr.requester),
        "authored_on": shift_datetime(
            sr.authoredOn, link.days, ctx.rules, "ServiceRequest.authoredOn"
        ),
        "occurrence": shift_datetime(occurrence, link.days, ctx.rules, "ServiceRequest.occurrence"),
        "run_id": ctx.run_id,
        "imported_at": ctx.now,
    }


def _report_row(dr: Any, data: Mapping[str, Any], link: StudyLink, ctx: _Context) -> dict[str, Any]:
    version_id, last_updated = _version(dr)
    code = codings(dr.code, ctx.rules)
    conclusion_code = codings(dr.conclusionCode, ctx.rules)
    orders = _refs(data, "basedOn", "ServiceRequest")
    effective = dr.effectiveDateTime or (dr.effectivePeriod.start if dr.effectivePeriod else None)
    return {
        "report_key": resource_key(ctx.pseudo, "DiagnosticReport", dr.id),
        "version_id": version_id,
        "last_updated": shift_datetime(last_updated, link.days, ctx.rules, "meta.lastUpdated"),
        "StudyInstanceUID": link.study,
        "patient_token": link.patient_token,
        "accession_token": ctx.accession_token(link),
        "order_key": resource_key(ctx.pseudo, "ServiceRequest", orders[0]) if orders else None,
        "status": _coded("DiagnosticReport.status", dr.status),
        "category": codings(dr.category, ctx.rules),
        "code": code,
        "code_codes": _codes(code),
        "conclusion": text(dr.conclusion, ctx.rules, "DiagnosticReport.conclusion"),
        "conclusion_code": conclusion_code,
        "conclusion_codes": _codes(conclusion_code),
        "performer_kind": [k for p in dr.performer or [] if (k := _kind(p))],
        "n_results": len(dr.result or []),
        "has_presented_form": bool(dr.presentedForm),
        "effective": shift_datetime(effective, link.days, ctx.rules, "DiagnosticReport.effective"),
        "issued": shift_datetime(dr.issued, link.days, ctx.rules, "DiagnosticReport.issued"),
        "run_id": ctx.run_id,
        "imported_at": ctx.now,
    }


def _rank(row: Mapping[str, Any]) -> tuple[int, dt.datetime, int]:
    """The order of versions of one resource: versionId (when a number), lastUpdated, status."""
    version = str(row.get("version_id") or "")
    updated = row.get("last_updated")
    if isinstance(updated, dt.datetime) and updated.tzinfo is None:
        updated = updated.replace(tzinfo=dt.UTC)
    return (
        int(version) if version.isdigit() else -1,
        updated if isinstance(updated, dt.datetime) else _UTC_MIN,
        _STATUS_RANK.get(str(row.get("status") or ""), -1),
    )


# ------------------------------------------------------------------------------- the import


@dataclass
class _Context:
    lake: LakePaths
    pseudo: Pseudonymizer
    rules: DeidRules
    run_id: str
    now: dt.datetime
    accessions_of: dict[str, str] = field(default_factory=dict)

    def accession_token(self, link: StudyLink) -> str | None:
        return self.accessions_of.get(link.study)


def _invalid_message(kind: str, exc: Exception) -> str:
    """The failing elements and error types of a validation error, never the values."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            items = errors(include_input=False, include_url=False, include_context=False)
        except TypeError:
            items = errors()
        where = ", ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())) or kind} ({e.get('type', 'invalid')})"
            for e in items[:5]
        )
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        return f"not a valid FHIR R4B {kind}: {where}{more}"
    return f"not a valid FHIR R4B {kind} ({type(exc).__name__})"


def _parse(line: NdjsonLine) -> tuple[dict[str, Any], Any]:
    """(the JSON object, the validated ``fhir.resources`` model) of one line.

    Raises
    ------
    InputError
        Not JSON (``unreadable``), or not a valid resource (``invalid``).
    """
    from fhir.resources.R4B import get_fhir_model_class

    try:
        data = json.loads(line.text)
    except ValueError as exc:
        raise InputError(
            f"{line.location}: not JSON ({type(exc).__name__} at column "
            f"{getattr(exc, 'colno', '?')})",
            reason=QuarantineReason.UNREADABLE,
        ) from None
    kind = data.get("resourceType") if isinstance(data, dict) else None
    if not isinstance(kind, str):
        raise InputError(f"{line.location}: a JSON value without a resourceType")
    try:
        model_class = get_fhir_model_class(kind)
    except (KeyError, ValueError, AttributeError, ImportError):
        raise InputError(f"{line.location}: not a FHIR R4B resource type") from None
    try:
        model: Any = model_class.model_validate(data)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise InputError(f"{line.location}: {_invalid_message(kind, exc)}") from None
    if kind in _TABLES and not getattr(model, "id", None):
        raise InputError(f"{line.location}: a {kind} without an id")
    return data, model


class _HeldOrders:
    """The studies of the orders ``orders`` holds (from earlier imports), read on first use."""

    def __init__(
        self,
        lake: LakePaths,
        pseudo: Pseudonymizer,
        by_uid: Mapping[str, StudyLink],
        writer: _Writer,
    ) -> None:
        self.lake, self.pseudo, self.writer = lake, pseudo, writer
        self.links = {link.study: link for link in by_uid.values()}
        self.study_of: dict[str, str] | None = None

    def studies_of(self, order_ids: list[str]) -> dict[str, StudyLink]:
        """The studies of the ServiceRequests ``order_ids`` held (or pending in this import)."""
        if self.study_of is None:
            held = read_table(self.lake, "orders", columns=["order_key", "StudyInstanceUID"])
            self.study_of = dict(
                zip(
                    held.column("order_key").to_pylist(),
                    held.column("StudyInstanceUID").to_pylist(),
                    strict=True,
                )
            )
        found: dict[str, StudyLink] = {}
        for order in order_ids:
            key = resource_key(self.pseudo, "ServiceRequest", order)
            pending = self.writer.pending["orders"].get(key)
            study = pending["StudyInstanceUID"] if pending else self.study_of.get(key)
            link = self.links.get(study) if study else None
            if link is not None:
                found[link.study] = link
        return found


class _Writer:
    """Batches of rows per table, committed newest-version-wins."""

    def __init__(self, lake: LakePaths, result: ContextResult, batch_size: int) -> None:
        self.lake, self.result, self.batch_size = lake, result, batch_size
        self.pending: dict[str, dict[str, dict[str, Any]]] = {"orders": {}, "reports": {}}

    def add(self, table: str, key: str, row: dict[str, Any]) -> None:
        pending = self.pending[table]
        held = pending.get(row[key])
        if held is not None:
            if _rank(row) > _rank(held):
                pending[row[key]] = row
            elif _rank(row) == _rank(held):
                self.result.unchanged += 1
            else:
                self.result.stale += 1
            return
        pending[row[key]] = row
        if len(pending) >= self.batch_size:
            self.flush(table, key)

    def flush(self, table: str, key: str) -> None:
        rows = list(self.pending[table].values())
        self.pending[table] = {}
        if not rows:
            return
        held_rows = read_table(
            self.lake,
            table,
            columns=[key, "version_id", "last_updated", "status"],
            filter=ds.field(key).isin(pa.array([r[key] for r in rows], pa.string())),
        ).to_pylist()
        held = {r[key]: _rank(r) for r in held_rows}
        fresh = []
        for row in rows:
            before = held.get(row[key])
            if before is None or _rank(row) > before:
                fresh.append(row)
            elif _rank(row) == before:
                self.result.unchanged += 1
            else:
                self.result.stale += 1
        if not fresh:
            return
        done = commit_rows(self.lake, table, fresh)
        self.result.versions[table] = done.version
        self.result.superseded += done.replaced
        if table == "orders":
            self.result.orders += done.added
        else:
            self.result.reports += done.added

    def close(self) -> None:
        for table, key in _TABLES.values():
            self.flush(table, key)


def import_context(
    lake: LakePaths,
    folder: Path,
    *,
    pseudonymizer: Pseudonymizer,
    rules: DeidRules,
    run_id: str,
    batch_size: int = 5000,
    on_invalid: str = "quarantine",
    progress: Callable[[int], None] | None = None,
) -> ContextResult:
    """Import the ServiceRequests and DiagnosticReports of the Bulk Data export in ``folder``
    into ``orders`` and ``reports`` (see the module docstring).

    Parameters
    ----------
    lake
        The lake, carrying its keys where the vault or the restricted zone is encrypted.
    folder
        The export: NDJSON files and, where the EHR wrote one, the manifest.
    pseudonymizer
        The lake's keyed pseudonyms (:meth:`pipeline.lake.keys.LakeKeys.pseudonymizer`).
    rules
        The de-identification engine's decisions (:class:`pipeline.deid.rules.ProfileRules`
        of the configuration's ``deid`` section).
    run_id
        Recorded in every row and quarantine row.
    batch_size
        Resources per commit of each table.
    on_invalid
        ``quarantine``: a bad line becomes a quarantine row; ``raise``: the import stops at it.
    progress
        Called with the number of lines read since its last call.

    Returns
    -------
    ContextResult
        The counts.

    Raises
    ------
    ConfigError
        ``folder`` holds no export, or its manifest lists a file it lacks.
    InputError
        A bad line, with ``on_invalid="raise"``.
    """
    folder = Path(folder)
    files = export_files(folder)
    run = _Run.start(lake, pseudonymizer, rules, run_id, batch_size, on_invalid, progress)
    run.read(lambda: read_lines(folder, files), f"fhir:{folder.absolute()}")
    return run.finish()


def import_from_server(
    lake: LakePaths,
    client: FhirClient,
    *,
    pseudonymizer: Pseudonymizer,
    rules: DeidRules,
    run_id: str,
    studies_per_batch: int = 200,
    batch_size: int = 5000,
    on_invalid: str = "quarantine",
    progress: Callable[[int], None] | None = None,
) -> ContextResult:
    """Search the FHIR server of ``client`` for the orders and reports of every crawled study
    (:func:`pipeline.fhir.search.study_resources`) and import them as :func:`import_context`
    imports an export, ``studies_per_batch`` studies at a time (their resources in memory).

    Raises
    ------
    FhirError
        The server unreachable, refusing the token, or answering with an error.
    InputError
        A bad resource, with ``on_invalid="raise"``.
    """
    from pipeline.fhir.search import study_resources

    run = _Run.start(lake, pseudonymizer, rules, run_id, batch_size, on_invalid, progress)
    keys: dict[str, tuple[set[str], set[str]]] = {}
    for accession, links in run.by_accession.items():
        for link in links:
            keys.setdefault(link.study, (set(), set()))[0].add(accession)
    for uid, link in run.by_uid.items():
        keys.setdefault(link.study, (set(), set()))[1].add(uid)
    studies = [keys[s] for s in sorted(keys)]
    for first in range(0, len(studies), studies_per_batch):
        lines = study_resources(client, studies[first : first + studies_per_batch])
        run.read(lines.__iter__, f"fhir:{client.base}")  # a fresh iterator per pass
    return run.finish()


@dataclass
class _Run:
    """One import: the vault's links, the writer, the counts; :meth:`read` takes one set of
    resources (an export, or a batch of search results) at a time."""

    ctx: _Context
    by_accession: dict[str, list[StudyLink]]
    by_uid: dict[str, StudyLink]
    result: ContextResult
    writer: _Writer
    held: _HeldOrders
    on_invalid: str
    progress: Callable[[int], None] | None
    parts: int = 0

    @classmethod
    def start(
        cls,
        lake: LakePaths,
        pseudo: Pseudonymizer,
        rules: DeidRules,
        run_id: str,
        batch_size: int,
        on_invalid: str,
        progress: Callable[[int], None] | None,
    ) -> _Run:
        if on_invalid not in ("quarantine", "raise"):
            raise ValueError(f"on_invalid is quarantine or raise, not {on_invalid!r}")
        by_accession, by_uid = study_links(lake, pseudo)
        ctx = _Context(lake, pseudo, rules, run_id, dt.datetime.now(dt.UTC))
        for accession, links in by_accession.items():
            for link in links:
                ctx.accessions_of[link.study] = pseudo.token(accession, domain="accession")
        result = ContextResult()
        writer = _Writer(lake, result, batch_size)
        held = _HeldOrders(lake, pseudo, by_uid, writer)
        return cls(ctx, by_accession, by_uid, result, writer, held, on_invalid, progress)

    def read(self, lines: Callable[[], Iterable[NdjsonLine]], source: str) -> None:
        """Import the resources ``lines()`` yields (called twice: the links first), naming
        quarantined lines under ``source``."""
        ctx, result = self.ctx, self.result
        bridges = _Bridges()
        for line in lines():
            try:
                data = json.loads(line.text)
            except ValueError:
                continue  # quarantined in the second pass
            if isinstance(data, dict):
                bridges.add(data)
        quarantine: list[dict[str, Any]] = []
        for line in lines():
            result.lines += 1
            if self.progress is not None:
                self.progress(1)
            try:
                data, model = _parse(line)
            except InputError as exc:
                if self.on_invalid == "raise":
                    raise
                quarantine.append(_quarantine_row(source, line, exc, ctx.run_id, ctx.now))
                result.quarantined += 1
                logger.debug("quarantined %s (%s)", line.location, exc.reason)
                continue
            kind = data["resourceType"]
            if kind not in _TABLES:
                result.other += 1
                continue
            link = self._match(data, bridges, line)
            if link is None:
                continue
            table, key = _TABLES[kind]
            row = (
                _order_row(model, link, ctx)
                if kind == "ServiceRequest"
                else _report_row(model, data, link, ctx)
            )
            self.writer.add(table, key, row)
        self.writer.close()
        self.held.study_of = None  # orders committed since: read again when next needed
        quarantine = _not_yet_quarantined(ctx.lake, quarantine)
        if quarantine:
            self.parts += 1
            write_partition(
                ctx.lake, "quarantine", quarantine, part=f"fhir-{ctx.run_id}-{self.parts}"
            )

    def _match(
        self, data: Mapping[str, Any], bridges: _Bridges, line: NdjsonLine
    ) -> StudyLink | None:
        """The one study ``data`` belongs to, or None (counted unmatched or ambiguous)."""
        accessions, uids, elsewhere = bridges.keys_of(data)
        found = {link.study: link for a in accessions for link in self.by_accession.get(a, [])}
        found.update({self.by_uid[u].study: self.by_uid[u] for u in uids if u in self.by_uid})
        if not found and elsewhere:
            found = self.held.studies_of(elsewhere)
        if not found:
            self.result.unmatched += 1
            return None
        if len(found) > 1:
            self.result.ambiguous += 1
            logger.debug("%s matches %d studies: left out", line.location, len(found))
            return None
        return next(iter(found.values()))

    def finish(self) -> ContextResult:
        """The counts, logged."""
        logger.info("%s", self.result.summary())
        return self.result


def _not_yet_quarantined(lake: LakePaths, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` less the lines an earlier import quarantined with the same reason (the same
    export imported again adds no quarantine row either)."""
    if not rows:
        return rows
    held = read_table(
        lake,
        "quarantine",
        columns=["object_key", "reason", "stage"],
        filter=ds.field("object_key").isin(pa.array([r["object_key"] for r in rows])),
    ).to_pylist()
    seen = {(r["object_key"], r["reason"]) for r in held if r["stage"] == Stage.FHIR.value}
    return [r for r in rows if (r["object_key"], r["reason"]) not in seen]


def _quarantine_row(
    source: str, line: NdjsonLine, exc: InputError, run_id: str, now: dt.datetime
) -> dict[str, Any]:
    key = hashlib.sha256(f"{source}\x00{line.location}".encode()).hexdigest()
    return {
        "object_key": key,
        "source": source,
        "location": line.location,
        "unit_key": line.name,
        "stage": Stage.FHIR.value,
        "reason": exc.reason.value,
        "error_class": type(exc).__name__,
        "message": str(exc),
        "size_bytes": len(line.text.encode()),
        "mtime_ns": line.file.mtime_ns,
        "run_id": run_id,
        "quarantined_at": now,
    }
