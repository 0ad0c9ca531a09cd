"""The engine's decisions for values that are not DICOM elements (issue #25: FHIR context).

The EHR's orders and reports carry the same kinds of values as a DICOM header: dates, free
text, coded concepts. :class:`ProfileRules` answers, for a DICOM attribute that holds the same
kind of value, what the configured profile does with it (:func:`pipeline.deid.profile.resolve`
under ``deid.options``) and what a code's meaning becomes
(:func:`pipeline.deid._codes.meaning_for`, the rule of every DICOM Code Meaning), so a
ServiceRequest's reason text is treated as the Reason for the Requested Procedure would be,
and a ``Coding.display`` as a Code Meaning. Stages never import each other: the caller (the
CLI, the runner) builds it from the configuration and hands it to :mod:`pipeline.fhir`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import DeidConfig
from pipeline.deid._codes import meaning_for
from pipeline.deid.profile import Option, resolve

__all__ = ["ProfileRules"]


@dataclass(frozen=True)
class ProfileRules:
    """The profile's action per attribute and the Code Meaning rule, under one option set.

    Examples
    --------
    >>> rules = ProfileRules(frozenset({Option.RETAIN_LONG_MODIFIED_DATES}))
    >>> rules.action(0x00080020)  # Study Date
    'C'
    >>> rules.action(0x00401002)  # Reason for the Requested Procedure: free text
    'X'
    """

    options: frozenset[Option]
    keep_code_meanings: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_config(cls, cfg: DeidConfig) -> ProfileRules:
        """The rules the ``deid`` section of a configuration describes."""
        return cls(frozenset(Option(o) for o in cfg.options), frozenset(cfg.keep_code_meanings))

    def action(self, tag: int) -> str:
        """The Table E.1-1 action code (``K``, ``C``, ``X``, ``Z/D``, ...) for ``tag`` under
        the options; ``X`` for an attribute the table does not list (out-of-table text is
        removed by the engine)."""
        return resolve(tag, self.options) or "X"

    def code_meaning(self, scheme: str, value: str, meaning: str) -> str | None:
        """What ``meaning`` of code ``value`` in ``scheme`` becomes; None where the engine
        writes a dummy (a meaning no dictionary vouches for)."""
        return meaning_for(scheme, value, meaning, self.keep_code_meanings)
