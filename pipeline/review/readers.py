"""Agreement between readers, where findings were read by two reviewers: the share of
findings both decided alike and Cohen's kappa over accept / reject / uncertain.

This is the metrics page's agreement slot: :func:`reader_agreement` gives, per model version,
what the page shows; a two-reader mode only has to store each reader's decisions as rows of
the ``reviews`` table (as every decision is) for it to appear.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.review.store import DECISIONS

__all__ = ["Agreement", "cohen_kappa", "reader_agreement"]


@dataclass(frozen=True)
class Agreement:
    """Two readers' decisions on the same findings."""

    pairs: int  # findings decided by two readers
    agreed: int

    kappa: float | None

    @property
    def rate(self) -> float | None:
        return self.agreed / self.pairs if self.pairs else None


def cohen_kappa(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Cohen's kappa of paired decisions; None without pairs or when chance agreement is 1.

    Examples
    --------
    >>> cohen_kappa([("accept", "accept"), ("reject", "reject")])
    1.0
    >>> cohen_kappa([("accept", "reject"), ("reject", "accept")])
    -1.0
    """
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    expected = sum(
        (sum(a == d for a, _ in pairs) / n) * (sum(b == d for _, b in pairs) / n) for d in DECISIONS
    )
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def reader_agreement(
    findings: Iterable[Mapping[str, Any]], reviews: Iterable[Mapping[str, Any]]
) -> dict[tuple[str, str], Agreement]:
    """Per (model, model version): the agreement of the first two readers of each finding
    (each reader's latest decision), for versions with at least one such finding."""
    by_finding: dict[str, dict[str, Mapping[str, Any]]] = {}
    first: dict[str, list[str]] = {}
    for r in sorted(reviews, key=lambda r: (r["reviewed_at"], r["review_id"])):
        key, who = str(r["finding_key"]), str(r["reviewer"])
        by_finding.setdefault(key, {})[who] = r
        readers = first.setdefault(key, [])
        if who not in readers:
            readers.append(who)
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for f in findings:
        key = str(f["finding_key"])
        readers = first.get(key, [])
        if len(readers) < 2:
            continue
        a, b = (str(by_finding[key][who]["decision"]) for who in readers[:2])
        groups.setdefault((str(f["model"]), str(f["model_version"])), []).append((a, b))
    return {
        version: Agreement(len(p), sum(a == b for a, b in p), cohen_kappa(p))
        for version, p in sorted(groups.items())
    }
