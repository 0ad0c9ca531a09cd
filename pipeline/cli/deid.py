"""``pacsflow deid``, ``pacsflow sql`` and ``pacsflow verify``."""

from __future__ import annotations

from pathlib import Path
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


def deid_with_manifest(cfg: PipelineConfig, keys: Any, command: str) -> str:
    """De-identify through the one runner; print the summary and return the closing line."""
    from pipeline.cli._common import run_command

    summary = run_command(cfg, keys, command, ["deid"])
    return f"run {summary.run_id}: done ({summary.manifest})"


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
        """De-identify the restricted index into the research tables (PS3.15 Annex E).

        Examples:

            pacsflow deid --lake /data/pacsflow/lake --workers 8
            pacsflow deid --lake demo-out/lake --export-dicom /tmp/deid-dicom
        """
        extra = {"deid": {"export_dicom": str(export_dicom)}} if export_dicom else None
        cfg = build_config(config, lake=lake, workers=workers, scheduler=scheduler, extra=extra)
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", 2)

        def body() -> None:
            from pipeline.cli._common import lake_keys

            typer.echo(deid_with_manifest(cfg, lake_keys(cfg, key_file), "deid"))

        guarded(body, resume_hint="rerun the same command: finished batches are kept")

    @app.command("sql")
    def sql(
        query: Annotated[str, typer.Argument(help="SQL over the research tables.")],
        lake: LakeOpt = None,
        key_file: KeyFileOpt = None,
        config: ConfigOpt = None,
        as_of: Annotated[
            str | None,
            typer.Option(
                "--as-of",
                metavar="RUN",
                help="Read each research table at the version run RUN recorded (a run id or "
                "a unique prefix; see `pacsflow status`). No `lineage` view then.",
            ),
        ] = None,
        fmt: Annotated[
            str,
            typer.Option(
                "--format",
                metavar="FORMAT",
                help="table (readable, NULL shown as NULL), csv (with a header), json (an "
                "array of records) or parquet (needs --out).",
            ),
        ] = "table",
        out: Annotated[
            Path | None,
            typer.Option("--out", metavar="FILE", help="Write the result to FILE, not stdout."),
        ] = None,
    ) -> None:
        """Read-only SQL (DuckDB) over the research tables and the `lineage` view.

        Views: instances, series, studies, patients, tensors, findings, reviews, corrections,
        orders, reports, and `lineage` (object key -> pseudonyms -> tensor -> model -> result
        UID -> delivery status; no identifying column). findings, reviews and corrections
        carry the cohort keys (patient_token, StudyInstanceUID, SeriesInstanceUID, Modality,
        Manufacturer, StudyDate): no joins; `lesion_id` links one lesion across
        reconstructions.

        A sandbox: only queries run (no COPY, ATTACH, INSTALL, LOAD, SET, CREATE), and no
        file outside research/ can be read. Every call is audited (who, when, the query's
        SHA-256, rows returned). `--as-of RUN` reads the tables as that run left them.

        Examples:

            pacsflow sql --lake demo-out/lake "SELECT Modality, count(*) FROM series GROUP BY 1"
            pacsflow sql --lake LAKE --format csv --out lesions.csv "SELECT * FROM findings"
        """
        from pipeline.cli._sql_output import FORMATS

        if fmt not in FORMATS:
            fail(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}", 2)
        if fmt == "parquet" and out is None:
            fail("--format parquet writes a file: add --out FILE", 2)
        cfg = build_config(config, lake=lake)

        def body() -> None:
            import hashlib
            import tempfile
            from pathlib import Path
            from typing import cast

            import duckdb

            from pipeline.cli._common import audit_log, lake_keys, open_lake_or_fail
            from pipeline.cli._sql_output import SqlFormat, render, write
            from pipeline.errors import LakeError
            from pipeline.lake.duck import (
                SqlRefused,
                check_read_only,
                relation_arrow,
                research_sandbox,
            )
            from pipeline.lake.manifest import versions_of_run

            keys = lake_keys(cfg, key_file)
            paths = open_lake_or_fail(cfg, keys)
            audit = audit_log(cfg, paths, keys)
            digest = hashlib.sha256(query.encode()).hexdigest()
            versions: dict[str, int] | None = None
            pinned: dict[str, Any] = {}
            if as_of is not None:
                try:
                    run_id, versions = versions_of_run(paths, as_of)
                except LakeError as exc:
                    fail(f"--as-of: {exc}", 2)
                pinned = {"as_of": run_id}
            try:
                check_read_only(query)
            except (SqlRefused, duckdb.Error) as exc:
                audit.append("sql_refused", query_sha256=digest, **pinned)
                fail(f"SQL refused: {str(exc).splitlines()[0]}", 2)
            with tempfile.TemporaryDirectory(prefix="pacsflow-sql-") as tmp:
                con = research_sandbox(paths, Path(tmp), versions)
                try:
                    rel = con.sql(query)
                    table = None if rel is None else relation_arrow(rel)
                except duckdb.Error as exc:
                    audit.append(
                        "sql_failed", query_sha256=digest, error=type(exc).__name__, **pinned
                    )
                    fail(f"SQL error: {str(exc).splitlines()[0]}", 2)
                finally:
                    con.close()
            rows = 0 if table is None else table.num_rows
            audit.append("sql", query_sha256=digest, rows=rows, **pinned)
            if table is None:
                return
            kind = cast(SqlFormat, fmt)
            if out is not None:
                try:
                    write(table, kind, out)
                except OSError as exc:
                    fail(f"--out {out}: {exc.strerror or exc}", 2)
                typer.echo(f"sql: {rows} rows written to {out} ({fmt})", err=True)
            else:
                typer.echo(render(table, kind).rstrip("\n"))

        guarded(body)

    @app.command("verify")
    def verify(lake: LakeOpt = None, key_file: KeyFileOpt = None, config: ConfigOpt = None) -> None:
        """Scan research outputs for identifiers of the restricted index (non-zero on a hit).

        Refuses (exit 2) a folder that is not a lake, and a key that is not the lake's.

        Examples:

            pacsflow verify --lake demo-out/lake --key-file demo-out/demo.key
        """
        cfg = build_config(config, lake=lake)
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", 2)

        def body() -> None:
            from pipeline.cli._common import lake_keys, run_command

            summary = run_command(cfg, lake_keys(cfg, key_file), "verify", ["verify"])
            typer.echo("verify: no identifying value found under research/")
            typer.echo(f"run {summary.run_id}: done ({summary.manifest})")

        guarded(body)
