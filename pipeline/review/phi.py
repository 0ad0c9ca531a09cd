"""Patient identifiers in reviewers' free text.

A comment or corrected label is stored in the research zone (``research/tables/reviews``) and
copied into the shareable report, so it must not name the patient. Before a decision is stored
the app reads that finding's patient's identifiers from the restricted zone
(:func:`patient_identifiers`) and checks the text against them (:func:`check_free_text`):
names and their components, IDs and accession numbers, and birth dates in common formats,
matched case-insensitively and ignoring separators (``^ , . - / _`` and spaces) and accents.
The identifiers are used for the check only: never shown, logged or audited.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pipeline.errors import LakeError
from pipeline.lake.crypto import is_encrypted

if TYPE_CHECKING:
    from pipeline.lake.crypto import VaultCipher
    from pipeline.lake.paths import LakePaths

__all__ = ["IDENTIFIER_COLUMNS", "check_free_text", "patient_identifiers"]

#: The vault's columns holding a patient's identifiers.
IDENTIFIER_COLUMNS = ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber")
_WORD = re.compile(r"[^\W_]+")
_DATE = re.compile(r"^\d{8}$")
#: An identifier shorter than this (separators removed) is matched as a whole word only.
_MIN_SUBSTRING = 4
_KINDS = {
    "name": "the patient's name",
    "id": "an ID or accession number",
    "date": "the patient's birth date",
}
_MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)


def patient_identifiers(
    lake: LakePaths, series_pseudonym: str, cipher: VaultCipher | None = None
) -> set[str]:
    """The original identifiers of the patient of a pseudonymous series: PatientName,
    PatientID, PatientBirthDate and every AccessionNumber of that patient (all studies),
    read from the restricted vault now (never cached).

    Parameters
    ----------
    lake:
        The lake.
    series_pseudonym:
        The research zone's SeriesInstanceUID of the finding.
    cipher:
        Decrypts an encrypted vault (``deid.encrypt_vault``); the app has it from the lake's key.

    Returns
    -------
    set[str]
        The raw values (DICOM forms, e.g. ``DOE^JANE``, ``19700101``); empty for a series the
        vault does not know.

    Raises
    ------
    LakeError
        When the vault's identifiers are encrypted and no ``cipher`` is given: the text
        cannot be checked.
    """
    import pyarrow.compute as pc

    from pipeline.lake.io import read_table

    series = read_table(
        lake,
        "vault",
        columns=["patient_token"],
        filter=pc.field("series_pseudonym") == series_pseudonym,
    )
    tokens = [t for t in pc.unique(series.column("patient_token")).to_pylist() if t]
    if not tokens:
        return set()
    rows = read_table(
        lake,
        "vault",
        columns=["object_key", *IDENTIFIER_COLUMNS],
        filter=pc.field("patient_token").isin(tokens),
    )
    out: set[str] = set()
    for row in rows.to_pylist():
        if cipher is not None:
            row = cipher.decrypt_row(row)
        for column in IDENTIFIER_COLUMNS:
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                continue
            if is_encrypted(value):
                raise LakeError(
                    "the vault's identifiers are encrypted (deid.encrypt_vault) and no key was "
                    "given: free text cannot be checked for patient identifiers"
                )
            out.add(value.strip())
    return out


def _fold(text: str) -> str:
    """Lower case, compatibility forms, accents dropped."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _squash(text: str) -> str:
    """Folded, with everything but letters and digits removed."""
    return "".join(_WORD.findall(_fold(text)))


def _date_forms(value: str) -> set[str]:
    """A DICOM date (YYYYMMDD) in the forms people write, squashed (no separators)."""
    try:
        d = dt.datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        return set()
    y, yy = f"{d.year:04d}", f"{d.year % 100:02d}"
    forms: set[str] = set()
    for day in {f"{d.day:02d}", str(d.day)}:
        for month in {f"{d.month:02d}", str(d.month)}:
            forms |= {y + month + day, day + month + y, month + day + y}
            forms |= {day + month + yy, month + day + yy}
        for name in (_MONTHS[d.month - 1], _MONTHS[d.month - 1][:3]):
            forms |= {day + name + y, name + day + y, y + name + day}
    return forms


def _name_parts(value: str) -> list[str]:
    """Family, given and middle names of a DICOM person name (prefix and suffix left out), or
    the words of a plain name; each folded, two letters or more."""
    if "^" in value or "=" in value:
        groups = [group.split("^")[:3] for group in value.split("=")]
        words = [w for g in groups for part in g for w in _WORD.findall(_fold(part))]
    else:
        words = _WORD.findall(_fold(value))
    return [w for w in words if len(w) >= 2]


def _id_forms(value: str) -> set[str]:
    """An ID squashed, and its parts that hold digits (``MRN-0042``: ``mrn0042``, ``0042``)."""
    parts = _WORD.findall(_fold(value))
    forms = {"".join(parts)}
    forms |= {p for p in parts if len(p) >= _MIN_SUBSTRING and any(c.isdigit() for c in p)}
    return forms


def check_free_text(text: str, identifiers: Iterable[str]) -> tuple[bool, str]:
    """Whether ``text`` is free of the given identifiers.

    - an identifier with digits is matched as a whole, separators ignored (``12-34-56``
      matches ``123456``), and so are its parts with digits (``0042`` of ``MRN-0042``); one
      shorter than four characters only as a word;
    - a value without digits is taken for a name: each of its parts (family, given, middle;
      two letters or more) is matched as a word;
    - an 8-digit value that is a date is matched in the common date forms (``1970-01-31``,
      ``31.01.1970``, ``01/31/1970``, ``1.31.70``, ``31 Jan 1970``, ``January 31, 1970``).

    Parameters
    ----------
    text:
        The reviewer's text.
    identifiers:
        Raw identifier values (see :func:`patient_identifiers`).

    Returns
    -------
    tuple[bool, str]
        ``(True, "")``, or ``(False, reason)`` where the reason names what kind of identifier
        was found (never the value).

    Examples
    --------
    >>> check_free_text("mask leaks into the liver", {"DOE^JANE", "MRN-0042", "19700131"})
    (True, '')
    >>> check_free_text("Jane doe, 0042", {"DOE^JANE", "MRN-0042"})
    (False, "it holds the patient's name and an ID or accession number")
    >>> check_free_text("born 31.01.1970", {"19700131"})
    (False, "it holds the patient's birth date")
    """
    if not text.strip():
        return True, ""
    squashed = _squash(text)
    words = set(_WORD.findall(_fold(text)))
    found: set[str] = set()
    for value in identifiers:
        whole = _squash(value)
        if not whole:
            continue
        if _DATE.match(value) and (forms := _date_forms(value)):
            if any(f in squashed for f in forms):
                found.add("date")
            continue
        if not any(c.isdigit() for c in whole):  # a name: its parts, as words
            if any(p in words for p in _name_parts(value)):
                found.add("name")
        elif any(
            (p in squashed) if len(p) >= _MIN_SUBSTRING else (p in words) for p in _id_forms(value)
        ):
            found.add("id")
    if not found:
        return True, ""
    parts = [_KINDS[k] for k in ("name", "id", "date") if k in found]
    return False, "it holds " + " and ".join(parts)
