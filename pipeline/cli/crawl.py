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
    through the one runner; print the summary and return the closing line."""
    from pipeline.cli._common import run_command

    summary = run_command(
        cfg, keys, command, ["crawl"], create=True, options={"source": source_uri}
    )
    return f"run {summary.run_id}: done ({summary.manifest})"


def crawl(
    source: SourceOpt = None,
    lake: LakeOpt = None,
    key_file: KeyFileOpt = None,
    config: ConfigOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """Crawl an archive's headers into the restricted index (incremental; bad ones quarantined).

    Examples:

        pacsflow crawl --source /mnt/export --lake /data/pacsflow/lake --workers 8
        pacsflow crawl -c configs/local/nightly.yaml --source dicomweb+https://pacs/dicom-web
    """
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
