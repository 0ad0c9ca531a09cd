"""Findings vs measurements in the review app, and acceptance by finding size.

Which findings rows are findings (worklist rows) and which are per-series measurements (the
series' measurements panel) is the model's registry entry's to say
(:mod:`pipeline.codes.outputs`); the registry is read afresh when its file changes, so a
corrected entry counts at once, for rows inferred before as well.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.codes.outputs import OutputRoles, output_kind, registry_outputs
from pipeline.review.format import label_name, quantity
from pipeline.review.store import Rate, by_group

__all__ = [
    "SIZE_BINS",
    "Outputs",
    "acceptance_by_size",
    "diameter_mm",
    "metrics_extras",
    "series_panel",
    "size_bin",
]

#: Finding size bins (largest diameter, mm), as nodule guidelines group them.
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("< 6 mm", 0.0, 6.0),
    ("6–10 mm", 6.0, 10.0),
    ("10–20 mm", 10.0, 20.0),
    ("≥ 20 mm", 20.0, math.inf),
)
UNKNOWN_SIZE = "size unknown"


class Outputs:
    """What each findings row is (``finding``, ``measurement``, ``class_score``), by the
    registry at ``registry`` (None: ``configs/models.yaml``)."""

    def __init__(self, registry: Path | None) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._sig: tuple[Any, ...] | None = None
        self._roles: dict[tuple[str | None, str], OutputRoles] = {}

    def _signature(self) -> tuple[Any, ...]:
        from pipeline.codes import default_registry_path

        path = self.registry or default_registry_path()
        try:
            st = path.stat()
        except OSError:
            return (str(path),)
        return (str(path), st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        """Forget the roles read when the registry file changed (one stat)."""
        sig = self._signature()
        with self._lock:
            if sig != self._sig:
                self._roles.clear()
                self._sig = sig

    def _roles_of(self, entry: str | None, model: str) -> OutputRoles:
        key = (entry, model)
        with self._lock:
            roles = self._roles.get(key)
        if roles is None:
            roles = registry_outputs(self.registry, entry=entry, model=model)
            with self._lock:
                self._roles[key] = roles
        return roles

    def roles(self, entry: str | None, model: str) -> OutputRoles:
        """The roles of the model a row names (its registry entry, else its bundle name)."""
        self._refresh()
        return self._roles_of(entry, model)

    def _kind(self, f: Mapping[str, Any]) -> str:
        roles = self._roles_of(f.get("model_entry"), str(f.get("model") or ""))
        return output_kind(
            roles,
            str(f.get("label") or ""),
            task=f.get("task"),
            box=bool(f.get("box_mm")),
            predicted=f.get("predicted"),
        )

    def kind(self, f: Mapping[str, Any]) -> str:
        """``finding``, ``measurement`` or ``class_score`` of one catalogue row."""
        self._refresh()
        return self._kind(f)

    def split(
        self, rows: Iterable[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(findings, measurements)`` of catalogue rows (class scores in neither)."""
        self._refresh()
        findings: list[dict[str, Any]] = []
        measured: list[dict[str, Any]] = []
        for f in rows:
            kind = self._kind(f)
            if kind == "finding":
                findings.append(dict(f))
            elif kind == "measurement":
                measured.append(dict(f))
        return findings, measured


def series_panel(measured: Sequence[Mapping[str, Any]], series: str) -> list[dict[str, str]]:
    """The measurements panel of one series: one row per (model version, tissue class) with
    its volume (mL), mean density (HU) and voxel count, readable."""
    rows = [m for m in measured if m.get("SeriesInstanceUID") == series]
    rows.sort(key=lambda m: (str(m["model"]), str(m["model_version"]), str(m["label"])))
    return [
        {
            "model": f"{m['model']}@{m['model_version']}",
            "name": label_name(str(m["label"])),
            "volume": quantity(m.get("volume_ml"), "ml"),
            "mean_hu": quantity(m.get("mean_hu"), "[hnsf'U]"),
            "voxels": quantity(m.get("voxel_count")),
            "key": str(m["finding_key"]),
        }
        for m in rows
    ]


def diameter_mm(f: Mapping[str, Any]) -> float | None:
    """A finding's size as one diameter (mm): its measured diameter (candidates), else the
    largest side of its box (detections), else the diameter of a ball of its volume."""
    try:
        raw = json.loads(f.get("measurements") or "{}")
    except ValueError:
        raw = {}
    d = raw.get("diameter_mm") if isinstance(raw, dict) else None
    if isinstance(d, dict) and isinstance(d.get("value"), int | float):
        return float(d["value"])
    size = f.get("size_mm")
    if size:
        return float(max(size))
    vol = f.get("volume_ml")
    if isinstance(vol, int | float) and vol > 0:
        return float((6.0 * vol * 1000.0 / math.pi) ** (1.0 / 3.0))
    return None


def size_bin(d: float | None) -> str:
    """The :data:`SIZE_BINS` name of a diameter (mm), or ``size unknown``."""
    if d is None:
        return UNKNOWN_SIZE
    for name, lo, hi in SIZE_BINS:
        if lo <= d < hi:
            return name
    return UNKNOWN_SIZE


def acceptance_by_size(
    findings: Iterable[Mapping[str, Any]], latest: Mapping[str, Mapping[str, Any]]
) -> dict[str, Rate]:
    """Acceptance of reviewed findings by size bin, bins in size order (empty ones left
    out; ``size unknown`` last)."""
    pairs = [
        (size_bin(diameter_mm(f)), str(latest[f["finding_key"]]["decision"]))
        for f in findings
        if f["finding_key"] in latest
    ]
    rates = by_group(pairs)
    order = [name for name, _, _ in SIZE_BINS] + [UNKNOWN_SIZE]
    return {name: rates[name] for name in order if name in rates}


def metrics_extras(
    findings: Sequence[Mapping[str, Any]],
    latest: Mapping[str, Mapping[str, Any]],
    reviews: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (model, model version), what the metrics page adds to :class:`VersionMetrics`:
    ``sizes`` (acceptance by size bin), ``size_plot`` (its bar chart, PNG bytes, when any
    finding was decided) and ``agreement`` (:class:`pipeline.review.readers.Agreement`, when
    findings were read by two readers, else None)."""
    from pipeline.review.readers import reader_agreement
    from pipeline.review.render import rate_plot

    agreement = reader_agreement(findings, reviews)
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for f in findings:
        groups.setdefault((str(f["model"]), str(f["model_version"])), []).append(f)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for version, rows in groups.items():
        sizes = acceptance_by_size(rows, latest)
        out[version] = {
            "sizes": sizes,
            "size_plot": rate_plot(sizes, "Acceptance by finding size (diameter)")
            if any(r.decided for r in sizes.values())
            else None,
            "agreement": agreement.get(version),
        }
    return out
