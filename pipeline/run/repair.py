"""``pacsflow repair``: rebuild damaged table files from the restricted zone, where possible.

What :func:`pipeline.lake.integrity.check` finds damaged (``full``: every checksum):

- ``instances``: the damaged files leave the table (one overwrite commit of the other files'
  rows), every object the vault holds without a row is de-identified again from its source
  (the archive or PACS it was crawled from; deterministic, so the same row), and ``series``,
  ``studies`` and ``patients`` are rebuilt;
- ``series``, ``studies``, ``patients``: rebuilt from ``instances``;
- anything else cannot be rebuilt here, and the report says what to do: ``tensors`` and
  ``findings`` (rerun `tensors`/`infer` on a fresh lake, or restore from a backup),
  ``reviews`` (reviewers' decisions exist nowhere else: restore from a backup), and the
  restricted tables (``index``, ``units``, ``quarantine``: crawl into a fresh lake; ``vault``,
  ``outbox``, ``lineage``: restore from a backup).

The damaged files that were rebuilt are moved to ``restricted/damaged/`` (for inspection; out
of ``research/``, which ``verify`` scans). Older versions of a table keep naming them: reading
the table as of an earlier run (``sql --as-of``) fails on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline.config import PipelineConfig
from pipeline.lake import LakePaths
from pipeline.lake.integrity import Damage, check

logger = logging.getLogger(__name__)

__all__ = ["RepairReport", "repair"]

_AGGREGATES = ("series", "studies", "patients")
_HOW = {
    "tensors": "rerun `pacsflow tensors` on a fresh lake, or restore the file from a backup",
    "findings": "rerun `pacsflow infer` on a fresh lake, or restore the file from a backup",
    "reviews": "reviewers' decisions exist nowhere else: restore the file from a backup",
    "queues": "review queues exist nowhere else: restore the file from a backup, or assign again",
    "corrections": "reviewers' corrected masks exist nowhere else: restore from a backup",
    "vault": "the way back to the originals exists nowhere else: restore it from a backup",
    "outbox": "restore it from a backup (or write back again into a fresh lake)",
}


@dataclass
class RepairReport:
    """What :func:`repair` found and did: lines to print, and what it could not rebuild."""

    damaged: list[Damage] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    unrepaired: list[Damage] = field(default_factory=list)


def repair(cfg: PipelineConfig, lake: LakePaths, *, key: bytes, run_id: str) -> RepairReport:
    """Check every table file against its checksum and rebuild what can be rebuilt (see the
    module docstring). Take the lake's lock first."""
    from pipeline.deid.stage import rebuild_aggregates, rebuild_instances

    report = RepairReport(damaged=check(lake, full=True))
    if not report.damaged:
        report.lines.append("repair: every table file matches its recorded checksum")
        return report
    by_table: dict[str, list[Damage]] = {}
    for d in report.damaged:
        by_table.setdefault(d.table, []).append(d)
    rebuilt: list[Damage] = []
    blocked = sorted({"index", "vault"} & set(by_table))
    if blocked:  # instances rows are rebuilt from these: not now
        for name in ("instances", *_AGGREGATES):
            for d in by_table.pop(name, []):
                report.unrepaired.append(d)
                report.lines.append(
                    f"repair: cannot rebuild {d.path} (table {name}) while the restricted "
                    f"table(s) {', '.join(blocked)} it is rebuilt from are damaged"
                )
    if "instances" in by_table:
        rebuilt.extend(by_table["instances"])
        files = [lake.root / d.path for d in by_table.pop("instances")]
        r = rebuild_instances(cfg, lake, key=key, run_id=run_id, damaged=files)
        report.lines.append(
            f"repair: instances: {len(files)} damaged file(s) dropped, {r.rows_kept} rows "
            f"kept, {r.rebuilt} object(s) de-identified again from the restricted zone"
            + (f", {r.failed} could not be (their source is unreadable)" if r.failed else "")
            + "; series, studies and patients rebuilt"
        )
        for name in _AGGREGATES:
            rebuilt.extend(by_table.pop(name, []))
    if any(name in by_table for name in _AGGREGATES):
        for name in _AGGREGATES:
            rebuilt.extend(by_table.pop(name, []))
        rebuild_aggregates(lake)
        report.lines.append("repair: series, studies and patients rebuilt from instances")
    for d in rebuilt:  # out of research/: no table version needs it now
        aside = lake.restricted / "damaged" / d.path
        aside.parent.mkdir(parents=True, exist_ok=True)
        (lake.root / d.path).replace(aside)
    if rebuilt:
        report.lines.append(
            f"repair: {len(rebuilt)} damaged file(s) moved to "
            f"{(lake.restricted / 'damaged').relative_to(lake.root)}/ (earlier versions that "
            "name them cannot be read as of their runs)"
        )
    for name, damaged in sorted(by_table.items()):
        how = _HOW.get(name, "crawl the archive into a fresh lake, or restore from a backup")
        for d in damaged:
            report.unrepaired.append(d)
            report.lines.append(f"repair: cannot rebuild {d.path} (table {name}): {how}")
    after = check(lake, full=True)
    left = {d.path for d in after} - {d.path for d in report.unrepaired}
    if left:
        report.unrepaired.extend(d for d in after if d.path in left)
        report.lines.append(f"repair: {len(left)} file(s) still damaged after the rebuild")
    return report
