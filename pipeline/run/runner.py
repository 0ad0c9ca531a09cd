"""The one runner: every command that runs stages runs them here.

:func:`run_stages` does, in order:

1. opens the lake as a lake of the key (or, for a command that crawls, makes a new one), and
   takes its lock (:func:`pipeline.lake.lock.lake_lock`): one run per lake at a time,
   whether ``pacsflow run`` or a single stage; a second is refused at once with who holds it;
2. marks the manifests of runs whose process died ``abandoned`` (holding the lock, no other
   run is alive) with an audit record each;
3. records the run (:class:`pipeline.lake.RunRecorder`: manifest, audit), opens the Dask
   client, and builds the one :class:`~pipeline.run.stages.StageContext`;
4. runs each stage: its progress (with totals, rate and ETA where the stage knows its
   total), its counts into the manifest (a stage that read the identified zone also audited
   as ``restricted_read``), the check that the counts reconcile, and the stage's own verdict
   (leaks, objects left pending) -- any of them fails the run (:class:`RunFailed`);
5. cancellation: the first SIGINT or SIGTERM stops the stage where it is (no new batch is
   submitted, batches in flight are dropped; what finished is kept, a rerun resumes), the
   manifest says ``cancelled`` and :class:`pipeline.errors.Cancelled` reaches the command,
   which exits 130 (SIGINT) or 143 (SIGTERM). A second signal stops at once: the manifest is
   marked, the worker processes are killed and the process exits without unwinding.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pipeline.config import PipelineConfig, config_hash, manifest_config
from pipeline.errors import Cancelled, PacsflowError
from pipeline.lake import LakePaths, RunRecorder, StageCounts, mark_abandoned
from pipeline.lake.audit import AuditLog
from pipeline.lake.identity import open_lake
from pipeline.lake.integrity import check as check_files
from pipeline.lake.integrity import damage_line
from pipeline.lake.keys import LakeKeys
from pipeline.lake.lock import lake_lock
from pipeline.lake.space import free_by_mount, no_space_error, no_space_in
from pipeline.run.stages import (
    ProgressFactory,
    Stage,
    StageContext,
    StageOutcome,
    _no_progress,
)

logger = logging.getLogger(__name__)

__all__ = ["RunFailed", "RunSummary", "run_stages"]

ClientFactory = Callable[[PipelineConfig], contextlib.AbstractContextManager[Any]]


@dataclass
class RunSummary:
    """What a run did: per stage its counts and outcome, and the lines to print."""

    run_id: str
    manifest: str
    stages: dict[str, StageCounts] = field(default_factory=dict)
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)

    @property
    def leaks(self) -> int:
        """Identifying values verify found (0 when verify did not run)."""
        verify = self.stages.get("verify")
        return int(verify.extra.get("leaks", 0)) if verify else 0


class RunFailed(PacsflowError):
    """A stage of the run failed; the message is the one-line reason, ``summary`` what the
    run did up to there (its lines are worth printing before the reason)."""

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


class _Cancellation:
    """SIGINT/SIGTERM handling for one run (installed only in the main thread).

    The first signal sets :attr:`signum`; inside :meth:`interruptible` (a stage running) it
    raises :class:`Cancelled` there and then, elsewhere (the runner's own bookkeeping) the
    runner raises it at the next :meth:`check`. A second signal calls :meth:`_stop_now`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._interruptible = False
        self.recorder: RunRecorder | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self._stop_now(signum)
        self.signum = signum
        name = signal.Signals(signum).name
        logger.warning(
            "%s: cancelling the run; finished batches are kept (send it again to stop at once)",
            name,
        )
        if self._interruptible:
            self._interruptible = False
            raise Cancelled(signum)

    def _stop_now(self, signum: int) -> None:
        name = signal.Signals(signum).name
        with contextlib.suppress(Exception):
            sys.stderr.write(f"pacsflow: {name} again: stopping at once\n")
            sys.stderr.flush()
        if self.recorder is not None:
            with contextlib.suppress(Exception):
                self.recorder.cancel_now(name)
        for child in multiprocessing.active_children():
            with contextlib.suppress(Exception):
                child.kill()
        os._exit(128 + signum)

    def check(self) -> None:
        """Raise :class:`Cancelled` when a signal came."""
        if self.signum is not None:
            raise Cancelled(self.signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A region a signal may interrupt at once (a stage's work)."""
        self.check()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False
        self.check()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM for the block (the main thread only: elsewhere Python
        cannot install handlers, and the caller keeps its own)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _no_client(_cfg: PipelineConfig) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext(None)


def run_stages(
    cfg: PipelineConfig,
    keys: LakeKeys,
    command: str,
    stages: Sequence[Stage],
    *,
    create: bool = False,
    client: ClientFactory = _no_client,
    progress: ProgressFactory | None = None,
    options: dict[str, Any] | None = None,
) -> RunSummary:
    """Run ``stages`` in order on ``cfg.lake`` as one recorded run of ``command`` (see the
    module docstring).

    Args:
        cfg: the configuration (``cfg.lake`` must be set).
        keys: the lake's keys.
        command: what the manifest and the audit log call the run (``run``, ``crawl``...).
        stages: what to run, in order.
        create: make the lake when missing or empty (commands that crawl).
        client: config -> context manager yielding the Dask client (or None).
        progress: stage name -> progress context; None: no progress display.
        options: per-command choices for the stages (``model``, ``dest``, ``source``).

    Raises:
        pipeline.lake.identity.LakeIdentityError: not a lake of ``keys`` (a ConfigError).
        pipeline.errors.LakeError: another live process holds the lake's lock.
        RunFailed: a stage failed; its counts so far are in the manifest.
        pipeline.errors.Cancelled: SIGINT/SIGTERM; the manifest says ``cancelled``.
    """
    if cfg.lake is None:
        raise PacsflowError("no lake: pass --lake LAKE or set `lake:` in the config")
    paths = LakePaths(cfg.lake, keys=keys)
    open_lake(paths, keys, create=create, encrypted=cfg.encrypt_at_rest)  # before any write
    cancel = _Cancellation()
    with lake_lock(paths, command), cancel.installed():
        abandoned = mark_abandoned(paths, AuditLog(paths, keys, witness=cfg.audit.witness))
        for run_id in abandoned:
            logger.warning("run %s did not finish (its process died): marked abandoned", run_id)
        rec = RunRecorder(
            paths,
            command,
            keys=keys,
            witness=cfg.audit.witness,
            create=create,
            encrypted=cfg.encrypt_at_rest,
            config_hash=config_hash(cfg),
            config=manifest_config(cfg),
        )
        with rec:
            cancel.recorder = rec
            summary = RunSummary(rec.run_id, str(rec.path), abandoned=abandoned)
            try:
                with cancel.interruptible(), contextlib.ExitStack() as clients:
                    ctx = StageContext(
                        cfg=cfg,
                        keys=keys,
                        lake=rec.lake,
                        recorder=rec,
                        progress=progress or _no_progress,
                        options=dict(options or {}),
                        open_client=lambda: clients.enter_context(client(cfg)),
                    )
                    for stage in stages:
                        _run_one(stage, ctx, summary, cancel)
            except Cancelled as exc:
                exc.run_id = rec.run_id  # type: ignore[attr-defined]
                raise
            finally:
                cancel.recorder = None
    return summary


def _run_one(stage: Stage, ctx: StageContext, summary: RunSummary, cancel: _Cancellation) -> None:
    reason = stage.skip(ctx)
    if reason is not None:
        summary.lines.append(reason)
        return
    damaged = check_files(ctx.lake, [*stage.reads, *stage.writes])
    if damaged:  # before the stage reads a file that is not what was committed
        raise RunFailed(f"{stage.name}: {damage_line(damaged)}", summary)
    t0 = time.perf_counter()
    writes_to = [ctx.lake.root, *(Path(p) for p in (ctx.cfg.deid.export_dicom,) if p)]
    free_before = free_by_mount(writes_to)
    try:
        outcome = stage.run(ctx)
    except Cancelled:
        raise
    except BaseException as exc:
        if cancel.signum is not None:
            # the signal's Cancelled surfaced as a library's own error (DuckDB turns an
            # exception raised in a signal handler during a query into its InterruptException)
            raise Cancelled(cancel.signum) from exc
        if isinstance(exc, RunFailed):
            raise
        full = no_space_in(exc)
        if full is not None:  # not a bug: say which disk, and that a rerun resumes
            raise no_space_error(full, *writes_to, free_before=free_before) from exc
        if isinstance(exc, PacsflowError):
            raise RunFailed(f"{stage.name}: {type(exc).__name__}: {exc}", summary) from exc
        raise
    # the bookkeeping below is not interrupted half way: a signal now waits for check()
    cancel._interruptible = False
    c = outcome.counts
    summary.stages[stage.name] = c
    summary.outcomes[stage.name] = outcome
    summary.lines.append(outcome.line)
    summary.lines.extend(outcome.report)
    if stage.restricted:
        ctx.recorder.restricted_stage(stage.name, c)
    else:
        ctx.recorder.stage(stage.name, c)
    logger.info("run %s: %s done in %.1f s", ctx.run_id, stage.name, time.perf_counter() - t0)
    if not c.reconciles:
        raise RunFailed(
            f"{stage.name}: counts do not reconcile (seen {c.seen} != out {c.out} + "
            f"quarantined {c.quarantined} + skipped {c.skipped})",
            summary,
        )
    if outcome.problem:
        raise RunFailed(outcome.problem, summary)
    cancel.check()
    cancel._interruptible = True
