"""``pacsflow fhir-import [FOLDER | --server URL]``: orders and reports from a FHIR Bulk Data
export, or a FHIR server's search, into the research tables ``orders`` and ``reports`` (issue
#25; to become ``pacsflow fhir import``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            metavar="URL",
            help="Search this FHIR server (its base URL) per crawled study instead of reading "
            "an export; bearer token from the env var fhir_context.token_env names.",
        ),
    ] = None,
    lake: LakeOpt = None,
    key_file: KeyFileOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Import the ServiceRequests (reason for the exam) and radiology DiagnosticReports of
    the crawled studies from a FHIR Bulk Data export (or a FHIR server's search),
    de-identified, into the research tables `orders` and `reports`.

    Resources are matched to studies by accession number through the restricted vault;
    unmatched ones are counted, not imported. Codes are kept, free text follows the deid
    profile (removed by the shipped ones), dates shift by the patient's offset. An invalid
    resource becomes a quarantine row. Importing the same export again adds nothing; a newer
    version of a resource (a final report after the preliminary one) replaces the older.

    Examples:

        pacsflow fhir-import ehr-export/ --lake LAKE --key-file KEY
        pacsflow fhir-import --server https://ehr.example/fhir --lake LAKE --key-file KEY
    """
    extra: dict[str, Any] = {}
    if server is not None:
        extra = {"fhir_context": {"source": "server", "url": server}}
    elif folder is not None:
        extra = {"fhir_context": {"source": "folder", "path": str(folder)}}
    cfg = build_config(config, lake=lake, extra=extra)
    fc = cfg.fhir_context
    if fc.source == "folder" and fc.path is None:
        fail("no export folder: pass FOLDER or set fhir_context.path in the config", 2)
    if fc.source == "server" and fc.url is None:
        fail("no FHIR server: pass --server URL or set fhir_context.url in the config", 2)

    def body() -> None:
        from pipeline.cli._common import audit_log, lake_keys, open_lake_or_fail
        from pipeline.deid.rules import ProfileRules
        from pipeline.fhir.client import FhirClient
        from pipeline.fhir.context import import_context as from_folder
        from pipeline.fhir.context import import_from_server
        from pipeline.lake.lock import lake_lock
        from pipeline.lake.manifest import new_run_id

        keys = lake_keys(cfg, key_file)
        paths = open_lake_or_fail(cfg, keys)
        run_id = new_run_id()
        common: dict[str, Any] = {
            "pseudonymizer": keys.pseudonymizer(),
            "rules": ProfileRules.from_config(cfg.deid),
            "run_id": run_id,
            "batch_size": fc.batch_size,
            "on_invalid": fc.on_invalid,
        }
        with lake_lock(paths, "fhir-import"):
            if fc.source == "server":
                assert fc.url is not None
                client = FhirClient.from_env(
                    fc.url,
                    token_env=fc.token_env,
                    section="fhir_context",
                    verify=str(fc.ca_bundle) if fc.ca_bundle is not None else True,
                    timeout_s=fc.timeout_s,
                    page_size=fc.page_size,
                    retries=2,
                    backoff_s=0.2,
                )
                try:
                    result = import_from_server(
                        paths, client, studies_per_batch=fc.studies_per_batch, **common
                    )
                finally:
                    client.close()
            else:
                assert fc.path is not None
                result = from_folder(paths, fc.path, **common)
            # the vault was read to match the resources: a read of restricted data
            audit_log(cfg, paths, keys).append(
                "fhir_import", run_id=run_id, source=fc.source, **result.counts()
            )
        typer.echo(result.summary())

    guarded(body, resume_hint="rerun the same command: what was committed is kept")
