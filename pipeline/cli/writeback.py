"""``pacsflow writeback``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from pipeline.cli._common import (
    EXIT_USAGE,
    ConfigOpt,
    KeyFileOpt,
    LakeOpt,
    build_config,
    fail,
    guarded,
)
from pipeline.config import PipelineConfig


def writeback_with_manifest(
    cfg: PipelineConfig,
    command: str,
    dest: str,
    keys: Any,
    model: str | None = None,
    corrections: bool | None = None,
) -> str:
    """Write back through the one runner (audit: the re-identification, counts only); print
    the summary and return the closing line. Objects left pending fail the command (exit 1)
    with the hint to rerun."""
    from pipeline.cli._common import run_command

    summary = run_command(
        cfg,
        keys,
        command,
        ["writeback"],
        options={"dest": dest, "model": model, "corrections": corrections},
    )
    return f"run {summary.run_id}: done ({summary.manifest})"


def register(app: typer.Typer) -> None:
    """Add ``writeback``."""

    @app.command("writeback")
    def writeback(
        lake: LakeOpt = None,
        dest: Annotated[
            str | None,
            typer.Option("--dest", help="Folder, dicomweb+http(s)://... or dimse://AET@host:port."),
        ] = None,
        model: Annotated[
            str | None, typer.Option("--model", help="Only this model's findings.")
        ] = None,
        corrections: Annotated[
            bool,
            typer.Option(
                "--corrections",
                help="Also send reviewers' corrected masks as SEGs "
                "(review.write_back_corrections).",
            ),
        ] = False,
        key_file: KeyFileOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        """Send findings back as DICOM SEG and TID 1500 SR, re-identified and idempotent.

        The objects reference the original images in the original study (UIDs recovered from
        the restricted zone with the key); their UIDs derive from the model and the source
        series, so rerunning never duplicates them. Each object is confirmed at the
        destination after sending. With --corrections, each finding's latest corrected mask
        goes too, as a SEG with the reviewer as its content creator.

        Examples:

            pacsflow writeback --lake /data/pacsflow/lake --dest dicomweb+https://pacs.example.org/dicom-web
            pacsflow writeback --lake demo-out/lake --dest /tmp/results --model ct_body_composition
            pacsflow writeback --lake demo-out/lake --dest /tmp/results --corrections
        """
        cfg = build_config(config, lake=lake, workers=1)  # in-process: no Dask needed
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", EXIT_USAGE)
        target = dest or cfg.writeback.dest
        if not target:
            fail("no destination: pass --dest or set writeback.dest", EXIT_USAGE)

        def body() -> None:
            from pipeline.cli._common import lake_keys

            keys = lake_keys(cfg, key_file)
            typer.echo(
                writeback_with_manifest(cfg, "writeback", target, keys, model, corrections or None)
            )

        guarded(body)
