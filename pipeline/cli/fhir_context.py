"""``pacsflow fhir-import FOLDER``: orders and reports from a FHIR Bulk Data export into the
research tables ``orders`` and ``reports`` (issue #25; to become ``pacsflow fhir import``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli._common import ConfigOpt, KeyFileOpt, LakeOpt, build_config, fail, guarded


def import_context(
    folder: Annotated[
        Path | None,
        typer.Argument(
            help="The Bulk Data export folder (NDJSON files, manifest); default: "
            "fhir_context.path of the config."
        ),
    ] = None,
    lake: LakeOpt = None,
    key_file: KeyFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Import the ServiceRequests (reason for the exam) and radiology DiagnosticReports of
    the crawled studies from a FHIR Bulk Data export, de-identified, into the research tables
    `orders` and `reports`.

    Resources are matched to studies by accession number through the restricted vault;
    unmatched ones are counted, not imported. Codes are kept, free text follows the deid
    profile (removed by the shipped ones), dates shift by the patient's offset. An invalid
    line becomes a quarantine row. Importing the same export again adds nothing; a newer
    version of a resource (a final report after the preliminary one) replaces the older.
    """
    cfg = build_config(config, lake=lake)
    source = folder or cfg.fhir_context.path
    if source is None:
        fail("no export folder: pass FOLDER or set fhir_context.path in the config", 2)

    def body() -> None:
        from pipeline.cli._common import audit_log, lake_keys, open_lake_or_fail
        from pipeline.deid.rules import ProfileRules
        from pipeline.fhir.context import import_context as run_import
        from pipeline.lake.lock import lake_lock
        from pipeline.lake.manifest import new_run_id

        keys = lake_keys(cfg, key_file)
        paths = open_lake_or_fail(cfg, keys)
        run_id = new_run_id()
        with lake_lock(paths, "fhir-import"):
            result = run_import(
                paths,
                Path(source),
                pseudonymizer=keys.pseudonymizer(),
                rules=ProfileRules.from_config(cfg.deid),
                run_id=run_id,
                batch_size=cfg.fhir_context.batch_size,
                on_invalid=cfg.fhir_context.on_invalid,
            )
            # the vault was read to match the resources: a read of restricted data
            audit_log(cfg, paths, keys).append("fhir_import", run_id=run_id, **result.counts())
        typer.echo(result.summary())

    guarded(body, resume_hint="rerun the same command: what was committed is kept")
