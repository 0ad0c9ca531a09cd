"""``pacsflow crawl``: archive headers into the restricted index."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from pipeline.cli._common import (
    ConfigOpt,
    KeyFileOpt,
    LakeOpt,
    SchedulerOpt,
    WorkersOpt,
    build_config,
    fail,
    guarded,
)
from pipeline.config import PipelineConfig

SourceOpt = Annotated[
    str | None,
    typer.Option(
        "--source",
        help="A folder, dicomweb+http(s)://host:port/root or dimse://AET@host:port "
        "(credentials from config/env, never the URL).",
        show_default=False,
    ),
]


def crawl_with_manifest(cfg: PipelineConfig, source_uri: str, command: str, keys: Any) -> str:
    """Crawl ``source_uri`` into ``cfg.lake`` (a lake of ``keys``, made when missing or empty)
    as one recorded run; return the summary line."""
    from pipeline.cli._common import dask_client, progress_bar, recorder
    from pipeline.connectors import open_source
    from pipeline.crawl import run as crawl_run
    from pipeline.lake import LakePaths

    assert cfg.lake is not None
    source = open_source(
        source_uri,
        cfg.source,
        follow_symlinks=cfg.crawl.follow_symlinks,
        cache_dir=LakePaths(cfg.lake).restricted / "cache",
    )
    with (
        recorder(cfg, command, keys, create=True) as rec,
        dask_client(cfg) as client,
        progress_bar("crawl", None) as advance,
    ):
        result = crawl_run(
            cfg, rec.lake, source, run_id=rec.run_id, client=client, progress=advance
        )  # rec.lake carries the keys (an encrypted lake seals what the crawl writes)
        rec.restricted_stage("crawl", result.counts)  # it reads the identified archive
    c = result.counts
    if not c.reconciles:
        fail(f"crawl counts do not reconcile: seen {c.seen} != {c.out}+{c.quarantined}+{c.skipped}")
    return (
        f"crawl: seen {c.seen}, indexed {c.out}, quarantined {c.quarantined}, "
        f"unchanged {c.skipped} in {c.seconds:.1f} s (run {rec.run_id})"
    )


def crawl(
    source: SourceOpt = None,
    lake: LakeOpt = None,
    key_file: KeyFileOpt = None,
    config: ConfigOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Crawl an archive's headers into the restricted index (incremental; bad ones quarantined)."""
    cfg = build_config(
        config,
        lake=lake,
        workers=workers,
        scheduler=scheduler,
        extra={"source": {"uri": source}} if source else None,
    )
    if cfg.lake is None:
        fail("no lake: pass --lake LAKE or set `lake:` in the config", 2)
    if not cfg.source.uri:
        fail("no source: pass --source SRC or set `source.uri` in the config", 2)
    uri = cfg.source.uri

    def body() -> None:
        from pipeline.cli._common import lake_keys

        typer.echo(crawl_with_manifest(cfg, uri, "crawl", lake_keys(cfg, key_file)))

    guarded(body, resume_hint="rerun the same command: unchanged objects are skipped")
