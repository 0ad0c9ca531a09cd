"""Every environment variable pacsflow reads, read here and nowhere else.

- ``PACSFLOW_KEY_FILE``: path of the secret key file for pseudonyms (``pacsflow keygen``).
- ``PACSFLOW_DEBUG=1``: do not wrap unexpected exceptions, so tracebacks reach a debugger.
- ``PACSFLOW__SECTION__KEY=value``: overrides a config value, e.g.
  ``PACSFLOW__COMPUTE__WORKERS=4`` or ``PACSFLOW__LAKE=/data/lake``. Values are parsed as YAML
  scalars (``4`` is an int, ``true`` a bool, ``[a, b]`` a list).
- Credentials are never config values: the config names the variables that hold them
  (e.g. ``source.auth.password_env: PACS_PASSWORD``), and :func:`secret` reads them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ENV_PREFIX", "debug_enabled", "env_overrides", "key_file_from_env", "secret"]

ENV_PREFIX = "PACSFLOW__"


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Collect ``PACSFLOW__SECTION__KEY`` variables into a nested dict (keys lower-cased)."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node[parts[-1]] = value
    return out


def key_file_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    """Return ``PACSFLOW_KEY_FILE`` as a Path, or None."""
    environ = os.environ if environ is None else environ
    value = environ.get("PACSFLOW_KEY_FILE")
    return Path(value) if value else None


def debug_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``PACSFLOW_DEBUG`` is set to a true value."""
    environ = os.environ if environ is None else environ
    return environ.get("PACSFLOW_DEBUG", "").lower() in {"1", "true", "yes", "on"}


def secret(var: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """Read a secret from the environment variable the config names; None if unnamed or unset."""
    if not var:
        return None
    environ = os.environ if environ is None else environ
    return environ.get(var) or None
