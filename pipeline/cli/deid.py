"""``pacsflow deid``, ``pacsflow sql`` and ``pacsflow verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli._common import (
    ConfigOpt,
    LakeOpt,
    SchedulerOpt,
    WorkersOpt,
    build_config,
    fail,
    guarded,
)
from pipeline.config import PipelineConfig

KeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--key-file", help="Secret key file (or env PACSFLOW_KEY_FILE).", show_default=False
    ),
]
RESEARCH_VIEWS = ("instances", "series", "studies", "patients", "tensors", "findings", "reviews")


def deid_with_manifest(cfg: PipelineConfig, key: bytes, command: str) -> str:
    """De-identify as one recorded run; return the summary line."""
    from pipeline.cli._common import recorded_run
    from pipeline.deid.stage import run as deid_run

    with recorded_run(cfg, command, "deid") as (lake, rec, client, advance):
        result = deid_run(cfg, lake, key=key, run_id=rec.run_id, client=client, progress=advance)
        rec.restricted_stage("deid", result.counts, deidentified=result.counts.out)
    c = result.counts
    return (
        f"deid: {c.seen} objects, de-identified {c.out}, quarantined {c.quarantined} "
        f"in {c.seconds:.1f} s (run {rec.run_id})"
    )


def verify_lake(cfg: PipelineConfig, key: bytes | None = None) -> tuple[int, list[str]]:
    """Run the leak scan; return (number of leaks, report lines without values).

    ``key`` is needed only when the vault is encrypted.
    """
    from pipeline.deid.verify import verify
    from pipeline.lake import AuditLog, LakePaths

    assert cfg.lake is not None
    lake = LakePaths(cfg.lake)
    leaks = verify(lake, key)
    AuditLog(lake).append("verify", leaks=len(leaks))
    lines = [
        f"  {leak.path}"
        + (f" column {leak.column} row {leak.row}" if leak.column else "")
        + f": {leak.kind}"
        for leak in leaks[:50]
    ]
    return len(leaks), lines


def register(app: typer.Typer) -> None:
    """Add ``deid``, ``sql`` and ``verify``."""

    @app.command("deid")
    def deid(
        lake: LakeOpt = None,
        key_file: KeyFileOpt = None,
        export_dicom: Annotated[
            Path | None,
            typer.Option(
                "--export-dicom", help="Also write de-identified DICOM files to this folder."
            ),
        ] = None,
        config: ConfigOpt = None,
        workers: WorkersOpt = None,
        scheduler: SchedulerOpt = None,
    ) -> None:
        """De-identify the restricted index into the research tables (PS3.15 Annex E)."""
        extra = {"deid": {"export_dicom": str(export_dicom)}} if export_dicom else None
        cfg = build_config(config, lake=lake, workers=workers, scheduler=scheduler, extra=extra)
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", 2)

        def body() -> None:
            from pipeline.deid.keys import load_key

            key = load_key(key_file or cfg.key_file)
            typer.echo(deid_with_manifest(cfg, key, "deid"))

        guarded(body, resume_hint="rerun the same command: finished batches are kept")

    @app.command("sql")
    def sql(
        query: Annotated[str, typer.Argument(help="SQL over the research tables.")],
        lake: LakeOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        """DuckDB over the research tables (views instances, series, studies, patients, tensors,
        findings, reviews) and `lineage` (object key -> pseudonyms -> tensor -> model -> result
        UID -> delivery status; no identifying column)."""
        cfg = build_config(config, lake=lake)
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", 2)

        def body() -> None:
            import duckdb

            from pipeline.lake import LakePaths, table_exists
            from pipeline.lake.duck import lineage_sql, scan_sql

            paths = LakePaths(cfg.lake)  # type: ignore[arg-type]
            con = duckdb.connect()
            for view in RESEARCH_VIEWS:
                if table_exists(paths, view):
                    con.execute(f"CREATE VIEW {view} AS SELECT * FROM {scan_sql(paths, view)}")
            if table_exists(paths, "vault"):  # pseudonyms, hashes and result UIDs only
                con.execute(f"CREATE VIEW lineage AS SELECT * FROM {lineage_sql(paths)}")
            try:
                rel = con.sql(query)
            except duckdb.Error as exc:
                fail(f"SQL error: {str(exc).splitlines()[0]}", 2)
            if rel is None:
                return
            df = rel.df()
            typer.echo(df.to_string(index=False, max_rows=200))

        guarded(body)

    @app.command("verify")
    def verify(lake: LakeOpt = None, key_file: KeyFileOpt = None, config: ConfigOpt = None) -> None:
        """Scan research outputs for identifiers of the restricted index (non-zero on a hit).

        The key file is needed only when the vault is encrypted (deid.encrypt_vault).
        """
        cfg = build_config(config, lake=lake)
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", 2)

        def body() -> None:
            from pipeline.config.env import key_file_from_env
            from pipeline.deid.keys import load_key

            path = key_file or cfg.key_file or key_file_from_env()
            n, lines = verify_lake(cfg, load_key(path) if path else None)
            if n:
                typer.echo(f"verify: {n} identifying value(s) found under research/:")
                for line in lines:
                    typer.echo(line)
                raise typer.Exit(1)
            typer.echo("verify: no identifying value found under research/")

        guarded(body)
