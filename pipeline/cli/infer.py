"""``pacsflow infer``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from pipeline.cli._common import (
    EXIT_USAGE,
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


def infer_with_manifest(
    cfg: PipelineConfig, command: str, keys: Any, model: str | None = None
) -> str:
    """Run inference through the one runner; print the summary and return the closing line."""
    from pipeline.cli._common import run_command

    summary = run_command(cfg, keys, command, ["infer"], options={"model": model})
    return f"run {summary.run_id}: done ({summary.manifest})"


def register(app: typer.Typer) -> None:
    """Add ``infer``."""

    @app.command("infer")
    def infer(
        lake: LakeOpt = None,
        key_file: KeyFileOpt = None,
        model: Annotated[
            str | None,
            typer.Option(
                "--model",
                help="Registered model name (configs/models.yaml), or a bundle folder or zip.",
            ),
        ] = None,
        device: Annotated[
            str | None, typer.Option("--device", help="auto, cpu or cuda (compute.device).")
        ] = None,
        trust_bundle_code: Annotated[
            bool, typer.Option("--trust-bundle-code", hidden=True, help="Removed.")
        ] = False,
        batch_size: Annotated[
            int | None, typer.Option("--batch-size", help="Slices per forward pass.")
        ] = None,
        config: ConfigOpt = None,
        workers: WorkersOpt = None,
        scheduler: SchedulerOpt = None,
    ) -> None:
        """Run a MONAI bundle over the stored volumes: masks and the findings table.

        The model loads from a local folder or zip only; nothing is downloaded. Results go to
        research/masks/ and research/tables/findings/, one row per (volume, model, label).

        Examples:

            pacsflow infer --lake /data/pacsflow/lake --model ct_body_composition --device cuda
            pacsflow infer --lake demo-out/lake --model ./models/my_bundle --batch-size 32
        """
        extra: dict[str, Any] = {}
        infer_section: dict[str, Any] = {}
        if trust_bundle_code:
            fail(
                "--trust-bundle-code was removed: a bundle runs its config code only when the "
                "model registry pins its content hash (bundle_sha256) and it was approved with "
                "`pacsflow models trust PATH`",
                EXIT_USAGE,
            )
        if batch_size is not None:
            infer_section["batch_size"] = batch_size
        if infer_section:
            extra["infer"] = infer_section
        if device is not None:
            extra["compute"] = {"device": device}
        cfg = build_config(config, lake=lake, workers=workers, scheduler=scheduler, extra=extra)
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", EXIT_USAGE)
        from pipeline.cli._common import lake_keys, open_lake_or_fail

        keys = lake_keys(cfg, key_file)
        paths = open_lake_or_fail(cfg, keys)
        if not any(paths.table("tensors").rglob("*.parquet")):
            fail(
                f"no tensors in {cfg.lake}: run `pacsflow tensors --lake {cfg.lake}` first "
                "(after crawl and deid)",
                EXIT_USAGE,
            )

        def body() -> None:
            typer.echo(infer_with_manifest(cfg, "infer", keys, model))

        guarded(body)
