"""What every CLI command shares: options, config loading, Dask client, progress, errors."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from pipeline.config import PipelineConfig, load_config
from pipeline.config.env import debug_enabled
from pipeline.errors import Cancelled, ConfigError, NoSpace, NotImplementedStage, PacsflowError

logger = logging.getLogger(__name__)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (see configs/).", show_default=False),
]
LakeOpt = Annotated[
    Path | None, typer.Option("--lake", help="Root folder of the lake.", show_default=False)
]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        help="The lake's secret key file (or key_file in the config, or env PACSFLOW_KEY_FILE).",
        show_default=False,
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="Local Dask worker processes (1: in-process)."),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option("--scheduler", help="Dask distributed scheduler address, e.g. tcp://host:8786."),
]

#: Exit codes: 0 success, 1 the stage failed (or left work failed or pending), 2 usage/config
#: error or not implemented, 3 a resource is unavailable (the review app's port is taken),
#: 4 no space left on a device (free space and rerun), 130/143 cancelled by SIGINT/SIGTERM.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NO_SPACE = 4


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print a one-line error to stderr and exit."""
    typer.echo(f"pacsflow: {message}", err=True)
    raise typer.Exit(code)


def not_implemented(verb: str, issue: int) -> NoReturn:
    """The one-line answer of a verb whose stage is not built yet (exit 2)."""
    fail(f"'{verb}' is not implemented yet (tracked in issue #{issue})", EXIT_USAGE)


