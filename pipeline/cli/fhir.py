"""``pacsflow fhir``."""

from __future__ import annotations

from typing import Annotated

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


def register(app: typer.Typer) -> None:
    """Add ``fhir``."""

    @app.command("fhir")
    def fhir(
        lake: LakeOpt = None,
        dest: Annotated[
            str | None,
            typer.Option(
                "--dest",
                help="A folder, or a FHIR server's base URL (https://host/fhir); default "
                "fhir.dest, else LAKE/restricted/fhir/outbox.",
            ),
        ] = None,
        key_file: KeyFileOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        """Send written-back results as FHIR R4 transaction Bundles (ImagingStudy,
        DiagnosticReport, Observations, Device), re-identified and idempotent.

        Each result's resources have ids derived from the result, so a rerun updates them and
        never duplicates; a report is preliminary until the QA review accepts it. Bundles
        not confirmed stay pending (exit 1) until a rerun delivers them.

        Examples:

            pacsflow fhir --lake demo-out/lake --key-file demo-out/demo.key
            pacsflow fhir --lake LAKE --key-file KEY --dest https://ehr.example/fhir
        """
        cfg = build_config(config, lake=lake, workers=1)  # in-process: no Dask needed
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", EXIT_USAGE)

        def body() -> None:
            from pipeline.cli._common import lake_keys, run_command

            keys = lake_keys(cfg, key_file)
            summary = run_command(cfg, keys, "fhir", ["fhir"], options={"fhir_dest": dest})
            typer.echo(f"run {summary.run_id}: done ({summary.manifest})")

        guarded(body)
