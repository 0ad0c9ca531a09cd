"""The worklist query: filters, sampling, sorting and pagination over the findings catalogue."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import date
from typing import Any

from pipeline.review.store import SAMPLING_MODES, sample
from pipeline.review.studies import study_order

__all__ = ["SORTS", "STATUSES", "Page", "Query", "run_query"]

#: Review statuses a worklist can filter on.
STATUSES: tuple[str, ...] = ("any", "unreviewed", "reviewed", "accept", "reject", "uncertain")
#: Sort keys of the worklist ("" keeps the sampling mode's order).
SORTS: tuple[str, ...] = (
    "",
    "finding_key",
    "score",
    "voxel_count",
    "volume_ml",
    "mean_hu",
    "StudyDate",
    "label",
    "status",
)


def _float(value: str | None) -> float | None:
    """A finite number, else None (``nan``, ``inf`` and nonsense alike)."""
    if not value or len(value) > 64:
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _int(value: str | None, default: int, lo: int, hi: int) -> int:
    """A whole number clamped to ``lo..hi``; ``default`` when missing or not a number."""
    if not value or len(value) > 32:
        return default
    try:
        n = int(value)
    except ValueError:
        return default
    return min(max(n, lo), hi)


@dataclass(frozen=True)
class Query:
    """One worklist request, parsed leniently: a missing or bad value (not a number, not a
    finite number, an unknown choice) falls back to its default, numbers are clamped to their
    range, so no query string fails."""

    model: str = ""  # "model@version"
    label: str = ""
    score_min: float | None = None
    score_max: float | None = None
    date_from: date | None = None
    date_to: date | None = None
    modality: str = ""
    manufacturer: str = ""
    status: str = "any"
    sample: str = "all"
    percent: float = 10.0
    seed: int = 0
    sort: str = ""
    order: str = "asc"
    page: int = 1
    per_page: int = 50
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, params: Mapping[str, str], per_page: int = 50) -> Query:
        """A query from URL parameters."""
        status = params.get("status", "any")
        mode = params.get("sample", "all")
        sort = params.get("sort", "")
        return cls(
            model=params.get("model", ""),
            label=params.get("label", ""),
            score_min=_float(params.get("score_min")),
            score_max=_float(params.get("score_max")),
            date_from=_date(params.get("date_from")),
            date_to=_date(params.get("date_to")),
            modality=params.get("modality", ""),
            manufacturer=params.get("manufacturer", ""),
            status=status if status in STATUSES else "any",
            sample=mode if mode in SAMPLING_MODES else "all",
            percent=min(max(_or(_float(params.get("percent")), 10.0), 0.0), 100.0),
            seed=_int(params.get("seed"), 0, 0, 2**31 - 1),
            sort=sort if sort in SORTS else "",
            order="desc" if params.get("order") == "desc" else "asc",
            page=_int(params.get("page"), 1, 1, 10**9),
            per_page=_int(params.get("per_page"), per_page, 5, 1000),
        )

    def params(self, **changes: Any) -> dict[str, str]:
        """This query as URL parameters (defaults left out), with ``changes`` applied."""
        base = Query()
        out: dict[str, str] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = changes.get(f.name, getattr(self, f.name))
            if value is None or value == getattr(base, f.name):
                continue
            out[f.name] = value.isoformat() if isinstance(value, date) else str(value)
        return out


@dataclass(frozen=True)
class Page:
    """One page of the worklist."""

    rows: list[dict[str, Any]]
    total: int
    page: int
    pages: int
    unknown_confidence: int  # rows on the list without a score


def _status(key: str, latest: Mapping[str, Mapping[str, Any]]) -> str:
    r = latest.get(key)
    return str(r["decision"]) if r else "unreviewed"


def _keep(f: Mapping[str, Any], q: Query, latest: Mapping[str, Mapping[str, Any]]) -> bool:
    if q.model and f"{f['model']}@{f['model_version']}" != q.model:
        return False
    if q.label and f["label"] != q.label:
        return False
    if q.modality and (f.get("Modality") or "") != q.modality:
        return False
    if q.manufacturer and (f.get("Manufacturer") or "unknown") != q.manufacturer:
        return False
    score = f.get("score")
    if q.score_min is not None and (score is None or score < q.score_min):
        return False
    if q.score_max is not None and (score is None or score > q.score_max):
        return False
    when = f.get("StudyDate") or f.get("SeriesDate")
    if q.date_from is not None and (when is None or when < q.date_from):
        return False
    if q.date_to is not None and (when is None or when > q.date_to):
        return False
    status = _status(f["finding_key"], latest)
    if q.status == "reviewed":
        return status != "unreviewed"
    return q.status in ("any", status)


def run_query(
    findings: Sequence[Mapping[str, Any]],
    latest: Mapping[str, Mapping[str, Any]],
    q: Query,
) -> Page:
    """Filter, sample, sort and paginate. Nulls sort last whichever the order. Without a sort
    key, findings come by patient, study and series (lowest-confidence: by score)."""
    kept = [f for f in findings if _keep(f, q, latest)]
    picked = sample(kept, q.sample, percent=q.percent, seed=q.seed)
    if not q.sort and q.sample != "lowest-confidence":
        # a study's findings together, by patient and study date (issue #23 §3)
        picked = study_order(picked)
    rows = [{**f, "status": _status(f["finding_key"], latest)} for f in picked]
    if q.sort:
        present = [r for r in rows if r.get(q.sort) is not None]
        absent = [r for r in rows if r.get(q.sort) is None]
        present.sort(key=lambda r: (r[q.sort], r["finding_key"]), reverse=q.order == "desc")
        rows = present + absent
    total = len(rows)
    pages = max(1, math.ceil(total / q.per_page))
    page = min(q.page, pages)
    start = (page - 1) * q.per_page
    return Page(
        rows=rows[start : start + q.per_page],
        total=total,
        page=page,
        pages=pages,
        unknown_confidence=sum(1 for r in rows if r.get("score") is None),
    )
