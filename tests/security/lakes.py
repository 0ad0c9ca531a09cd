"""A small real lake made through the CLI, for the security tests (no mocks: the real
commands, the real files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner, Result

from pipeline.cli.main import app
from pipeline.lake.keys import generate_key_file

runner = CliRunner()


def cli(*args: str | Path) -> Result:
    """``pacsflow ARGS`` in-process, as a user would type it."""
    return runner.invoke(app, [str(a) for a in args])


@dataclass(frozen=True)
class Lake:
    """A crawled and de-identified lake, its archive and its key."""

    root: Path
    archive: Path
    key: Path

    def run(self, *args: str | Path) -> Result:
        """A command on this lake with its key."""
        return cli(*args, "--lake", self.root, "--key-file", self.key)


def make_lake(base: Path, *, patients: int = 2, seed: int = 1818) -> Lake:
    """Synthesise a small archive, crawl and de-identify it into ``base/lake`` with a new key."""
    from pipeline.synth import synthesize

    archive = base / "archive"
    synthesize(
        archive, patients=patients, seed=seed, ct_slices=8, rows=32, columns=32, include_bad=False
    )
    key = generate_key_file(base / "lake.key")
    lake = Lake(base / "lake", archive, key)
    done = lake.run("crawl", "--source", archive, "--workers", "1")
    assert done.exit_code == 0, done.output
    done = lake.run("deid", "--workers", "1")
    assert done.exit_code == 0, done.output
    return lake
