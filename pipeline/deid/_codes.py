"""Canonical Code Meanings by (Coding Scheme Designator, Code Value), for the engine.

A Code Meaning (0008,0104) is LO text: a site's RIS may type anything into it (a procedure's
meaning carrying a patient's name, a remark), and kept coded sequences (Procedure Code
Sequence, SR concept names, ...) would carry it into the research zone. The engine replaces
it by what the code itself says: the meaning PS3.16 gives the code, from pydicom's
dictionaries of the Standard's coding schemes (``pydicom.sr._concepts_dict``: DCM, SCT, LN,
UCUM, NCIt, RADLEX, FMA, MDC, ... as of pydicom's edition; highdicom uses the same ones).
Retired SNOMED-RT codes (``SRT``) are looked up by their SCT code
(``pydicom.sr._snomed_dict``). A meaning that any of the dictionaries' meanings of the code
spells (ignoring case) is kept as it is (a synonym from another context group is no free
text).

Meanings are made valid LO: folded to ASCII (NFKD, combining marks and zero-width spaces
dropped), at most 64 characters. Where a code has several meanings (SNOMED's fully specified
name and a context group's short one) the canonical one is the meaning most context groups
use, then the shortest, then the first in code-point order: any machine picks alike.
"""

from __future__ import annotations

import functools
import unicodedata

__all__ = ["CodeMeanings", "canonical_meaning", "code_meanings", "fold", "meaning_for"]

#: (scheme, code value) -> (canonical meaning, every meaning accepted as it is, case-folded)
CodeMeanings = dict[tuple[str, str], tuple[str, frozenset[str]]]

_LO_MAX = 64


def fold(text: str) -> str | None:
    """``text`` as a valid LO value: ASCII (NFKD, combining marks and zero-width spaces
    dropped, the micro sign spelt ``u`` as UCUM does), one space between words, at most 64
    characters; None where a letter has no ASCII form (dropping it would change the meaning:
    ``µV`` is not ``V``)."""
    text = text.replace("\u200b", "").replace("\u00b5", "u").replace("\u03bc", "u")
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    if not kept.isascii():
        return None
    words = " ".join(kept.replace("\\", "/").split())
    return words[:_LO_MAX].rstrip() or None


@functools.cache
def code_meanings() -> CodeMeanings:
    """Every code of pydicom's scheme dictionaries: its canonical meaning and accepted ones."""
    from pydicom.sr._concepts_dict import concepts
    from pydicom.sr._snomed_dict import mapping

    gathered: dict[tuple[str, str], dict[str, int]] = {}
    schemes: dict[str, dict[str, dict[str, tuple[str, list[int]]]]] = concepts  # type: ignore[assignment]
    for scheme, names in schemes.items():
        for codes in names.values():
            for value, (meaning, cids) in codes.items():
                votes = gathered.setdefault((scheme, value), {})
                votes[meaning] = max(votes.get(meaning, 0), len(cids))
    table: CodeMeanings = {}
    for key, votes in gathered.items():
        valid = {folded: votes[m] for m in votes if (folded := fold(m)) is not None}
        if not valid:
            continue  # no meaning that LO can hold: as an unknown code
        best = min(valid, key=lambda m: (-valid[m], len(m), m))
        accepted = frozenset(m.casefold() for m in (*votes, *valid))
        table[key] = (best, accepted)
    for srt, sct in mapping.get("SRT", {}).items():
        entry = table.get(("SCT", sct))
        if entry is not None:
            table.setdefault(("SRT", srt), entry)
    return table


def canonical_meaning(scheme: str, value: str) -> tuple[str, frozenset[str]] | None:
    """(canonical meaning, accepted meanings case-folded) of a code, or None for a code no
    dictionary holds (a local scheme, or a code newer than pydicom's dictionaries)."""
    return code_meanings().get((scheme.strip(), value.strip()))


def meaning_for(
    scheme: str, value: str, current: str, keep_code_meanings: frozenset[str]
) -> str | None:
    """The Code Meaning that replaces ``current`` (a meaning written with code ``value`` of
    ``scheme``): ``current`` itself where the scheme's dictionary gives the code that meaning
    (or ``keep_code_meanings`` names the scheme, or ``"*"``, and the code is unknown), the
    canonical meaning of a known code, the code itself for a UCUM unit, else None (the caller
    writes a dummy). One decision for DICOM Code Meanings and FHIR ``Coding.display``.

    Examples
    --------
    >>> meaning_for("UCUM", "mm", "millimetre (Dr Smith)", frozenset())
    'mm'
    >>> meaning_for("99LOCAL", "X1", "seen by Dr Smith", frozenset()) is None
    True
    >>> meaning_for("99LOCAL", "X1", "local term", frozenset({"99LOCAL"}))
    'local term'
    """
    known = canonical_meaning(scheme, value) if value else None
    if known is not None:
        return current if current.casefold() in known[1] else known[0]
    if scheme == "UCUM" and value and fold(value) == value:
        return value  # a UCUM code is the unit's own name (mm, cm3, [hnsf'U])
    if "*" in keep_code_meanings or scheme in keep_code_meanings:
        return current
    return None
