"""The worklist by study: findings grouped by pseudonymous patient, study and series, with
counts, descriptions and what each sampling mode means.

Research zone only: patient tokens, study pseudonyms, shifted dates, and the study and series
descriptions the de-identification kept (``clean_descriptors``; none where it removed them).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from pipeline.lake.duck import arrow_table, connect
from pipeline.lake.paths import LakePaths
from pipeline.lake.queries import review_descriptions
from pipeline.review.store import _positive, _signature

__all__ = [
    "Descriptions",
    "SeriesGroup",
    "StudyGroup",
    "explain_sampling",
    "group_by_study",
    "study_order",
]


class Descriptions:
    """Series and study descriptions by series pseudonym, reloaded when ``instances``
    changes."""

    def __init__(self, lake: LakePaths) -> None:
        self.lake = lake
        self._lock = threading.Lock()
        self._sig: tuple[Any, ...] | None = None
        self._by_series: dict[str, dict[str, str | None]] = {}

    def get(self) -> dict[str, dict[str, str | None]]:
        """series pseudonym -> ``{"SeriesDescription", "StudyDescription"}``."""
        with self._lock:
            sig = _signature(self.lake, ("instances",))
            if sig != self._sig:
                self._by_series = {}
                if sig:
                    q = review_descriptions(self.lake)
                    con = connect()
                    try:
                        rows = arrow_table(con, q.sql, q.params).to_pylist()
                    finally:
                        con.close()
                    self._by_series = {
                        r["SeriesInstanceUID"]: {
                            "SeriesDescription": r["SeriesDescription"],
                            "StudyDescription": r["StudyDescription"],
                        }
                        for r in rows
                    }
                self._sig = sig
            return self._by_series


def _study_key(f: Mapping[str, Any]) -> tuple[Any, ...]:
    when = f.get("StudyDate") or f.get("SeriesDate")
    return (
        str(f.get("patient_token") or "~"),
        when.isoformat() if isinstance(when, date) else "~",
        str(f.get("StudyInstanceUID") or "~"),
    )


def study_order(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``rows`` ordered by patient, study date, study, series number, series (stable: within a
    series, the given order), so a study's findings come together on the worklist."""
    return sorted(
        rows,
        key=lambda f: (
            *_study_key(f),
            f.get("SeriesNumber") if isinstance(f.get("SeriesNumber"), int) else 10**9,
            str(f.get("SeriesInstanceUID") or ""),
        ),
    )


@dataclass
class SeriesGroup:
    """The worklist rows of one series."""

    series: str
    number: int | None
    description: str | None
    modality: str | None
    manufacturer: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StudyGroup:
    """The worklist rows of one study, by series, and the study's counts."""

    patient_token: str | None
    study: str | None
    study_date: date | None
    description: str | None
    findings: int  # findings of the study (all, not only those on this page)
    decided: int  # of those, with a decision
    series: list[SeriesGroup] = field(default_factory=list)

    @property
    def shown(self) -> int:
        """Rows of this study on the page."""
        return sum(len(s.rows) for s in self.series)

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series if s.modality})

    @property
    def manufacturers(self) -> list[str]:
        return sorted({s.manufacturer or "unknown" for s in self.series})


def group_by_study(
    rows: Sequence[Mapping[str, Any]],
    findings: Sequence[Mapping[str, Any]],
    latest: Mapping[str, Mapping[str, Any]],
    descriptions: Mapping[str, Mapping[str, str | None]],
) -> list[StudyGroup]:
    """The page's ``rows`` as study groups (consecutive rows of one study make one group, in
    the page's order), with each study's counts over all its ``findings``."""
    counts: dict[tuple[Any, ...], list[int]] = {}
    for f in findings:
        c = counts.setdefault(_study_key(f), [0, 0])
        c[0] += 1
        c[1] += f["finding_key"] in latest
    groups: list[StudyGroup] = []
    for r in rows:
        key = _study_key(r)
        desc = descriptions.get(str(r.get("SeriesInstanceUID")), {})
        if not groups or _study_key(groups[-1].series[0].rows[0]) != key:
            n = counts.get(key, [0, 0])
            groups.append(
                StudyGroup(
                    patient_token=r.get("patient_token"),
                    study=r.get("StudyInstanceUID"),
                    study_date=r.get("StudyDate") or r.get("SeriesDate"),
                    description=desc.get("StudyDescription"),
                    findings=n[0],
                    decided=n[1],
                )
            )
        g = groups[-1]
        series = str(r.get("SeriesInstanceUID") or "")
        if not g.series or g.series[-1].series != series:
            g.series.append(
                SeriesGroup(
                    series=series,
                    number=r.get("SeriesNumber"),
                    description=desc.get("SeriesDescription"),
                    modality=r.get("Modality"),
                    manufacturer=r.get("Manufacturer"),
                )
            )
        g.series[-1].rows.append(dict(r))
    return groups


def _rule(rows: Sequence[Mapping[str, Any]]) -> str:
    """What makes a finding of one model positive, said in words (each kind of its rows)."""
    said = []
    if any(r.get("box_mm") for r in rows):
        said.append("a detected box (only boxes above the detector's score threshold are kept)")
    if any(r.get("task") == "classification" for r in rows):
        said.append("the predicted class of the image")
    if any(not r.get("box_mm") and r.get("task") != "classification" for r in rows):
        said.append("a mask with at least one voxel (negative: nothing of that label found)")
    return "; or ".join(said)


def explain_sampling(
    kept: Sequence[Mapping[str, Any]], mode: str, percent: float, seed: int, shown: int
) -> dict[str, Any]:
    """What the sampling mode ``mode`` did to the ``kept`` (filtered) findings: a sentence,
    and per model what a positive is, with counts."""
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for f in kept:
        by_model.setdefault(f"{f['model']}@{f['model_version']}", []).append(f)
    models: list[dict[str, Any]] = []
    for name, rows in sorted(by_model.items()):
        pos = sum(1 for r in rows if _positive(r))
        models.append(
            {"model": name, "rule": _rule(rows), "positives": pos, "negatives": len(rows) - pos}
        )
    pos = sum(int(m["positives"]) for m in models)
    neg = len(kept) - pos
    scored = sum(1 for f in kept if f.get("score") is not None)
    text = {
        "all": f"Every finding that matches the filters: {len(kept)}.",
        "positives": f"Positives only: {pos} of the {len(kept)} findings that match the "
        "filters say something is there.",
        "negatives": f"A random {percent:g}% of the {neg} negatives (rounded up), chosen by "
        f"seed {seed}: the same seed gives the same sample. {shown} listed.",
        "qa": f"QA sample: all {pos} positives plus a random {percent:g}% of the {neg} "
        f"negatives (seed {seed}). {shown} listed.",
        "lowest-confidence": f"Every finding, lowest score first: {scored} have a score; "
        f"{len(kept) - scored} have none (segmentation models give none): their confidence is "
        "unknown, so they come last.",
    }.get(mode, "")
    return {"mode": mode, "text": text, "models": models, "positives": pos, "negatives": neg}
