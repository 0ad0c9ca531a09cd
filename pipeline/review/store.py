"""Reviewers' decisions as data, the findings catalogue they are about, and the QA arithmetic.

Decisions are rows of the research table ``reviews`` (one row per decision, history kept: a
re-review adds a row; the latest row of a finding is its status). The catalogue joins each
finding with its volume (``tensors``), series and study (pseudonyms and shifted dates only).
The arithmetic — acceptance rates with Wilson intervals, rates by manufacturer and over time,
sampling of a worklist — is plain Python, so it is testable without a server.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa

from pipeline.lake.duck import arrow_table, connect
from pipeline.lake.io import read_table, write_partition
from pipeline.lake.paths import LakePaths
from pipeline.lake.queries import COHORT_KEYS, latest_decisions, review_catalog

__all__ = [
    "DECISIONS",
    "SAMPLING_MODES",
    "Catalog",
    "Rate",
    "acceptance",
    "by_group",
    "csv_safe",
    "history",
    "label_set",
    "latest_decisions",
    "load_reviews",
    "metrics_by_version",
    "record_decision",
    "sample",
    "wilson_interval",
]

Decision = Literal["accept", "reject", "uncertain"]
#: The decisions a reviewer can take.
DECISIONS: tuple[str, ...] = ("accept", "reject", "uncertain")
#: Worklist sampling modes: every finding; positives (voxel_count > 0); a seeded random k% of
#: the negatives; QA (all positives plus k% of negatives); lowest confidence first.
SAMPLING_MODES: tuple[str, ...] = ("all", "positives", "negatives", "qa", "lowest-confidence")


# --------------------------------------------------------------------------------------------
# decisions
# --------------------------------------------------------------------------------------------


def record_decision(
    lake: LakePaths,
    finding: Mapping[str, Any],
    *,
    reviewer: str,
    decision: str,
    corrected_label: str | None = None,
    comment: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Append one decision about ``finding`` (a findings row) to the ``reviews`` table.

    The row carries the finding's model version and tensor checksum, so a decision stays tied
    to what the model saw. Returns the row written.

    Raises
    ------
    ValueError
        For a decision other than accept, reject or uncertain, or an empty reviewer.
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    if not reviewer:
        raise ValueError("a decision needs a reviewer")
    when = now or datetime.now(UTC)
    review_id = uuid.uuid4().hex
    row = {
        "review_id": review_id,
        "finding_key": str(finding["finding_key"]),
        "model_version": finding.get("model_version"),
        "tensor_checksum": finding.get("tensor_checksum"),
        "reviewer": reviewer,
        "decision": decision,
        "corrected_label": (corrected_label or "").strip() or None,
        "comment": (comment or "").strip() or None,
        "reviewed_at": when,
        # the cohort keys of the finding (issue #24): reviews filter without a join
        **{k: finding.get(k) for k in COHORT_KEYS},
    }
    part = f"{when.strftime('%Y%m%dT%H%M%S%f')}-{review_id[:12]}"
    write_partition(lake, "reviews", [row], part=part)
    return row


def load_reviews(lake: LakePaths) -> list[dict[str, Any]]:
    """Every decision ever taken, oldest first."""
    rows = read_table(lake, "reviews").to_pylist()
    rows.sort(key=lambda r: (r["reviewed_at"], r["review_id"]))
    return rows


def history(reviews: Iterable[Mapping[str, Any]], finding_key: str) -> list[dict[str, Any]]:
    """Every decision about one finding, oldest first."""
    rows = [dict(r) for r in reviews if r["finding_key"] == finding_key]
    rows.sort(key=lambda r: (r["reviewed_at"], r["review_id"]))
    return rows


# --------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default).

    ``n == 0`` gives ``(0.0, 1.0)``: nothing is known.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class Rate:
    """Acceptance among decided findings: accepted / (accepted + rejected), with its 95% Wilson
    interval; ``uncertain`` decisions are counted as reviewed but not decided."""

    reviewed: int
    accepted: int
    rejected: int
    uncertain: int

    @property
    def decided(self) -> int:
        return self.accepted + self.rejected

    @property
    def rate(self) -> float | None:
        return self.accepted / self.decided if self.decided else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.accepted, self.decided)


def acceptance(decisions: Iterable[str]) -> Rate:
    """The :class:`Rate` of a sequence of (latest) decisions."""
    counts = {d: 0 for d in DECISIONS}
    n = 0
    for d in decisions:
        counts[d] += 1
        n += 1
    return Rate(n, counts["accept"], counts["reject"], counts["uncertain"])


def by_group(pairs: Iterable[tuple[str, str]]) -> dict[str, Rate]:
    """Rates by group from ``(group, decision)`` pairs, groups sorted."""
    groups: dict[str, list[str]] = {}
    for group, decision in pairs:
        groups.setdefault(group, []).append(decision)
    return {g: acceptance(groups[g]) for g in sorted(groups)}


@dataclass(frozen=True)
class VersionMetrics:
    """What the metrics page shows for one model version."""

    model: str
    model_version: str
    findings: int
    overall: Rate
    by_manufacturer: dict[str, Rate]
    by_month: dict[str, Rate]
    by_label: dict[str, Rate]
    scores_accepted: list[float]
    scores_rejected: list[float]


def metrics_by_version(
    findings: Sequence[Mapping[str, Any]], latest: Mapping[str, Mapping[str, Any]]
) -> list[VersionMetrics]:
    """Per (model, model version): counts, acceptance with interval, by manufacturer, by
    month of the decision, by label, and the scores of accepted vs rejected findings."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for f in findings:
        groups.setdefault((f["model"], f["model_version"]), []).append(f)
    out = []
    for (model, version), rows in sorted(groups.items()):
        reviewed = [(f, latest[f["finding_key"]]) for f in rows if f["finding_key"] in latest]
        out.append(
            VersionMetrics(
                model=model,
                model_version=version,
                findings=len(rows),
                overall=acceptance(r["decision"] for _, r in reviewed),
                by_manufacturer=by_group(
                    (f.get("Manufacturer") or "unknown", r["decision"]) for f, r in reviewed
                ),
                by_month=by_group(
                    (r["reviewed_at"].strftime("%Y-%m"), r["decision"]) for _, r in reviewed
                ),
                by_label=by_group((f["label"], r["decision"]) for f, r in reviewed),
                scores_accepted=[
                    float(f["score"])
                    for f, r in reviewed
                    if r["decision"] == "accept" and f.get("score") is not None
                ],
                scores_rejected=[
                    float(f["score"])
                    for f, r in reviewed
                    if r["decision"] == "reject" and f.get("score") is not None
                ],
            )
        )
    return out


