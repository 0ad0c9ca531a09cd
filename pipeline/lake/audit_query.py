"""Who viewed or changed what, for one pseudonymous patient, study or series, and when.

:func:`audit_rows` selects audit records about a subject and flattens them into table rows for
``pacsflow audit``. A record is about the subject when

- one of its details names the subject: the patient token, one of the patient's study or series
  pseudonyms, or a finding or tensor key of one of those series (review views, decisions,
  viewer links, slice images);
- or it is a run-level record (a stage that read the restricted zone, a re-identification, a
  run's start and end) of a run that wrote rows about the subject: the vault's rows (deid), the
  findings' rows (infer), the outbox's rows (write-back).

The subject's pseudonyms are read from the research tables and the vault's pseudonym columns
only: no identifying value is read or shown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.lake.duck import connect
from pipeline.lake.paths import LakePaths
from pipeline.lake.queries import run_ids_about, subject_series

__all__ = ["AuditRow", "Subject", "audit_rows", "resolve_subject"]


@dataclass(frozen=True)
class Subject:
    """The pseudonyms that stand for one patient, study or series, and the runs about them."""

    patient_tokens: frozenset[str] = field(default_factory=frozenset)
    studies: frozenset[str] = field(default_factory=frozenset)
    series: frozenset[str] = field(default_factory=frozenset)
    runs: frozenset[str] = field(default_factory=frozenset)

    def names(self, value: object) -> bool:
        """True when ``value`` is one of the pseudonyms, or a key under one of the series."""
        if not isinstance(value, str):
            return False
        if value in self.patient_tokens or value in self.studies or value in self.series:
            return True
        head = value.split("/", 1)[0]
        return head in self.series


def _exists(lake: LakePaths, name: str) -> bool:
    return any(lake.table(name).rglob("*.parquet"))


def _column(con: Any, sql: str, params: Mapping[str, Any] | None) -> set[str]:
    return {r[0] for r in con.execute(sql, params).fetchall() if r[0] is not None}


def resolve_subject(
    lake: LakePaths,
    *,
    patient: str | None = None,
    study: str | None = None,
    series: str | None = None,
) -> Subject:
    """The subject's pseudonyms (from research ``series``) and the runs that wrote about it."""
    con = connect()
    try:
        patients: set[str] = set()
        studies: set[str] = set()
        series_set: set[str] = set()
        if _exists(lake, "series"):
            q = subject_series(lake, patient=patient, study=study, series=series)
            rows = con.execute(q.sql, q.params).fetchall()
            for p, st, se in rows:
                patients.add(p)
                studies.add(st)
                series_set.add(se)
        patients.update(v for v in (patient,) if v)
        studies.update(v for v in (study,) if v)
        series_set.update(v for v in (series,) if v)
        if patient is None:  # a study or series: not every record of the patient
            patients.clear()
        if series is not None:
            studies.clear()
        runs: set[str] = set()
        if series_set:
            for table in ("vault", "findings", "outbox"):
                if _exists(lake, table):
                    q = run_ids_about(lake, table, sorted(series_set))
                    runs |= _column(con, q.sql, q.params)
        return Subject(
            frozenset(patients), frozenset(studies), frozenset(series_set), frozenset(runs)
        )
    finally:
        con.close()


def _values(details: Mapping[str, Any]) -> Iterable[object]:
    for value in details.values():
        if isinstance(value, Mapping):
            yield from _values(value)
        elif isinstance(value, list | tuple):
            yield from value
        else:
            yield value


@dataclass(frozen=True)
class AuditRow:
    """One line of ``pacsflow audit``."""

    seq: int
    time: str
    user: str
    where: str
    event: str
    run_id: str
    what: str


def _what(details: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(details.items()) if not isinstance(v, dict))


def audit_rows(
    records: Iterable[Mapping[str, Any]],
    subject: Subject | None = None,
    *,
    user: str | None = None,
    event: str | None = None,
    since: str | None = None,
) -> list[AuditRow]:
    """The records about ``subject`` (all when None), by ``user``/``event``, at or after
    ``since`` (an ISO date or time), as rows oldest first."""
    out: list[AuditRow] = []
    for r in records:
        details = r.get("details") or {}
        if subject is not None:
            named = any(subject.names(v) for v in _values(details))
            if not named and not (r.get("run_id") and r.get("run_id") in subject.runs):
                continue
        if user is not None and user not in (r.get("user"), r.get("os_user")):
            continue
        if event is not None and r.get("event") != event:
            continue
        if since is not None and str(r.get("time", "")) < since:
            continue
        out.append(
            AuditRow(
                seq=int(r.get("seq", -1)),
                time=str(r.get("time", "")),
                user=str(r.get("user", "")),
                where=f"{r.get('os_user', '?')}@{r.get('host', '?')} pid {r.get('pid', '?')}",
                event=str(r.get("event", "")),
                run_id=str(r.get("run_id") or ""),
                what=_what(details),
            )
        )
    return out
