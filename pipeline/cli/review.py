"""``pacsflow review``: serve the QA web app, write a static report, or hash a password."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli._common import EXIT_USAGE, ConfigOpt, LakeOpt, build_config, fail, guarded


def register(app: typer.Typer) -> None:
    """Add ``review``."""

    @app.command("review")
    def review(
        lake: LakeOpt = None,
        report: Annotated[
            Path | None,
            typer.Option("--report", help="Write a self-contained HTML report and exit."),
        ] = None,
        run: Annotated[
            str | None,
            typer.Option("--run", help="With --report: only the findings of this infer run."),
        ] = None,
        host: Annotated[
            str | None, typer.Option("--host", help="Listen address (default review.host).")
        ] = None,
        port: Annotated[
            int | None,
            typer.Option("--port", min=1, max=65535, help="Port (default review.port)."),
        ] = None,
        hash_password: Annotated[
            bool,
            typer.Option(
                "--hash-password",
                help="Prompt for a password and print its argon2 hash for review.users.",
            ),
        ] = False,
        config: ConfigOpt = None,
    ) -> None:
        """QA review of AI findings: a web worklist with overlays, decisions stored in the
        `reviews` table, metrics per model version; or, with --report, one HTML file."""
        if hash_password:
            from pipeline.review.app import hash_password as make_hash

            secret = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
            typer.echo(make_hash(secret))
            return
        cfg = build_config(config, lake=lake, workers=1)
        if cfg.lake is None:
            fail("no lake: pass --lake LAKE or set `lake:` in the config", EXIT_USAGE)

        def body() -> None:
            from pipeline.lake import LakePaths

            paths = LakePaths(cfg.lake)  # type: ignore[arg-type]
            if not paths.root.is_dir():
                fail(f"no lake at {paths.root}", EXIT_USAGE)
            if report is not None:
                from pipeline.review.report import write_report

                n = write_report(paths, report, max_images=cfg.review.report_images, run_id=run)
                typer.echo(f"review: wrote {report} ({n} findings)")
                return
            if not cfg.review.users:
                fail(
                    "no review users: add review.users.<name>.password_hash (make one with "
                    "`pacsflow review --hash-password`) and a role",
                    EXIT_USAGE,
                )
            secret = None
            if cfg.review.secret_env:
                secret = os.environ.get(cfg.review.secret_env)
                if not secret:
                    fail(f"review.secret_env: ${cfg.review.secret_env} is not set", EXIT_USAGE)
            import uvicorn

            from pipeline.review.app import create_app

            where_host = host or cfg.review.host
            where_port = port or cfg.review.port
            typer.echo(f"review: serving http://{where_host}:{where_port}/ (Ctrl-C stops)")
            uvicorn.run(
                create_app(cfg, paths, secret=secret),
                host=where_host,
                port=where_port,
                log_level="warning",
                ws="none",
                lifespan="off",
            )

        guarded(body)
