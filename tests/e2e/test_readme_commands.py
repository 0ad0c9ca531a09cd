"""The README runs as written (issue #24): every ``bash`` block is run on a demo lake, and every
``yaml`` block is a valid pipeline config.

A block that cannot run in a test (it installs, needs root, a PACS or several machines, or
starts a server) says so on the line before it: ``<!-- not-run: the reason -->``. Every other
shell block runs, in a folder laid out as after ``make demo`` (``demo-out/`` built by
``pacsflow demo``, ``.venv/bin/pacsflow`` the installed command, the repository's
``configs/``, ``deploy/``, ``models/`` and ``notebooks/``), with ``bash -euo pipefail``, and
must exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
EXE = Path(sys.executable).parent / "pacsflow"
SHELL = ("bash", "sh", "shell", "console")
_MARKER = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")
_FENCE = re.compile(r"^```(\w+)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block of the README."""

    line: int  # of its opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason, when the line before the block marks it

    @property
    def commands(self) -> str:
        """The shell text to run (``console`` blocks: the ``$ `` lines)."""
        if self.lang != "console":
            return self.text
        return "\n".join(ln[2:] for ln in self.text.splitlines() if ln.startswith("$ "))


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block with a language, and its not-run marker."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        m = _FENCE.match(lines[i])
        if m:
            above = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            marker = _MARKER.search(above)
            body = "\n".join(lines[i + 1 : end])
            blocks.append(Block(i + 1, m.group(1), body, marker.group(1) if marker else None))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
TO_RUN = [b for b in BLOCKS if b.lang in SHELL and b.not_run is None]


def test_every_shell_block_runs_or_says_why_not() -> None:
    shell = [b for b in BLOCKS if b.lang in SHELL]
    assert len(TO_RUN) >= 5, [b.line for b in TO_RUN]
    for b in shell:
        assert b.lang in ("bash", "console"), f"README line {b.line}: use ```bash"
        if b.not_run is not None:
            assert len(b.not_run) >= 10, f"README line {b.line}: say why it is not run"


def test_readme_blocks_are_found_with_their_markers() -> None:
    text = "x\n<!-- not-run: needs root -->\n```bash\nrm -rf /\n```\n\n```bash\necho hi\n```\n"
    text += "```\npicture\n```\n"
    blocks = readme_blocks(text)
    assert [(b.line, b.not_run, b.text) for b in blocks] == [
        (3, "needs root", "rm -rf /"),
        (7, None, "echo hi"),
    ]


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.lang == "yaml"], ids=lambda b: f"L{b.line}"
)
def test_yaml_blocks_are_valid_configs(block: Block, tmp_path: Path) -> None:
    from pipeline.config import load_config

    path = tmp_path / "block.yaml"
    path.write_text(block.text + "\n")
    load_config(path, environ={})  # a ConfigError names the key


@pytest.fixture(scope="module")
def demo_folder(small_demo_run: tuple[Path, str]) -> Path:
    """A folder as after ``make demo``: ``demo-out/`` (the session's small demo,
    ``tests/e2e/conftest.py``), ``.venv/bin/pacsflow`` and the repository's folders the
    README names."""
    work = small_demo_run[0]
    venv_bin = work / ".venv" / "bin"
    venv_bin.mkdir(parents=True, exist_ok=True)
    for name, target in (("pacsflow", EXE), ("python", Path(sys.executable))):
        if not (venv_bin / name).exists():
            (venv_bin / name).symlink_to(target)
    for name in ("configs", "deploy", "models", "notebooks", "tools"):
        if not (work / name).exists():
            (work / name).symlink_to(REPO / name)
    return work


def _env() -> dict[str, str]:
    """The environment of a shell that ran ``make demo``: no pacsflow variables set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW")}


@pytest.mark.slow
@pytest.mark.parametrize("block", TO_RUN, ids=lambda b: f"L{b.line}")
def test_readme_block_runs_on_the_demo_lake(block: Block, demo_folder: Path) -> None:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.commands],
        cwd=demo_folder,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (
        f"README line {block.line} exited {done.returncode}:\n{block.commands}\n"
        f"--- stdout\n{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )
