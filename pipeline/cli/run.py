"""``pacsflow run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli._common import EXIT_USAGE, SchedulerOpt, WorkersOpt, build_config, fail, guarded


def register(app: typer.Typer) -> None:
    """Add ``run``."""

    @app.command("run")
    def run(
        config_file: Annotated[Path, typer.Argument(help="Pipeline config (YAML).")],
        lake: Annotated[
            Path | None, typer.Option("--lake", help="Lake root (else config).")
        ] = None,
        key_file: Annotated[
            Path | None,
            typer.Option("--key-file", help="Secret key file (or key_file / PACSFLOW_KEY_FILE)."),
        ] = None,
        workers: WorkersOpt = None,
        scheduler: SchedulerOpt = None,
    ) -> None:
        """Every stage, as the config says; incremental; one lock per lake.

        crawl -> deid -> verify -> tensors -> infer -> writeback (switch stages off under
        `run:`). Exit codes: 0 every enabled stage succeeded and its counts reconcile; 1 a
        stage failed or left work pending (the reason in one line); 2 a usage or config
        error; 3 a resource is unavailable; 4 no space left; 130/143 interrupted (SIGINT/
        SIGTERM). Rerun the same command to resume.

        Examples:

            pacsflow run configs/local/nightly.yaml
            pacsflow run configs/demo.yaml --lake /tmp/lake --workers 4
        """
        cfg = build_config(config_file, lake=lake, workers=workers, scheduler=scheduler)
        if cfg.lake is None:
            fail("no lake: set `lake:` in the config or pass --lake", EXIT_USAGE)

        def body() -> None:
            from pipeline.cli._common import lake_keys, run_command

            keys = lake_keys(cfg, key_file)
            summary = run_command(cfg, keys, "run", create=cfg.run.crawl)
            typer.echo(f"run {summary.run_id}: done ({summary.manifest})")

        guarded(body)
