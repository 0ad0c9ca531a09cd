"""Review queues: the reading order of a worklist, queues a lead assigns, two blind readers.

A *queue* is an ordered list of finding keys. Two kinds:

- the worklist's current filter, sort and sampling (no storage): the finding page opened
  from the worklist knows its position in that list, and "save and next" goes down it;
- an *assigned* queue: a lead turns a worklist filter (or an explicit list of keys) into a
  queue for one reviewer, or for two reviewers who read it blind. It is a row of the research
  table ``queues`` (latest row per ``queue_id``); its keys are fixed when it is assigned, so
  "n of m decided" stays meaningful while decisions change what the filter would select.

Blinding: while a finding of a two-reader queue has not been decided by both readers, each
reader sees only their own decisions about it (pages, worklist status, metrics, exports).
Everyone else (a lead, say) sees every decision.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from pipeline.lake.io import read_table, write_partition
from pipeline.lake.paths import LakePaths
from pipeline.review.store import _signature
from pipeline.review.worklist import Query, run_query

__all__ = [
    "MAX_QUEUE",
    "Position",
    "Queue",
    "QueueStore",
    "assign_queue",
    "blinded_keys",
    "decided_by",
    "load_queues",
    "neighbours",
    "progress",
    "visible_reviews",
    "worklist_keys",
]

#: The most findings one assigned queue may hold.
MAX_QUEUE = 5000
_MAX_NAME = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Queue:
    """One assigned queue (a row of the ``queues`` table)."""

    queue_id: str
    name: str
    reviewers: tuple[str, ...]
    finding_keys: tuple[str, ...]
    spec: str | None
    assigned_by: str
    assigned_at: datetime

    @property
    def two_readers(self) -> bool:
        """Whether two reviewers read it, each blind to the other."""
        return len(self.reviewers) == 2

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Queue:
        """A queue from a ``queues`` row."""
        return cls(
            queue_id=str(row["queue_id"]),
            name=str(row["name"]),
            reviewers=tuple(row["reviewers"] or ()),
            finding_keys=tuple(row["finding_keys"] or ()),
            spec=row.get("spec"),
            assigned_by=str(row["assigned_by"]),
            assigned_at=row["assigned_at"],
        )


def assign_queue(
    lake: LakePaths,
    *,
    name: str,
    reviewers: Sequence[str],
    finding_keys: Sequence[str],
    assigned_by: str,
    spec: str | None = None,
    now: datetime | None = None,
) -> Queue:
    """Store a queue of ``finding_keys`` (in reading order) for one reviewer, or for two
    reviewers reading blind, and return it.

    Raises
    ------
    ValueError
        For an empty or overlong name, not one or two distinct reviewers, no findings, more
        than :data:`MAX_QUEUE`, or a key given twice.
    """
    name = name.strip()
    if not name or len(name) > _MAX_NAME or _CONTROL.search(name):
        raise ValueError(f"a queue needs a name of 1..{_MAX_NAME} printable characters")
    readers = tuple(r for r in reviewers if r)
    if len(readers) not in (1, 2) or len(set(readers)) != len(readers):
        raise ValueError("a queue is read by one reviewer, or by two different reviewers")
    if not finding_keys:
        raise ValueError("a queue needs at least one finding")
    if len(finding_keys) > MAX_QUEUE:
        raise ValueError(f"a queue holds at most {MAX_QUEUE} findings, not {len(finding_keys)}")
    if len(set(finding_keys)) != len(finding_keys):
        raise ValueError("a finding is listed twice")
    queue = Queue(
        queue_id=uuid.uuid4().hex,
        name=name,
        reviewers=readers,
        finding_keys=tuple(finding_keys),
        spec=spec,
        assigned_by=assigned_by,
        assigned_at=now or datetime.now(UTC),
    )
    row = {
        "queue_id": queue.queue_id,
        "name": queue.name,
        "reviewers": list(queue.reviewers),
        "finding_keys": list(queue.finding_keys),
        "spec": queue.spec,
        "assigned_by": queue.assigned_by,
        "assigned_at": queue.assigned_at,
    }
    part = f"{queue.assigned_at.strftime('%Y%m%dT%H%M%S%f')}-{queue.queue_id[:12]}"
    write_partition(lake, "queues", [row], part=part)
    return queue


def load_queues(lake: LakePaths) -> list[Queue]:
    """Every assigned queue, oldest first."""
    queues = [Queue.from_row(r) for r in read_table(lake, "queues").to_pylist()]
    queues.sort(key=lambda q: (q.assigned_at, q.queue_id))
    return queues


class QueueStore:
    """The lake's queues, reloaded when the table's files change."""

    def __init__(self, lake: LakePaths) -> None:
        self.lake = lake
        self._lock = threading.Lock()
        self._sig: tuple[Any, ...] | None = None
        self._queues: list[Queue] = []

    def all(self) -> list[Queue]:
        """Every queue, oldest first."""
        with self._lock:
            sig = _signature(self.lake, ("queues",))
            if sig != self._sig:
                self._queues = load_queues(self.lake)
                self._sig = sig
            return self._queues

    def get(self, queue_id: str) -> Queue | None:
        """One queue by id, or None."""
        return next((q for q in self.all() if q.queue_id == queue_id), None)

    def of(self, reviewer: str) -> list[Queue]:
        """The queues ``reviewer`` reads."""
        return [q for q in self.all() if reviewer in q.reviewers]


# --------------------------------------------------------------------------------------------
# blinding and progress
# --------------------------------------------------------------------------------------------


def decided_by(reviews: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """``{finding key: reviewers who decided it}``."""
    out: dict[str, set[str]] = {}
    for r in reviews:
        out.setdefault(str(r["finding_key"]), set()).add(str(r["reviewer"]))
    return out


def blinded_keys(
    queues: Iterable[Queue], reviews: Iterable[Mapping[str, Any]], user: str
) -> set[str]:
    """The findings whose other decisions ``user`` may not see yet: those of a two-reader
    queue ``user`` reads that not every reader of that queue has decided."""
    mine = [q for q in queues if q.two_readers and user in q.reviewers]
    if not mine:
        return set()
    done = decided_by(reviews)
    return {k for q in mine for k in q.finding_keys if not set(q.reviewers) <= done.get(k, set())}


def visible_reviews(
    reviews: Sequence[Mapping[str, Any]], user: str, queues: Iterable[Queue]
) -> list[dict[str, Any]]:
    """The decisions ``user`` may see: all but other reviewers' decisions about findings
    blinded for ``user`` (:func:`blinded_keys`)."""
    blind = blinded_keys(queues, reviews, user)
    if not blind:
        return [dict(r) for r in reviews]
    return [dict(r) for r in reviews if r["reviewer"] == user or r["finding_key"] not in blind]


def progress(queue: Queue, done: Mapping[str, set[str]], reader: str) -> tuple[int, str | None]:
    """``(decided, first open key)`` of ``reader`` in ``queue``: how many of its findings the
    reader decided (``done`` from :func:`decided_by`), and the first one not decided yet
    (None when all are)."""
    n = 0
    first: str | None = None
    for k in queue.finding_keys:
        if reader in done.get(k, ()):
            n += 1
        elif first is None:
            first = k
    return n, first


# --------------------------------------------------------------------------------------------
# reading order
# --------------------------------------------------------------------------------------------


def worklist_keys(
    findings: Sequence[Mapping[str, Any]], latest: Mapping[str, Mapping[str, Any]], q: Query
) -> list[str]:
    """Every finding key the worklist query ``q`` lists, in its order, across all pages."""
    whole = replace(q, page=1, per_page=max(len(findings), 1))
    return [str(r["finding_key"]) for r in run_query(findings, latest, whole).rows]


@dataclass(frozen=True)
class Position:
    """Where a finding is in a queue: ``index`` (0-based; None when not in it), ``total`` and
    the keys before and after it."""

    index: int | None
    total: int
    previous: str | None
    next: str | None


def neighbours(keys: Sequence[str], key: str) -> Position:
    """The :class:`Position` of ``key`` in ``keys``; not in it: next is the first key."""
    try:
        i = list(keys).index(key)
    except ValueError:
        return Position(None, len(keys), None, keys[0] if keys else None)
    return Position(
        i,
        len(keys),
        keys[i - 1] if i > 0 else None,
        keys[i + 1] if i + 1 < len(keys) else None,
    )
