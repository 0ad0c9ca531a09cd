"""Scan everything under ``research/`` for identifying values of the restricted zone.

The needles come from the restricted vault and index: patient names and other patient names
(DICOM ``FAMILY^GIVEN`` and plain ``Given Family`` / ``FAMILY GIVEN`` forms, and name parts of
5 or more letters), patient IDs and other patient IDs (Other Patient IDs and Other Patient IDs
Sequence), accession numbers, birth dates (``YYYYMMDD``, ``YYYY-MM-DD``, ``DD.MM.YYYY``,
``MM/DD/YYYY``), addresses (the whole, and each line of 8 or more characters holding a letter
and a digit: a street, not a city alone), telephone numbers (as written, and their digits
where 8 or more) and original Study, Series and SOP Instance UIDs. Every Parquet column
(strings, lists, nested, JSON) and every other file's bytes are searched. The report names
table, column and row number, never the value.

Matches are whole tokens (a needle inside a longer word is no match), at least 4 characters
long. A name part alone (a family name without its given name) counts only outside the
Standard's own vocabulary: "Patient" inside "Retain Patient Characteristics Option" (the
De-identification Method Code Sequence pacsflow writes) or a code meaning such as
"Parkinson's disease" is a word of DICOM, not the patient (the vocabulary: the meanings of
pydicom's PS3.16 code dictionaries, PS3.6 attribute names and the PS3.15 option names, each
of two or more words); the whole name is found anywhere.

Memory is bounded: needles are streamed from the restricted tables and gathered in chunks of at
most ``max_needles``; the research zone is scanned once per chunk (one pass for archives up to
a few hundred thousand patients' worth of identifiers). An encrypted vault
(``deid.encrypt_vault``) is read with the secret key.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.compute import set_total
from pipeline.errors import LakeError
from pipeline.lake import LakePaths, scan_batches

__all__ = ["Leak", "iter_needles", "verify"]

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


_UID_KINDS = (
    ("StudyInstanceUID", "original UID"),
    ("SeriesInstanceUID", "original UID"),
    ("SOPInstanceUID", "original UID"),
    ("PatientID", "patient ID"),
    ("AccessionNumber", "accession number"),
)


def _address_forms(address: str) -> set[str]:
    forms = {address.strip()}
    for line in re.split(r"[\^,;\n\r]+", address):
        line = line.strip()
        if len(line) >= 8 and re.search(r"[A-Za-z]", line) and re.search(r"\d", line):
            forms.add(line)
    return forms


def _phone_forms(number: str) -> set[str]:
    digits = re.sub(r"\D", "", number)
    forms = {number.strip()} if len(digits) >= 7 else set()
    if len(digits) >= 8:
        forms.add(digits)
    return forms


def _row_needles(row: dict[str, object]) -> Iterator[tuple[str, str]]:
    for key, kind in _UID_KINDS:
        if row.get(key):
            yield str(row[key]).strip(), kind
    for key in ("PatientName", "OtherPatientNames"):
        for name in str(row.get(key) or "").split("\\"):
            if name.strip():
                for form in _name_forms(name):
                    yield form, "patient name"
    for other in str(row.get("OtherPatientIDs") or "").split("\\"):
        if other.strip():
            yield other.strip(), "other patient ID"
    if row.get("PatientAddress"):
        for form in _address_forms(str(row["PatientAddress"])):
            yield form, "address"
    for number in str(row.get("PatientTelephoneNumbers") or "").split("\\"):
        for form in _phone_forms(number):
            yield form, "telephone number"
    if row.get("PatientBirthDate"):
        for form in _date_forms(str(row["PatientBirthDate"])):
            yield form, "birth date"


def iter_needles(
    lake: LakePaths, key: bytes | None = None, max_needles: int = 500_000
) -> Iterator[dict[str, str]]:
    """Chunks of identifying strings of the restricted zone -> their kind.

    Raises
    ------
    LakeError
        The vault holds encrypted rows and no key (or the wrong key) was given.
    """
    from pipeline.deid.vault import VaultCipher, is_encrypted

    cipher = VaultCipher(key) if key is not None else None
    chunk: dict[str, str] = {}
    index_cols = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
    sources = (
        ("vault", None),
        ("index", ["object_key", *index_cols]),
    )
    for table, columns in sources:
        for batch in scan_batches(lake, table, columns=columns):
            for row in batch.to_pylist():
                if table == "vault" and any(is_encrypted(v) for v in row.values()):
                    if cipher is None:
                        raise LakeError(
                            "the vault is encrypted: verify needs the key file "
                            "(--key-file or PACSFLOW_KEY_FILE)"
                        )
                    row = cipher.decrypt_row(row)
                for needle, kind in _row_needles(row):
                    if len(needle) >= _MIN_LEN:
                        chunk[needle] = kind
            if len(chunk) >= max_needles:
                yield chunk
                chunk = {}
    if chunk:
        yield chunk


_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*[A-Za-z0-9]|[A-Za-z0-9]")
_WORD = re.compile(r"[A-Za-z0-9]+")
_NAME = "patient name"


@functools.cache
def _vocabulary() -> dict[str, tuple[str, ...]]:
    """Word (case-folded) -> the phrases of the Standard's vocabulary holding it (case-folded,
    two or more words): PS3.16 code meanings (pydicom's dictionaries), PS3.6 attribute names,
    the PS3.15 options (their code meanings and pacsflow's names for them)."""
    from pydicom.datadict import DicomDictionary
    from pydicom.sr._concepts_dict import concepts

    from pipeline.deid import _profile

    phrases: set[str] = {name for name in _profile.OPTION_CODES}
    phrases |= {meaning for _code, meaning in _profile.OPTION_CODES.values()}
    phrases |= {entry[2] for entry in DicomDictionary.values()}
    schemes: dict[str, dict[str, dict[str, tuple[str, list[int]]]]] = concepts  # type: ignore[assignment]
    for names in schemes.values():
        for codes in names.values():
            phrases |= {meaning for meaning, _cids in codes.values()}
    index: dict[str, set[str]] = {}
    for phrase in phrases:
        words = _WORD.findall(phrase)
        if len(words) >= 2:
            for word in words:
                index.setdefault(word.casefold(), set()).add(phrase.casefold())
    return {word: tuple(sorted(found, key=len, reverse=True)) for word, found in index.items()}


def _outside_vocabulary(text: str, word: str) -> bool:
    """True when ``word`` stands in ``text`` as a whole token at least once outside the
    phrases of the Standard's vocabulary that hold it (each occurrence is judged on a window
    around it, the width of the longest such phrase; windows repeat from row to row, so
    their verdicts are cached)."""
    folded_word = word.casefold()
    phrases = _vocabulary().get(folded_word, ())
    if not phrases:
        return True
    span = len(phrases[0])  # longest first
    folded = text.casefold()
    pattern = rf"(?<![a-z0-9]){re.escape(folded_word)}(?![a-z0-9])"
    for m in re.finditer(pattern, folded):
        start = max(0, m.start() - span)
        if not _covered(folded_word, folded[start : m.end() + span], m.start() - start):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _covered(word: str, window: str, at: int) -> bool:
    """True when a vocabulary phrase holding ``word`` covers ``window[at:at + len(word)]``."""
    for phrase in _vocabulary()[word]:
        i = window.find(phrase, max(0, at + len(word) - len(phrase)))
        while i != -1 and i <= at:
            if i + len(phrase) >= at + len(word):
                return True
            i = window.find(phrase, i + 1)
    return False


class _Matcher:
    """Finds needles fast: single-token needles by set lookup over the text's tokens (UIDs,
    IDs, dates, name parts), multi-word needles (names, addresses) by one small regex of whole
    words. A name part alone counts outside the Standard's vocabulary only (module text)."""

    def __init__(self, found: dict[str, str]) -> None:
        self.tokens = {k.lower(): v for k, v in found.items() if _TOKEN.fullmatch(k)}
        phrases = sorted((k for k in found if not _TOKEN.fullmatch(k)), key=len, reverse=True)
        self.phrase_kind = {k.lower(): found[k] for k in phrases}
        alternatives = "|".join(re.escape(p) for p in phrases)
        self.phrases = (
            re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)
            if phrases
            else None
        )

    def search(self, text: str) -> str | None:
        """The kind of the first identifying value in ``text``, or None."""
        if self.phrases is not None:
            m = self.phrases.search(text)
            if m:
                return self.phrase_kind.get(m.group(0).lower(), "identifier")
        for token in _TOKEN.findall(text):
            kind = self._kind(token, text)
            if kind:
                return kind
            if "." in token or "-" in token or "/" in token:  # e.g. a UID inside a URL path
                for part in re.split(r"[/]", token):
                    kind = self._kind(part, text)
                    if kind:
                        return kind
        return None

    def _kind(self, token: str, text: str) -> str | None:
        kind = self.tokens.get(token.lower())
        if kind == _NAME and token.isalpha() and not _outside_vocabulary(text, token):
            return None  # a word of DICOM that is also this patient's name part
        return kind


def _strings(column: pa.ChunkedArray) -> Iterator[tuple[int, str]]:
    for i, value in enumerate(column.to_pylist()):
        if value is None:
            continue
        yield i, value if isinstance(value, str) else repr(value)


def _scan(
    paths: list[Path],
    lake: LakePaths,
    matcher: _Matcher,
    progress: Callable[[int], None] | None = None,
) -> Iterator[Leak]:
    for path in paths:
        if progress:
            progress(1)
        if not path.is_file():  # gone since the listing (a vacuum, a superseded part)
            continue
        rel = str(path.relative_to(lake.root))
        if path.suffix == ".parquet":
            try:
                yield from _scan_parquet(path, rel, matcher)
            except OSError:  # damaged: what it holds cannot be vouched for (fail closed)
                yield Leak(rel, None, None, "unreadable Parquet file (cannot be scanned)")
        else:
            kind = matcher.search(_text_of(path))
            if kind:
                yield Leak(rel, None, None, kind)


def _scan_parquet(path: Path, rel: str, matcher: _Matcher) -> Iterator[Leak]:
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
                    yield Leak(rel, name, offset + i, kind)
        offset += batch.num_rows


def _text_of(path: Path) -> str:
    """What of a file can hold text: a numeric ``.npy`` array (tensors, masks) only its header
    (numbers cannot spell an identifier; scanning 100s of MB of them as text took minutes);
    anything else, all of it."""
    if path.suffix == ".npy":
        import numpy as np

        with path.open("rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape_order_dtype = read(fh)
            except (ValueError, OSError):
                shape_order_dtype = None
            header_end = fh.tell()
        kind = np.dtype(shape_order_dtype[2]).kind if shape_order_dtype is not None else ""
        if kind in tuple("biufc"):
            with path.open("rb") as fh:
                return fh.read(header_end).decode("latin-1")
        if kind in ("U", "S"):  # text arrays: their values (UTF-32 would hide them from a scan)
            values = np.load(path, allow_pickle=False).ravel()
            return "\n".join(str(v, "latin-1") if kind == "S" else str(v) for v in values)
    return path.read_bytes().decode("latin-1")


def verify(
    lake: LakePaths,
    key: bytes | None = None,
    max_needles: int = 500_000,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[Leak]:
    """Return every place under ``research/`` holding an identifying value (empty: clean).

    ``progress`` (a :class:`pipeline.compute.Progress`) hears the number of files to scan
    (per chunk of needles) and each file scanned."""
    if not lake.research.exists():
        return []
    leaks: dict[tuple[str, str | None, int | None], Leak] = {}
    files = 0
    for chunk in iter_needles(lake, key, max_needles):
        paths = sorted(p for p in lake.research.rglob("*") if p.is_file())
        files += len(paths)
        set_total(progress, files)
        for leak in _scan(paths, lake, _Matcher(chunk), progress):
            leaks.setdefault((leak.path, leak.column, leak.row), leak)
    return sorted(leaks.values(), key=lambda x: (x.path, x.column or "", x.row or 0))