def build_config(
    config: Path | None,
    *,
    lake: Path | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    extra: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Load the layered config, with CLI flags on top; config errors exit 2 with the message."""
    overrides: dict[str, Any] = dict(extra or {})
    if lake is not None:
        overrides["lake"] = str(lake)
    compute: dict[str, Any] = {}
    if workers is not None:
        compute["workers"] = workers
    if scheduler is not None:
        compute["scheduler"] = scheduler
    if compute:
        overrides["compute"] = compute
    try:
        return load_config(config, overrides=overrides, defaults=defaults)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def lake_keys(cfg: PipelineConfig, key_file: Path | None, *, required: bool = True) -> Any:
    """The :class:`pipeline.lake.keys.LakeKeys` of ``--key-file``, else ``key_file`` in the
    config, else ``PACSFLOW_KEY_FILE``; None when none is given and not ``required``. A missing
    or unreadable key file exits 2 with the reason."""
    from pipeline.config.env import key_file_from_env
    from pipeline.lake.keys import LakeKeys, load_key

    path = key_file or cfg.key_file or key_file_from_env()
    if path is None and not required:
        return None
    try:
        return LakeKeys(load_key(path))
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def open_lake_or_fail(cfg: PipelineConfig, keys: Any, *, create: bool = False) -> Any:
    """The lake of ``cfg`` checked by :func:`pipeline.lake.identity.open_lake` (not a lake,
    a newer format or another key exit 2 with one line); returns its ``LakePaths``, carrying
    ``keys``. A lake it creates is encrypted at rest as ``cfg.encrypt_at_rest`` says."""
    from pipeline.lake import LakePaths
    from pipeline.lake.identity import LakeIdentityError, open_lake

    if cfg.lake is None:
        fail("no lake: pass --lake LAKE or set `lake:` in the config", EXIT_USAGE)
    paths = LakePaths(cfg.lake, keys=keys)
    try:
        open_lake(paths, keys, create=create, encrypted=cfg.encrypt_at_rest)
    except LakeIdentityError as exc:
        fail(str(exc), EXIT_USAGE)
    return paths


def audit_log(cfg: PipelineConfig, paths: Any, keys: Any) -> Any:
    """The lake's :class:`pipeline.lake.AuditLog` with the configured witness."""
    from pipeline.lake import AuditLog

    return AuditLog(paths, keys, witness=cfg.audit.witness)


def _configure_worker_logging(client: Any) -> None:
    """Give every worker (present and future) the CLI's logging setup, so no worker prints PHI."""
    from distributed.diagnostics.plugin import WorkerPlugin

    from pipeline.cli._logging import setup_logging

    root_level = logging.getLogger("pipeline").getEffectiveLevel()

    class _Logging(WorkerPlugin):
        name = "pacsflow-logging"

        def setup(self, worker: Any) -> None:
            setup_logging(logging.getLevelName(root_level))

    client.register_plugin(_Logging(), name="pacsflow-logging")


@contextlib.contextmanager
def dask_client(cfg: PipelineConfig) -> Iterator[Any]:
    """The Dask client a stage should use: a remote scheduler, a local cluster, or None.

    ``compute.scheduler`` set: connect to it. ``compute.workers > 1``: start a local cluster of
    that many worker processes on loopback (closed afterwards). Otherwise None: run in-process.
    """
    if cfg.compute.scheduler:
        from distributed import Client

        with Client(cfg.compute.scheduler, timeout="30s") as client:
            _configure_worker_logging(client)
            logger.info("using Dask scheduler %s", cfg.compute.scheduler)
            yield client
        return
    if cfg.compute.workers > 1:
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=cfg.compute.workers,
                threads_per_worker=cfg.compute.threads_per_worker,
                processes=True,
                host="127.0.0.1",
                # no dashboard; the scheduler's HTTP server (health routes) still starts: on a
                # free loopback port, never 0.0.0.0:8787 (taken: a leaked socket, a warning)
                dashboard_address="127.0.0.1:0",
                scheduler_kwargs={"dashboard": False},
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            _configure_worker_logging(client)
            yield client
        return
    yield None


class _LogProgress:
    """Progress as log lines (no terminal): every 10% (at most one line per 2 s, at least one
    per 30 s, and the last), with rate and ETA."""

    def __init__(self, description: str, total: int | None) -> None:
        import time

        self.description = description
        self._total = total
        self.done = 0
        self._clock = time.monotonic
        self._t0 = self._last = self._clock()
        self._next = self._step()

    def _step(self) -> int:
        return self.done + max(1, (self._total or 1000) // 10)

    def total(self, n: int | None) -> None:
        self._total = n
        self._next = min(self._next, self._step())
        if n is not None:
            logger.info("%s: %d to do", self.description, n)

    def __call__(self, n: int) -> None:
        self.done += n
        now = self._clock()
        finished = self._total is not None and self.done >= self._total
        due = self.done >= self._next and now - self._last >= 2  # at most one line per 2 s
        if not (finished or due or now - self._last >= 30):
            return
        self._next, self._last = self._step(), now
        elapsed = max(now - self._t0, 1e-9)
        rate = self.done / elapsed
        if self._total:
            left = max(self._total - self.done, 0) / rate if rate else float("inf")
            logger.info(
                "%s: %d/%d (%.0f%%), %.1f/s, about %.0f s left",
                self.description,
                self.done,
                self._total,
                100 * self.done / self._total,
                rate,
                left,
            )
        else:
            logger.info("%s: %d done, %.1f/s", self.description, self.done, rate)


class _RichProgress:
    """A rich progress bar's task: ``progress(n)``, ``progress.total(n)``."""

    def __init__(self, bar: Any, task: Any) -> None:
        self._bar, self._task = bar, task

    def total(self, n: int | None) -> None:
        self._bar.update(self._task, total=n)

    def __call__(self, n: int) -> None:
        self._bar.advance(self._task, n)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Any]:
    """A rich progress bar on a terminal (count, rate, elapsed, ETA); log lines with rate and
    ETA otherwise. Yields a :class:`pipeline.compute.Progress`: ``progress(n)`` after ``n``
    more items, ``progress.total(n)`` when the stage knows how many there are."""
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class _Rate(TaskProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:,.1f}/s" if speed else "", style="progress.data.speed")

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as bar:
            yield _RichProgress(bar, bar.add_task(description, total=total))
        return
    yield _LogProgress(description, total)


def run_command(
    cfg: PipelineConfig,
    keys: Any,
    command: str,
    stages: list[str] | None = None,
    *,
    create: bool = False,
    options: dict[str, Any] | None = None,
    what: str | None = None,
) -> Any:
    """Run ``stages`` (names; None: those ``cfg.run`` switches on) through the one runner
    (:func:`pipeline.run.run_stages`: the lake's lock, a run manifest, the audit log, the
    configured Dask client, progress with totals, reconciliation, cancellation), printing
    each stage's summary line. A failed run prints what it did, then ends the command
    (exit 1) with ``"<what> <run id> failed: <reason>"``. Returns the run's summary."""
    from pipeline.run import RunFailed, enabled_stages, run_stages, stage_named

    chosen = enabled_stages(cfg) if stages is None else [stage_named(n) for n in stages]
    try:
        summary = run_stages(
            cfg,
            keys,
            command,
            chosen,
            create=create,
            client=dask_client,
            progress=progress_bar,
            options=options,
        )
    except RunFailed as exc:
        for line in exc.summary.lines:
            typer.echo(line)
        fail(f"{what or command} {exc.summary.run_id} failed: {exc}")
    for line in summary.lines:
        typer.echo(line)
    return summary


def _no_space(exc: BaseException) -> NoSpace:
    """The :class:`NoSpace` that ``exc`` (from :func:`no_space_in`) stands for."""
    from pipeline.lake.space import no_space_error

    return no_space_error(exc, Path.cwd())


def guarded(func: Callable[[], None], *, resume_hint: str | None = None) -> None:
    """Run a command body, turning pacsflow errors into one-line messages and exit codes.

    ``PACSFLOW_DEBUG=1`` lets every exception through with its traceback.
    """
    if debug_enabled():
        func()
        return
    try:
        func()
    except typer.Exit:
        raise
    except NotImplementedStage as exc:
        fail(str(exc), EXIT_USAGE)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except NoSpace as exc:
        fail(str(exc), EXIT_NO_SPACE)
    except PacsflowError as exc:
        from pipeline.lake.space import no_space_in

        full = no_space_in(exc)
        if full is not None:
            fail(str(_no_space(full)), EXIT_NO_SPACE)
        fail(f"{type(exc).__name__}: {exc}")
    except Cancelled as exc:
        run_id = getattr(exc, "run_id", None)
        where = f"run {run_id} recorded as cancelled; " if run_id else ""
        fail(
            f"cancelled by {exc.signal_name}: {where}rerun the same command to resume "
            "(finished batches are kept)",
            exc.exit_code,
        )
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume (finished batches are kept)", 130)
    except Exception as exc:
        from pipeline.lake.space import no_space_in

        full = no_space_in(exc)  # also when recording the failure filled the disk again
        if full is not None:
            fail(str(_no_space(full)), EXIT_NO_SPACE)
        hint = f"; {resume_hint}" if resume_hint else ""
        logger.debug("unexpected error", exc_info=True)
        fail(
            f"unexpected {type(exc).__name__} (a bug: please report it with PACSFLOW_DEBUG=1 "
            f"output){hint}"
        )
