"""The ``pacsflow`` command line: one command per stage, plus run, demo, status, sql and verify.

Command modules import their stages lazily, inside the command, so ``pacsflow --help`` loads
neither torch nor monai (nor pydicom, pyarrow or dask).
"""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline._version import __version__
from pipeline.cli import (
    audit,
    crawl,
    deid,
    demo,
    fhir,
    fhir_context,
    infer,
    models,
    repair,
    review,
    run,
    status,
    stubs,
    synth,
    tensors,
    vacuum,
    writeback,
)
from pipeline.cli._help import HelpGroup
from pipeline.cli._logging import setup_logging

app = typer.Typer(
    name="pacsflow",
    cls=HelpGroup,
    help="AI research and analytics pipeline over PACS archives: crawl, de-identify, "
    "tabulate, infer, write back, review.\n\n"
    "Examples:\n\n"
    "    pacsflow demo --out demo-out\n"
    "    pacsflow status --lake demo-out/lake --key-file demo-out/demo.key\n"
    "    pacsflow run configs/local/nightly.yaml\n"
    "    pacsflow COMMAND --help",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pacsflow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log detail.")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Log as JSON lines.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    level = "WARNING" if quiet else ("DEBUG" if verbose else "INFO")
    setup_logging(level, json_lines=json_logs)


app.command("synth")(synth.synth)
audit.register(app)
stubs.register_keygen(app)
app.command("crawl")(crawl.crawl)
deid.register(app)
tensors.register(app)
infer.register(app)
models.register(app)
writeback.register(app)
fhir.register(app)
run.register(app)
review.register(app)
vacuum.register(app)
repair.register(app)
app.command("demo")(demo.demo)
app.command("status")(status.status)
app.command("fhir-import")(fhir_context.import_context)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
