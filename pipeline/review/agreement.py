"""Agreement between two readers: percent agreement and Cohen's kappa with its interval.

Computed from the ``reviews`` table: each reader's latest decision about each finding both
read; findings only one of them decided are left out (they are counted as ``pending``).
Plain Python, testable without a server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.review.store import DECISIONS

__all__ = ["Agreement", "agreement", "cohens_kappa", "reader_decisions"]

_Z95 = 1.959963984540054


@dataclass(frozen=True)
class Agreement:
    """How two readers agree over the findings both decided.

    ``kappa_interval`` is the 95% interval ``kappa ± z·SE`` with Cohen's (1960) large-sample
    standard error ``SE = sqrt(po·(1 - po) / (n·(1 - pe)²))``, clipped to ``[-1, 1]``; None
    when kappa is undefined (no pairs, or both readers gave one and the same decision to
    every finding, so chance agreement is 1).
    """

    readers: tuple[str, str]
    pairs: int  # findings both decided
    agreed: int
    pending: int  # findings of the set only one reader (or none) decided
    observed: float | None  # percent agreement as a fraction
    expected: float | None  # chance agreement from the readers' marginals
    kappa: float | None
    kappa_interval: tuple[float, float] | None
    table: dict[tuple[str, str], int]  # (reader A's, reader B's decision) -> count


def cohens_kappa(
    pairs: Sequence[tuple[str, str]], categories: Sequence[str] = DECISIONS
) -> tuple[float | None, float | None, float | None, tuple[float, float] | None]:
    """``(observed, expected, kappa, interval)`` of paired decisions.

    Examples
    --------
    >>> po, pe, k, ci = cohens_kappa([("accept", "accept"), ("reject", "reject"),
    ...                               ("accept", "reject"), ("accept", "accept")])
    >>> po, round(pe, 4), round(k, 4)
    (0.75, 0.5, 0.5)
    """
    n = len(pairs)
    if n == 0:
        return None, None, None, None
    unknown = {d for pair in pairs for d in pair} - set(categories)
    if unknown:
        raise ValueError(f"decisions must be among {', '.join(categories)}: got {sorted(unknown)}")
    po = sum(1 for a, b in pairs if a == b) / n
    pe = sum(
        (sum(1 for a, _ in pairs if a == c) / n) * (sum(1 for _, b in pairs if b == c) / n)
        for c in categories
    )
    if pe >= 1.0:
        return po, pe, None, None
    kappa = (po - pe) / (1 - pe)
    se = math.sqrt(po * (1 - po) / (n * (1 - pe) ** 2))
    interval = (max(-1.0, kappa - _Z95 * se), min(1.0, kappa + _Z95 * se))
    return po, pe, kappa, interval


def reader_decisions(
    reviews: Iterable[Mapping[str, Any]], reader: str, keys: Iterable[str] | None = None
) -> dict[str, str]:
    """``{finding key: decision}`` of one reader's latest decisions (of ``keys`` when given)."""
    wanted = None if keys is None else set(keys)
    latest: dict[str, tuple[Any, str, str]] = {}
    for r in reviews:
        if r["reviewer"] != reader or (wanted is not None and r["finding_key"] not in wanted):
            continue
        stamp = (r["reviewed_at"], r["review_id"])
        have = latest.get(r["finding_key"])
        if have is None or stamp > have[:2]:
            latest[r["finding_key"]] = (*stamp, str(r["decision"]))
    return {k: v[2] for k, v in latest.items()}


def agreement(
    reviews: Iterable[Mapping[str, Any]], readers: tuple[str, str], keys: Sequence[str]
) -> Agreement:
    """The :class:`Agreement` of ``readers`` over the findings ``keys`` (a queue's)."""
    rows = list(reviews)
    a = reader_decisions(rows, readers[0], keys)
    b = reader_decisions(rows, readers[1], keys)
    both = [k for k in dict.fromkeys(keys) if k in a and k in b]
    pairs = [(a[k], b[k]) for k in both]
    table: dict[tuple[str, str], int] = {}
    for pair in pairs:
        table[pair] = table.get(pair, 0) + 1
    po, pe, kappa, interval = cohens_kappa(pairs)
    return Agreement(
        readers=readers,
        pairs=len(pairs),
        agreed=sum(1 for x, y in pairs if x == y),
        pending=len(dict.fromkeys(keys)) - len(pairs),
        observed=po,
        expected=pe,
        kappa=kappa,
        kappa_interval=interval,
        table=table,
    )
