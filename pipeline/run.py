"""``pacsflow run``: every enabled stage in order, incremental, one lock per lake, one manifest.

crawl -> deid -> verify -> tensors -> infer -> writeback, each as its own stage function with
the same configuration, in one run manifest (config, versions, model hashes, per-stage counts
and timings). Each stage is incremental on its own (unchanged objects, series with tensors,
volumes with findings for the same model, objects confirmed at the destination are skipped),
so a nightly run does only what is new and a killed run rerun resumes.

The run stops at the first stage that fails and says why in one line (:class:`RunFailed`):
a stage error, counts that do not reconcile, a leak found by verify, or write-back objects
left pending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import PacsflowError
from pipeline.lake import LakePaths, StageCounts

logger = logging.getLogger(__name__)

__all__ = ["RunFailed", "RunSummary", "run_pipeline"]

ProgressFactory = Callable[[str], Any]  # stage name -> context manager yielding advance(n)


class RunFailed(PacsflowError):
    """A stage of ``pacsflow run`` failed; the message is the one-line reason."""


@dataclass
class RunSummary:
    """What ``pacsflow run`` did: per stage its counts, and the lines to print."""

    run_id: str
    stages: dict[str, StageCounts] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    leaks: int = 0


def run_pipeline(
    cfg: PipelineConfig,
    *,
    key: bytes,
    rec: Any,
    client: Any = None,
    progress: ProgressFactory | None = None,
) -> RunSummary:
    """Run the enabled stages into ``cfg.lake`` under the recorder ``rec`` (a
    :class:`pipeline.lake.RunRecorder`, already entered, the lake lock held by the caller)."""
    import contextlib

    assert cfg.lake is not None
    lake: LakePaths = rec.lake  # carries the keys (a lake encrypted at rest needs them)
    summary = RunSummary(rec.run_id)
    stages = cfg.run

    def bar(name: str) -> Any:
        return progress(name) if progress else contextlib.nullcontext(None)

    def record(name: str, counts: StageCounts, line: str, *, restricted: bool = False) -> None:
        summary.stages[name] = counts
        summary.lines.append(line)
        if restricted:
            rec.restricted_stage(name, counts)
        else:
            rec.stage(name, counts)
        if not counts.reconciles:
            raise RunFailed(
                f"{name}: counts do not reconcile (seen {counts.seen} != out {counts.out} + "
                f"quarantined {counts.quarantined} + skipped {counts.skipped})"
            )

    def stage(name: str, func: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            func()
        except RunFailed:
            raise
        except PacsflowError as exc:
            raise RunFailed(f"{name}: {type(exc).__name__}: {exc}") from exc
        logger.info("run %s: %s done in %.1f s", rec.run_id, name, time.perf_counter() - t0)

    if stages.crawl:

        def crawl() -> None:
            from pipeline.connectors import open_source
            from pipeline.crawl import run as crawl_run

            if not cfg.source.uri:
                raise RunFailed("crawl: no source.uri in the config (or switch run.crawl off)")
            source = open_source(
                cfg.source.uri,
                cfg.source,
                follow_symlinks=cfg.crawl.follow_symlinks,
                cache_dir=lake.restricted / "cache",
            )
            with bar("crawl") as advance:
                r = crawl_run(cfg, lake, source, run_id=rec.run_id, client=client, progress=advance)
            c = r.counts
            record(
                "crawl",
                c,
                f"crawl: {c.seen} objects, {c.out} indexed, {c.quarantined} "
                f"quarantined, {c.skipped} unchanged in {c.seconds:.1f} s",
                restricted=True,
            )

        stage("crawl", crawl)
    if stages.deid:

        def deid() -> None:
            from pipeline.deid.stage import run as deid_run

            with bar("deid") as advance:
                r = deid_run(cfg, lake, key=key, run_id=rec.run_id, client=client, progress=advance)
            c = r.counts
            record(
                "deid",
                c,
                f"deid: {c.seen} objects, {c.out} de-identified, {c.quarantined} "
                f"quarantined in {c.seconds:.1f} s",
                restricted=True,
            )

        stage("deid", deid)
    if stages.verify:

        def verify() -> None:
            from pipeline.deid.verify import verify as verify_lake

            leaks = verify_lake(lake, key)
            rec.audit.append("verify", run_id=rec.run_id, leaks=len(leaks))
            summary.leaks = len(leaks)
            summary.lines.append(f"verify: leaks found = {len(leaks)}")
            if leaks:
                raise RunFailed(f"verify: {len(leaks)} identifying value(s) reached research/")

        stage("verify", verify)
    if stages.tensors:

        def tensors() -> None:
            from pipeline.tensors.stage import run as tensors_run

            with bar("tensors") as advance:
                r = tensors_run(cfg, lake, run_id=rec.run_id, client=client, progress=advance)
            c = r.counts
            record(
                "tensors",
                c,
                f"tensors: {c.seen} objects, {c.extra.get('volumes', 0)} "
                f"volumes stored, {c.extra.get('refused_series', 0)} series refused in "
                f"{c.seconds:.1f} s",
                restricted=True,
            )

        stage("tensors", tensors)
    if stages.infer:

        def infer() -> None:
            from pipeline.infer.stage import run as infer_run

            if not any(lake.table("tensors").rglob("*.parquet")):
                summary.lines.append("infer: no volumes yet, nothing to do")
                return
            with bar("infer") as advance:
                r = infer_run(cfg, lake, run_id=rec.run_id, client=client, progress=advance)
            c = r.counts
            record(
                "infer",
                c,
                f"infer: {r.model_ref} over {c.seen} volumes, "
                f"{c.extra.get('findings', 0)} findings rows in {c.seconds:.1f} s",
            )

        stage("infer", infer)
    if stages.writeback and cfg.writeback.dest:

        def writeback() -> None:
            from pipeline.writeback.stage import run as writeback_run

            def audit(**counts: Any) -> None:
                rec.audit.append("reidentified", run_id=rec.run_id, stage="writeback", **counts)

            assert cfg.writeback.dest is not None
            with bar("writeback") as advance:
                r = writeback_run(
                    cfg,
                    lake,
                    run_id=rec.run_id,
                    dest=cfg.writeback.dest,
                    key=key,
                    progress=advance,
                    audit=audit,
                )
            e = r.counts.extra
            record(
                "writeback",
                r.counts,
                f"writeback: {e.get('groups', 0)} volumes, "
                f"{e.get('built', 0)} objects built, {e.get('confirmed', 0)} confirmed, "
                f"{e.get('skipped', 0)} already there, {e.get('failed', 0)} volumes refused "
                f"(see the log) in {r.counts.seconds:.1f} s",
            )
            if r.pending:
                raise RunFailed(
                    f"writeback: {len(r.pending)} object(s) not confirmed at the destination; "
                    "rerun to send them"
                )

        stage("writeback", writeback)
    elif stages.writeback:
        summary.lines.append("writeback: no writeback.dest in the config, skipped")
    return summary
