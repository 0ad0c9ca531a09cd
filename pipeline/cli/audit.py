"""``pacsflow init`` and ``pacsflow audit`` (who viewed or changed what; ``repair``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from pipeline.cli._common import (
    EXIT_USAGE,
    ConfigOpt,
    KeyFileOpt,
    LakeOpt,
    audit_log,
    build_config,
    fail,
    guarded,
    lake_keys,
    open_lake_or_fail,
)


def init(lake: LakeOpt = None, key_file: KeyFileOpt = None, config: ConfigOpt = None) -> None:
    """Create an empty lake bound to the key's fingerprint.

    The folder must be new or empty; the first crawl, `run` or `demo` does the same. Every
    other command refuses a folder that is not a lake, and a key that is not the lake's.

    Examples:

        pacsflow init --lake /data/pacsflow/lake --key-file /etc/pacsflow/lake.key"""
    cfg = build_config(config, lake=lake)

    def body() -> None:
        from pipeline.lake import LakePaths
        from pipeline.lake.identity import read_marker

        keys = lake_keys(cfg, key_file)
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", EXIT_USAGE)
        before = read_marker(LakePaths(cfg.lake)) if cfg.lake.is_dir() else None
        paths = open_lake_or_fail(cfg, keys, create=True)
        if before is None:
            audit_log(cfg, paths, keys).append("lake_created", key_fingerprint=keys.fingerprint)
            typer.echo(f"init: created lake {paths.root} for key {keys.fingerprint}")
        else:
            typer.echo(f"init: {paths.root} is already a lake of key {keys.fingerprint}")

    guarded(body)


def register(app: typer.Typer) -> None:
    """Add ``init`` and the ``audit`` group."""
    app.command("init")(init)
    group = typer.Typer(no_args_is_help=False)  # its help: the callback's docstring

    @group.callback(invoke_without_command=True)
    def audit(
        ctx: typer.Context,
        lake: LakeOpt = None,
        key_file: KeyFileOpt = None,
        patient: Annotated[
            str | None, typer.Option("--patient", help="A patient token (research tables).")
        ] = None,
        study: Annotated[
            str | None, typer.Option("--study", help="A study pseudonym (2.25.<int>).")
        ] = None,
        series: Annotated[
            str | None, typer.Option("--series", help="A series pseudonym (2.25.<int>).")
        ] = None,
        user: Annotated[
            str | None, typer.Option("--user", help="Only this user (person or OS user).")
        ] = None,
        event: Annotated[str | None, typer.Option("--event", help="Only this event.")] = None,
        since: Annotated[
            str | None, typer.Option("--since", help="From this ISO date or time on (UTC).")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
        config: ConfigOpt = None,
    ) -> None:
        """Who viewed or changed what, and when: the audit log as a table.

        For a pseudonymous patient, study or series, or every record without one. The chain
        is checked first, with the key; the query is itself audited. `pacsflow audit
        repair` mends a torn last record.

        Examples:

            pacsflow audit --lake demo-out/lake --event sql
            pacsflow audit --lake /data/pacsflow/lake --study 2.25.1234 --since 2026-01-01"""
        if ctx.invoked_subcommand is not None:
            return
        cfg = build_config(config, lake=lake)

        def body() -> None:
            from pipeline.lake.audit import Witness, read_records, verify_chain
            from pipeline.lake.audit_query import audit_rows, resolve_subject

            keys = lake_keys(cfg, key_file)
            paths = open_lake_or_fail(cfg, keys)
            check = verify_chain(paths, keys, witness=Witness(cfg.audit.witness))
            if not check.ok:
                typer.echo(f"audit: WARNING, the chain is not intact: {check.reason}", err=True)
            subject = (
                resolve_subject(paths, patient=patient, study=study, series=series)
                if patient or study or series
                else None
            )
            rows = audit_rows(read_records(paths), subject, user=user, event=event, since=since)
            audit_log(cfg, paths, keys).append(
                "audit_queried",
                patient_token=patient,
                study=study,
                series=series,
                rows=len(rows),
            )
            if as_json:
                for row in rows:
                    typer.echo(json.dumps(asdict(row), sort_keys=True))
            else:
                import pandas as pd

                frame = pd.DataFrame([asdict(r) for r in rows])
                if frame.empty:
                    typer.echo("audit: no record about that subject")
                else:
                    typer.echo(frame.to_string(index=False, max_colwidth=80))
            if not check.ok:
                raise typer.Exit(1)

        guarded(body)

    @group.command("repair")
    def repair(lake: LakeOpt = None, key_file: KeyFileOpt = None, config: ConfigOpt = None) -> None:
        """Repair a torn last record (a write cut short by a full disk or a crash).

        The torn bytes are kept aside under restricted/audit/, and the repair is itself
        audited. Refuses a log that is broken anywhere else (that is not a torn write).

        Examples:

            pacsflow audit repair --lake /data/pacsflow/lake"""
        cfg = build_config(config, lake=lake)

        def body() -> None:
            from pipeline.lake.audit import repair_torn

            keys = lake_keys(cfg, key_file)
            paths = open_lake_or_fail(cfg, keys)
            done = repair_torn(paths, keys, witness=cfg.audit.witness)
            kept = f", kept in {done.kept_at}" if done.kept_at else ""
            typer.echo(
                f"audit repair: removed {done.removed_bytes} torn bytes{kept}; "
                f"recorded as record {done.record['seq']}"
            )

        guarded(body)

    app.add_typer(group, name="audit")
