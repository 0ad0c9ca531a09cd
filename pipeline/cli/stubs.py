"""Contract verbs whose stages arrive with later issues: each says so in one line and exits 2.

Their signatures are already the CLI contract's (DESIGN.md), so scripts and ``dvc.yaml`` can be
written against them now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register_keygen(app: typer.Typer) -> None:
    """Add ``keygen``."""

    @app.command("keygen")
    def keygen(path: Annotated[Path, typer.Argument(help="Where to write the key file.")]) -> None:
        """Create a secret key file (mode 0600) for keyed pseudonyms and date shifts.

        Keep it secret and backed up, outside the lake: pseudonyms, date shifts and the way
        back to the originals depend on it.

        Examples:

            pacsflow keygen /etc/pacsflow/lake.key
        """
        from pipeline.cli._common import guarded

        def body() -> None:
            from pipeline.deid.keys import generate_key_file

            generate_key_file(path)
            typer.echo(
                f"keygen: wrote {path} (mode 0600). Keep it secret and backed up: the "
                "pseudonyms, and the way back to the originals, depend on it."
            )

        guarded(body)