def _draw(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _positive(f: Mapping[str, Any]) -> bool:
    """A finding that says something is there: voxels in its mask, a detected box (boxes
    exist only above the detector's threshold), or a classification's predicted class."""
    if (f.get("voxel_count") or 0) > 0:
        return True
    return bool(f.get("box_mm")) or f.get("predicted") is True


def sample(
    findings: Sequence[Mapping[str, Any]],
    mode: str,
    *,
    percent: float = 10.0,
    seed: int = 0,
) -> list[Mapping[str, Any]]:
    """The findings a sampling mode puts on the worklist, in its order.

    - ``all``: every finding, as given;
    - ``positives``: findings with ``voxel_count > 0``, detected boxes, predicted classes;
    - ``negatives``: a random ``percent`` % of the negatives (rounded up), chosen by a hash of
      ``seed`` and the finding key: the same seed gives the same sample, whatever the order of
      the input and whatever else the lake holds;
    - ``qa``: all positives plus that sample of negatives;
    - ``lowest-confidence``: findings with a score, lowest first, then those without one
      (segmentation models give none: their confidence is unknown).
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode must be one of {', '.join(SAMPLING_MODES)}")
    if not 0 <= percent <= 100:
        raise ValueError("percent must be within 0..100")
    if mode == "all":
        return list(findings)
    if mode == "lowest-confidence":
        scored = sorted(
            (f for f in findings if f.get("score") is not None),
            key=lambda f: (float(f["score"]), f["finding_key"]),
        )
        return scored + [f for f in findings if f.get("score") is None]
    positives = [f for f in findings if _positive(f)]
    if mode == "positives":
        return positives
    negatives = [f for f in findings if not _positive(f)]
    k = math.ceil(len(negatives) * percent / 100)
    chosen = {
        f["finding_key"] for f in sorted(negatives, key=lambda f: _draw(seed, f["finding_key"]))[:k]
    }
    picked = [f for f in negatives if f["finding_key"] in chosen]
    return picked if mode == "negatives" else positives + picked


def label_set(
    findings: Sequence[Mapping[str, Any]],
    latest: Mapping[str, Mapping[str, Any]],
    corrections: Mapping[str, Mapping[str, Any]] | None = None,
) -> pa.Table:
    """Accepted and rejected findings as a label set for retraining: what the model saw
    (tensor and mask, with checksums), its identity, the decision and the final label
    (a reviewer's correction, or the model's label), and the latest corrected mask of the
    finding where a reviewer drew one (``corrections``: by finding key, from
    :func:`pipeline.review.corrections.latest_corrections`; a corrected mask is 1 on the
    finding, so train on it rather than on ``mask_path == label_value``)."""
    rows = []
    for f in findings:
        r = latest.get(f["finding_key"])
        if r is None or r["decision"] not in ("accept", "reject"):
            continue
        c = (corrections or {}).get(f["finding_key"]) or {}
        rows.append(
            {
                "finding_key": f["finding_key"],
                "SeriesInstanceUID": f["SeriesInstanceUID"],
                "tensor_key": f["tensor_key"],
                "tensor_path": f.get("tensor_path"),
                "tensor_checksum": f.get("tensor_checksum"),
                "mask_path": f.get("mask_path"),
                "mask_checksum": f.get("mask_checksum"),
                "label_value": f.get("label_value"),
                "model": f["model"],
                "model_version": f["model_version"],
                "weights_sha256": f.get("weights_sha256"),
                "label": f["label"],
                "final_label": r.get("corrected_label") or f["label"],
                "decision": r["decision"],
                "reviewer": r["reviewer"],
                "reviewed_at": r["reviewed_at"],
                "review_id": r["review_id"],
                "corrected_mask_path": c.get("mask_path"),
                "corrected_mask_checksum": c.get("mask_checksum"),
                "correction_id": c.get("correction_id"),
            }
        )
    schema = pa.schema(
        [
            ("finding_key", pa.string()),
            ("SeriesInstanceUID", pa.string()),
            ("tensor_key", pa.string()),
            ("tensor_path", pa.string()),
            ("tensor_checksum", pa.string()),
            ("mask_path", pa.string()),
            ("mask_checksum", pa.string()),
            ("label_value", pa.int64()),
            ("model", pa.string()),
            ("model_version", pa.string()),
            ("weights_sha256", pa.string()),
            ("label", pa.string()),
            ("final_label", pa.string()),
            ("decision", pa.string()),
            ("reviewer", pa.string()),
            ("reviewed_at", pa.timestamp("us", tz="UTC")),
            ("review_id", pa.string()),
            ("corrected_mask_path", pa.string()),
            ("corrected_mask_checksum", pa.string()),
            ("correction_id", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


#: First characters that make a spreadsheet read a cell as a formula (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_safe(table: pa.Table) -> pa.Table:
    """``table`` with every string cell that a spreadsheet would run as a formula (one that
    starts with ``= + - @``, a tab or a line break) prefixed with a single quote, as the OWASP
    guidance on CSV injection says; write it with every string quoted.

    Examples
    --------
    >>> t = pa.table({"label": ["liver", "=SUM(A1)", "-1+2"], "n": [1, 2, 3]})
    >>> csv_safe(t).column("label").to_pylist()
    ['liver', "'=SUM(A1)", "'-1+2"]
    """
    columns = []
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            values = [
                "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v
                for v in column.to_pylist()
            ]
            column = pa.chunked_array([pa.array(values, type=column.type)], type=column.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=table.schema)


# --------------------------------------------------------------------------------------------
# the catalogue of findings
# --------------------------------------------------------------------------------------------


def _signature(lake: LakePaths, names: Sequence[str]) -> tuple[Any, ...]:
    """A cheap fingerprint of tables' files (names, sizes, mtimes), to know when to reload."""
    out: list[Any] = []
    for name in names:
        folder = lake.table(name)
        for dirpath, _dirs, files in os.walk(folder):
            for fn in sorted(files):
                if fn.endswith(".parquet"):
                    st = os.stat(os.path.join(dirpath, fn))
                    out.append((dirpath, fn, st.st_size, st.st_mtime_ns))
    return tuple(out)


class Catalog:
    """The findings joined with their volume, series and study, and the reviews; reloaded
    when the tables' files change. Research zone only: pseudonyms and shifted dates."""

    _TABLES = ("findings", "tensors", "series", "studies")

    def __init__(self, lake: LakePaths) -> None:
        self.lake = lake
        self._lock = threading.Lock()
        self._sig: tuple[Any, ...] | None = None
        self._rows: list[dict[str, Any]] = []
        self._by_key: dict[str, dict[str, Any]] = {}
        self._rsig: tuple[Any, ...] | None = None
        self._reviews: list[dict[str, Any]] = []

    def findings(self) -> list[dict[str, Any]]:
        """Every finding (latest row per finding key), sorted by key."""
        with self._lock:
            sig = _signature(self.lake, self._TABLES)
            if sig != self._sig:
                q = review_catalog(self.lake)
                con = connect()
                try:
                    self._rows = arrow_table(con, q.sql, q.params).to_pylist()
                finally:
                    con.close()
                self._by_key = {r["finding_key"]: r for r in self._rows}
                self._sig = sig
            return self._rows

    def finding(self, key: str) -> dict[str, Any] | None:
        """One finding by its key, or None."""
        self.findings()
        return self._by_key.get(key)

    def reviews(self) -> list[dict[str, Any]]:
        """Every decision, oldest first."""
        with self._lock:
            sig = _signature(self.lake, ("reviews",))
            if sig != self._rsig:
                self._reviews = load_reviews(self.lake)
                self._rsig = sig
            return self._reviews

    def latest(self) -> dict[str, dict[str, Any]]:
        """Each reviewed finding's latest decision."""
        return latest_decisions(self.reviews())
