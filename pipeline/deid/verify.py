"""Scan everything under ``research/`` for identifying values of the restricted zone.

The needles come from the restricted vault and index: patient names (DICOM ``FAMILY^GIVEN``
and plain ``Given Family`` / ``FAMILY GIVEN`` forms), patient IDs, accession numbers, birth dates
(``YYYYMMDD``, ``YYYY-MM-DD``, ``DD.MM.YYYY``, ``MM/DD/YYYY``) and original Study, Series and
SOP Instance UIDs. Every Parquet column (strings, lists, nested, JSON) and every other file's
bytes are searched. The report names table, column and row number, never the value.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.lake import LakePaths, read_table

__all__ = ["Leak", "needles", "verify"]

_MIN_LEN = 4


@dataclass(frozen=True)
class Leak:
    """Where an identifying value was found (never the value itself)."""

    path: str
    column: str | None
    row: int | None
    kind: str


def _name_forms(name: str) -> set[str]:
    parts = [p.strip() for p in name.split("^") if p.strip()]
    forms = {name.strip()}
    if len(parts) >= 2:
        family, given = parts[0], parts[1]
        forms |= {f"{given} {family}", f"{family} {given}", f"{family}, {given}"}
    forms |= {p for p in parts if len(p) >= _MIN_LEN + 1}
    return forms


def _date_forms(value: str) -> set[str]:
    try:
        d = dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return {value}
    return {d.strftime("%Y%m%d"), d.isoformat(), d.strftime("%d.%m.%Y"), d.strftime("%m/%d/%Y")}


def needles(lake: LakePaths) -> dict[str, str]:
    """Identifying strings of the restricted zone -> their kind."""
    out: dict[str, str] = {}
    vault = read_table(lake, "vault").to_pylist()
    index = read_table(
        lake,
        "index",
        columns=["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
    ).to_pylist()
    for row in vault + index:
        for key, kind in (
            ("StudyInstanceUID", "original UID"),
            ("SeriesInstanceUID", "original UID"),
            ("SOPInstanceUID", "original UID"),
            ("PatientID", "patient ID"),
            ("AccessionNumber", "accession number"),
        ):
            if row.get(key):
                out[str(row[key]).strip()] = kind
        if row.get("PatientName"):
            for form in _name_forms(str(row["PatientName"])):
                out[form] = "patient name"
        if row.get("PatientBirthDate"):
            for form in _date_forms(str(row["PatientBirthDate"])):
                out[form] = "birth date"
    return {k: v for k, v in out.items() if len(k) >= _MIN_LEN}


_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*[A-Za-z0-9]|[A-Za-z0-9]")


class _Matcher:
    """Finds needles fast: single-token needles by set lookup over the text's tokens (UIDs,
    IDs, dates, name parts), multi-word needles (names) by one small regex."""

    def __init__(self, found: dict[str, str]) -> None:
        self.tokens = {k.lower(): v for k, v in found.items() if _TOKEN.fullmatch(k)}
        phrases = sorted((k for k in found if not _TOKEN.fullmatch(k)), key=len, reverse=True)
        self.phrase_kind = {k.lower(): found[k] for k in phrases}
        self.phrases = (
            re.compile("|".join(re.escape(p) for p in phrases), re.IGNORECASE) if phrases else None
        )

    def search(self, text: str) -> str | None:
        """The kind of the first identifying value in ``text``, or None."""
        if self.phrases is not None:
            m = self.phrases.search(text)
            if m:
                return self.phrase_kind.get(m.group(0).lower(), "identifier")
        for token in _TOKEN.findall(text):
            kind = self.tokens.get(token.lower())
            if kind:
                return kind
            if "." in token or "-" in token or "/" in token:  # e.g. a UID inside a URL path
                for part in re.split(r"[/]", token):
                    kind = self.tokens.get(part.lower())
                    if kind:
                        return kind
        return None


def _strings(column: pa.ChunkedArray) -> Iterator[tuple[int, str]]:
    for i, value in enumerate(column.to_pylist()):
        if value is None:
            continue
        yield i, value if isinstance(value, str) else repr(value)


def verify(lake: LakePaths) -> list[Leak]:
    """Return every place under ``research/`` holding an identifying value (empty: clean)."""
    found = needles(lake)
    leaks: list[Leak] = []
    if not found or not lake.research.exists():
        return leaks
    matcher = _Matcher(found)
    for path in sorted(p for p in lake.research.rglob("*") if p.is_file()):
        rel = str(path.relative_to(lake.root))
        if path.suffix == ".parquet":
            pf = pq.ParquetFile(path)
            offset = 0
            for batch in pf.iter_batches(batch_size=10_000):
                for name in batch.schema.names:
                    col = batch.column(name)
                    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
                        continue
                    for i, text in _strings(pa.chunked_array([col])):
                        kind = matcher.search(text)
                        if kind:
                            leaks.append(Leak(rel, name, offset + i, kind))
                offset += batch.num_rows
        else:
            kind = matcher.search(path.read_bytes().decode("latin-1"))
            if kind:
                leaks.append(Leak(rel, None, None, kind))
    return leaks
