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
from pipeline.errors import ConfigError, NotImplementedStage, PacsflowError

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

#: Exit codes: 0 success, 1 the stage failed, 2 usage/config error or not implemented.
EXIT_FAILED = 1
EXIT_USAGE = 2


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
                dashboard_address=None,
                scheduler_kwargs={"dashboard": False},
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            _configure_worker_logging(client)
            yield client
        return
    yield None


@contextlib.contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on a terminal; periodic log lines otherwise. Yields ``advance(n)``."""
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
        return
    done = 0
    step = max(1, (total or 1000) // 10)
    next_report = step

    def advance(n: int) -> None:
        nonlocal done, next_report
        done += n
        if done >= next_report:
            logger.info("%s: %d%s done", description, done, f"/{total}" if total else "")
            next_report = done + step

    yield advance


def recorder(cfg: PipelineConfig, command: str, keys: Any, *, create: bool = False) -> Any:
    """A :class:`pipeline.lake.RunRecorder` of ``command`` on ``cfg.lake`` under ``keys``: on
    entering it refuses a folder that is not a lake of ``keys`` (exit 2 through
    :func:`guarded`), or with ``create`` makes one as ``cfg.encrypt_at_rest`` says."""
    from pipeline.config import config_hash, manifest_config
    from pipeline.lake import LakePaths, RunRecorder

    assert cfg.lake is not None
    return RunRecorder(
        LakePaths(cfg.lake),
        command,
        keys=keys,
        witness=cfg.audit.witness,
        create=create,
        encrypted=cfg.encrypt_at_rest,
        config_hash=config_hash(cfg),
        config=manifest_config(cfg),
    )


@contextlib.contextmanager
def recorded_run(
    cfg: PipelineConfig, command: str, stage: str, keys: Any, *, create: bool = False
) -> Iterator[tuple[Any, Any, Any, Any]]:
    """One recorded stage run: ``(lake, recorder, dask client, advance)`` inside a run
    manifest (config, hash, versions, key fingerprint), the configured Dask client and a
    progress bar. The lake must be a lake of ``keys`` (or, with ``create``, becomes one)."""
    with (
        recorder(cfg, command, keys, create=create) as rec,
        dask_client(cfg) as client,
        progress_bar(stage, None) as advance,
    ):
        yield rec.lake, rec, client, advance


def run_recorded_pipeline(cfg: Any, keys: Any, command: str, what: str) -> Any:
    """Run :func:`pipeline.run.run_pipeline` on the lake of ``keys`` (made when missing and
    the run crawls) under the lake's lock, in one run manifest of
    ``command``, on the configured Dask client; a failed run ends the command (exit 1) with
    ``"<what> <run id> failed: <reason>"``. Returns the run's summary."""
    from pipeline.lake.lock import lake_lock
    from pipeline.run import RunFailed, run_pipeline

    paths = open_lake_or_fail(cfg, keys, create=cfg.run.crawl)  # the lock lives in it
    with (
        lake_lock(paths, command),
        recorder(cfg, command, keys, create=cfg.run.crawl) as rec,
        dask_client(cfg) as client,
    ):
        try:
            return run_pipeline(
                cfg,
                key=keys.secret,
                rec=rec,
                client=client,
                progress=lambda s: progress_bar(s, None),
            )
        except RunFailed as exc:
            fail(f"{what} {rec.run_id} failed: {exc}")


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
    except PacsflowError as exc:
        fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume (finished partitions are kept)")
    except Exception as exc:
        hint = f"; {resume_hint}" if resume_hint else ""
        logger.debug("unexpected error", exc_info=True)
        fail(
            f"unexpected {type(exc).__name__} (a bug: please report it with PACSFLOW_DEBUG=1 "
            f"output){hint}"
        )
