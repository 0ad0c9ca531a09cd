"""The PS3.15 Annex E profile as an API: which action applies to an attribute under options.

The tables come from the generated :mod:`pipeline.deid._profile` (edition
:data:`~pipeline.deid._profile.EDITION`). "A requirement for an Option, when implemented,
overrides any requirement for the underlying Profile" (PS3.15 E.1.1). When two chosen options
give different actions for one attribute (in 2026d only Retain Device Identity ``K`` versus
Retain Longitudinal Temporal Information with Modified Dates ``C``, on device calibration and
manufacture dates), the more protective action wins, in the order X > Z > D > C > U > K: the
dates are shifted rather than kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from pipeline.deid import _profile

__all__ = ["EDITION", "Option", "ProfileRule", "resolve", "rule_for", "safe_private_vr"]

EDITION = _profile.EDITION

#: Most protective first: used to settle options that disagree.
_PROTECTION = ("X", "Z", "D", "C", "U", "K")


class Option(StrEnum):
    """The options of the Basic Application Level Confidentiality Profile (PS3.15 E.3)."""

    RETAIN_SAFE_PRIVATE = "retain_safe_private"
    RETAIN_UIDS = "retain_uids"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    RETAIN_LONG_FULL_DATES = "retain_long_full_dates"
    RETAIN_LONG_MODIFIED_DATES = "retain_long_modified_dates"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    CLEAN_GRAPHICS = "clean_graphics"

    @property
    def code(self) -> tuple[str, str]:
        """The CID 7050 (code value, code meaning) of the option."""
        return _profile.OPTION_CODES[self.value]


@dataclass(frozen=True)
class ProfileRule:
    """One row of Table E.1-1: the attribute's name, whether retired, and its actions."""

    name: str
    retired: bool
    basic: str
    options: dict[str, str]

    def action(self, options: Iterable[Option | str] = ()) -> str:
        """The action under the Basic Profile plus ``options`` (see the module docstring)."""
        chosen = [self.options[o] for o in {Option(o).value for o in options} if o in self.options]
        if not chosen:
            return self.basic
        return min(chosen, key=_PROTECTION.index)


def _pattern_rule(tag: int) -> ProfileRule | None:
    group, element = tag >> 16, tag & 0xFFFF
    for pattern, entry in _profile.PATTERNS:
        if pattern == "(50xx,xxxx)" and 0x5000 <= group <= 0x501E and group % 2 == 0:
            return ProfileRule(*entry)
        if (
            pattern.startswith("(60xx,")
            and 0x6000 <= group <= 0x601E
            and group % 2 == 0
            and element == int(pattern[6:10], 16)
        ):
            return ProfileRule(*entry)
        if pattern.startswith("(gggg,eeee)") and group % 2 == 1:
            return ProfileRule(*entry)
    return None


def rule_for(tag: int) -> ProfileRule | None:
    """The Table E.1-1 row that governs ``tag`` (exact tag first, then the patterns).

    Returns None for a public attribute the table does not list (handled by VR instead).

    Examples
    --------
    >>> rule_for(0x00100010).name
    "Patient's Name"
    >>> rule_for(0x60023000).name
    'Overlay Data'
    """
    entry = _profile.ATTRIBUTES.get(tag)
    if entry is not None:
        return ProfileRule(*entry)
    return _pattern_rule(tag)


def resolve(tag: int, options: Iterable[Option | str] = ()) -> str | None:
    """The action code for ``tag`` under the Basic Profile and ``options``, or None if unlisted.

    Examples
    --------
    >>> resolve(0x0020000D)
    'U'
    >>> resolve(0x0020000D, [Option.RETAIN_UIDS])
    'K'
    """
    rule = rule_for(tag)
    return None if rule is None else rule.action(options)


def safe_private_vr(group: int, creator: str, offset: int) -> str | None:
    """The VR of a safe private attribute (Table E.3.10-1), matched by creator and offset."""
    return _profile.SAFE_PRIVATE.get((group, creator, offset))
