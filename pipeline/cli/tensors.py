"""``pacsflow tensors``."""

from __future__ import annotations

from typing import Any

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


def tensors_with_manifest(cfg: PipelineConfig, command: str, keys: Any) -> str:
    """Build tensors through the one runner; print the summary and return the closing line."""
    from pipeline.cli._common import run_command

    summary = run_command(cfg, keys, command, ["tensors"])
    return f"run {summary.run_id}: done ({summary.manifest})"


def register(app: typer.Typer) -> None:
    """Add ``tensors``."""

    @app.command("tensors")
    def tensors(
        lake: LakeOpt = None,
        key_file: KeyFileOpt = None,
        config: ConfigOpt = None,
        workers: WorkersOpt = None,
        scheduler: SchedulerOpt = None,
    ) -> None:
        """Build geometry-exact volumes and the tensors table from the de-identified series.

        Objects are read whole through the connector that crawled them; only geometry and
        pixels are taken from them, and the UIDs the tensors table lists are the vault's
        pseudonyms. The key opens the lake (its audit log is keyed).

        Examples:

            pacsflow tensors --lake /data/pacsflow/lake --workers 8
        """
        cfg = build_config(config, lake=lake, workers=workers, scheduler=scheduler)
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", 2)

        def body() -> None:
            from pipeline.cli._common import lake_keys

            typer.echo(tensors_with_manifest(cfg, "tensors", lake_keys(cfg, key_file)))

        guarded(body)
