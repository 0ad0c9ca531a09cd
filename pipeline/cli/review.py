"""``pacsflow review``: serve the QA web app, write a static report, or hash a password."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli._common import (
    EXIT_UNAVAILABLE,
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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches this machine only: a loopback address,
    or a name that resolves to loopback addresses only. ``0.0.0.0`` and ``::`` are not."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses
    )


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` for the app (uvicorn serves on it).

    Raises:
        OSError: the address cannot be bound (``errno.EADDRINUSE``: the port is taken).
    """
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


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
        certfile: Annotated[
            Path | None,
            typer.Option(
                "--certfile",
                help="TLS certificate chain (PEM): serve HTTPS (default review.certfile).",
            ),
        ] = None,
        keyfile: Annotated[
            Path | None,
            typer.Option("--keyfile", help="Private key (PEM) of --certfile (review.keyfile)."),
        ] = None,
        insecure_http: Annotated[
            bool,
            typer.Option(
                "--insecure-http",
                help="Serve plain HTTP on a non-loopback address (passwords and pages cross "
                "the network unencrypted); without it that is refused.",
            ),
        ] = False,
        hash_password: Annotated[
            bool,
            typer.Option(
                "--hash-password",
                help="Prompt for a password and print its argon2 hash for review.users.",
            ),
        ] = False,
        key_file: KeyFileOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        """QA review of AI findings: a web worklist with overlays, decisions stored in the
        `reviews` table, metrics per model version; or, with --report, one HTML file.

        Serves HTTPS with --certfile/--keyfile; plain HTTP only on a loopback address,
        unless --insecure-http. Users and roles come from `review:` in the config.

        Examples:

            pacsflow review --lake /data/pacsflow/lake -c configs/local/review.yaml
            pacsflow review --lake demo-out/lake --report /tmp/review-report.html
            pacsflow review --hash-password"""
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

                n = write_report(
                    paths,
                    report,
                    max_images=cfg.review.report_images,
                    run_id=run,
                    registry=cfg.infer.registry,
                )
                typer.echo(f"review: wrote {report} ({n} findings)")
                return
            if not cfg.review.users:
                fail(
                    "no review users: add review.users.<name>.password_hash (make one with "
                    "`pacsflow review --hash-password`) and a role",
                    EXIT_USAGE,
                )
            cert = certfile or cfg.review.certfile
            key = keyfile or cfg.review.keyfile
            if (cert is None) != (key is None):
                fail("--certfile and --keyfile go together: give both or neither", EXIT_USAGE)
            for what, path in (("certificate", cert), ("private key", key)):
                if path is not None and not Path(path).is_file():
                    fail(f"TLS {what} {path} is not a readable file", EXIT_USAGE)
            where_host = host or cfg.review.host
            where_port = port or cfg.review.port
            if cert is None and not is_loopback(where_host):
                if not insecure_http:
                    fail(
                        f"refusing to serve plain HTTP on {where_host}, which is not a loopback "
                        "address: give --certfile and --keyfile (or review.certfile/keyfile), "
                        "or --insecure-http to accept that passwords and pages cross the "
                        "network unencrypted",
                        EXIT_USAGE,
                    )
                typer.echo(
                    f"pacsflow: warning: serving plain HTTP on {where_host}: passwords, session "
                    "cookies and review pages cross the network unencrypted (--insecure-http)",
                    err=True,
                )
            secret = None
            if cfg.review.secret_env:
                secret = os.environ.get(cfg.review.secret_env)
                if not secret:
                    fail(f"review.secret_env: ${cfg.review.secret_env} is not set", EXIT_USAGE)
            keys = lake_keys(cfg, key_file)
            paths = open_lake_or_fail(cfg, keys)
            import uvicorn

            from pipeline.lake.crypto import VaultCipher
            from pipeline.review.app import create_app, server_config

            app_ = create_app(
                cfg,
                paths,
                audit=audit_log(cfg, paths, keys),
                secret=secret,
                tls=cert is not None,
                cipher=VaultCipher(keys.secret),
            )
            try:
                sock = listen(where_host, where_port)
            except OSError as exc:
                why = (
                    "the port is in use (another `pacsflow review`, or another server?): "
                    "pick another with --port or review.port"
                    if exc.errno == errno.EADDRINUSE
                    else exc.strerror or type(exc).__name__
                )
                fail(f"cannot serve on {where_host}:{where_port}: {why}", EXIT_UNAVAILABLE)
            scheme = "https" if cert is not None else "http"
            typer.echo(f"review: serving {scheme}://{where_host}:{where_port}/ (Ctrl-C stops)")
            with sock:
                uvicorn.Server(
                    server_config(
                        app_, host=where_host, port=where_port, certfile=cert, keyfile=key
                    )
                ).run(sockets=[sock])

        guarded(body)
