"""Readable ``--help`` for every verb: prose reflowed, examples kept, plain metavars.

Docstrings are wrapped at 99 columns in the source; Typer's rich help keeps those line breaks,
so sentences broke in the middle at any other terminal width. :class:`HelpGroup` (the root
group of ``pacsflow``) walks every command once, when the CLI is built, and

- joins the lines of each prose paragraph (the terminal wraps them), keeping verbatim the
  paragraphs whose lines are indented (examples) and those that start with ``\\b``;
- gives options a plain metavar (``N``, ``PATH``, ``TEXT``, ``a|b``) instead of ``<int>``,
  and flags none at all (Typer printed ``<bool>`` beside every switch);
- names arguments in capitals (``CONFIG``, not ``{config_file}`` and ``<path>``), and shows
  no type for ``--help``.

Typer builds its parameter objects itself, with no hook for their classes, so the last two
set display methods on the objects.

A verb's examples are the last paragraph of its docstring: ``Examples:`` and the command
lines, indented.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

from typer.core import TyperArgument, TyperGroup, TyperOption

__all__ = ["HelpGroup", "examples_of", "reflow"]

#: Metavars by Typer's type label (``<int>``: ``int``); a choice shows its choices.
_METAVARS = {
    "int": "N",
    "int range": "N",
    "float": "X",
    "float range": "X",
    "path": "PATH",
    "file": "PATH",
    "directory": "DIR",
    "str": "TEXT",
    "bool": "",
    "datetime": "DATETIME",
}
#: Arguments whose plain name is not the best one.
_ARGUMENT_NAMES = {"config_file": "CONFIG"}


def reflow(help_text: str) -> str:
    """``help_text`` with each prose paragraph on one line; a paragraph of indented lines (the
    examples) becomes one ``$ command`` line each (Typer dedents what follows the first
    paragraph, so indentation alone would not show); a paragraph starting with ``\b`` is kept
    as written."""
    text = inspect.cleandoc(help_text)
    body, sep, rest = text.partition("\f")
    out = []
    for para in body.split("\n\n"):
        lines = para.split("\n")
        if para.startswith("\b"):
            out.append(para)
        elif all(ln.startswith(" ") for ln in lines):
            out.append("\n".join(f"$ {ln.strip()}" for ln in lines))
        elif any(ln.startswith(" ") for ln in lines[1:]):
            out.append(para)
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(out) + sep + rest


def examples_of(help_text: str | None) -> list[str]:
    """The example commands of a help text: the lines after ``Examples:``, indented (as
    written in a docstring) or as ``$ command`` (after :func:`reflow`)."""
    text = inspect.cleandoc(help_text or "")
    _, found, after = text.partition("Examples:")
    if not found:
        return []
    out = []
    for line in after.splitlines():
        if line.startswith("$ "):
            out.append(line[2:].strip())
        elif line.startswith(" ") and line.strip():
            out.append(line.strip())
    return out


def _metavar(param: TyperOption) -> str:
    desc = param.type_descriptor
    if desc.is_choice:
        label = "|".join(str(getattr(c, "value", c)) for c in desc.choices or ())
    else:
        label = param.display_type(None).strip("<>")  # type: ignore[arg-type]
        label = _METAVARS.get(label, label.upper())
    return f"{label}..." if desc.is_list and label else label


def _no_type(ctx: Any) -> str | None:
    return None


def _usage_name(param: TyperArgument) -> Any:
    def usage() -> str:
        name = param.display_name_raw if param.required else f"[{param.display_name_raw}]"
        return f"{name}..." if param.nargs != 1 else name

    return usage


def _plain_help(command: Any) -> None:
    """Build and cache ``command``'s ``--help`` option now (Typer caches the one it builds
    in ``_help_option``), without a type shown."""
    names = {"-h", "--help"}
    for param in command.params:
        names.difference_update(param.opts)
        names.difference_update(param.secondary_opts)
    option = command.get_help_option(SimpleNamespace(help_option_names=sorted(names)))
    if option is not None:
        option.metavar = ""


def tidy(command: Any) -> None:
    """Reflow ``command``'s help and set plain metavars, recursively through groups."""
    _plain_help(command)
    if command.help:
        command.help = reflow(command.help)
    for param in command.params:
        if isinstance(param, TyperOption):
            if param.is_flag or param.count:
                param.metavar = ""  # a switch takes no value: no type to show
                if param.count:
                    param.show_default = False
            elif param.metavar is None:
                param.metavar = _metavar(param)
        elif isinstance(param, TyperArgument) and param.name:
            if param.metavar is None:
                param.metavar = _ARGUMENT_NAMES.get(param.name, param.name.upper())
            # the name column shows it; no "<path>" beside it, no braces in the usage line
            param.display_type_rich = _no_type  # type: ignore[method-assign]
            param._usage_display_name = _usage_name(param)  # type: ignore[method-assign]
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            tidy(sub)


class HelpGroup(TyperGroup):
    """The root group: every command tidied (see the module docstring) once it is built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tidy(self)
