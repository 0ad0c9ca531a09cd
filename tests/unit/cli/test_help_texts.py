"""Every verb's ``--help`` reads well (issue #24): an example each, whole sentences at any width,
no ``<bool>``/``<int>`` noise, and examples that name real verbs and options."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from typing import Any

import pytest
import typer
import typer.rich_utils
from typer.testing import CliRunner

from pipeline.cli._help import examples_of, reflow
from pipeline.cli.main import app

runner = CliRunner()


def _commands() -> Iterator[tuple[list[str], Any]]:
    def walk(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    yield from walk(typer.main.get_command(app), [])


COMMANDS = {" ".join(path) or "pacsflow": path for path, _ in _commands()}


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Render help 2000 columns wide: a paragraph on one line unless its text breaks it."""
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 2000)


def test_every_command_is_covered() -> None:
    assert {"run", "status", "sql", "crawl", "audit repair", "models check"} <= set(COMMANDS)
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_has_an_example_and_no_type_noise(name: str, wide: None) -> None:
    result = runner.invoke(app, [*COMMANDS[name], "--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Examples:" in text, name
    assert re.search(r"^\s*\$ pacsflow ", text, re.M), name
    # Typer's type labels (not "2.25.<int>" in an option's help text)
    noise = re.findall(r"(?<![\w.])<(?:bool|int|int range|str|path|float)>", text)
    assert not noise, (name, noise)
    usage = next(ln for ln in text.splitlines() if "Usage:" in ln)
    assert "{" not in usage, usage


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_paragraphs_are_not_broken_mid_sentence(name: str, wide: None) -> None:
    text = runner.invoke(app, [*COMMANDS[name], "--help"]).output
    lines = [ln.strip() for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Usage:")) + 1
    end = next((i for i, ln in enumerate(lines) if ln.startswith("╭")), len(lines))
    description = "\n".join(lines[start:end]).strip()
    for para in description.split("\n\n"):
        if para.startswith(("Examples:", "$ ")):
            continue
        assert "\n" not in para, (name, para)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_examples_name_real_verbs_and_options(name: str) -> None:
    command = dict((" ".join(p) or "pacsflow", c) for p, c in _commands())[name]
    examples = examples_of(command.help)
    assert examples, name
    for example in examples:
        words = shlex.split(example)
        assert words[0] == "pacsflow", example
        target: Any = typer.main.get_command(app)
        for word in words[1:]:
            sub = getattr(target, "commands", {}).get(word)
            if sub is None:
                break
            target = sub
        known = {o for p in target.params for o in (*p.opts, *p.secondary_opts)}
        known |= {"--help", "-h"}
        for word in words[1:]:
            if word.startswith("-") and word != "-":
                assert word.split("=")[0] in known, (example, word)


def test_reflow_joins_prose_and_keeps_examples() -> None:
    doc = """First line of the summary
    goes on here.

    A second paragraph
    wrapped in the source.

    Examples:

        pacsflow demo --out x
        pacsflow status --lake x/lake
    """
    assert reflow(doc) == (
        "First line of the summary goes on here.\n\n"
        "A second paragraph wrapped in the source.\n\n"
        "Examples:\n\n"
        "$ pacsflow demo --out x\n$ pacsflow status --lake x/lake"
    )
    assert (
        examples_of(reflow(doc))
        == examples_of(doc)
        == [
            "pacsflow demo --out x",
            "pacsflow status --lake x/lake",
        ]
    )
