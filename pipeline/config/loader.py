"""Load a :class:`PipelineConfig` from layered sources.

Precedence, lowest to highest:

1. model defaults;
2. the config file (``--config FILE``, e.g. ``configs/demo.yaml``);
3. its site-local twin ``<dir>/local/<name>.yaml`` when present (git-ignored: hosts, AE titles,
   names of secret env vars);
4. ``PACSFLOW__SECTION__KEY`` environment variables;
5. CLI flags (``--lake``, ``--workers``, ``--scheduler``, ...).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.env import env_overrides
from pipeline.config.models import PipelineConfig
from pipeline.errors import ConfigError

__all__ = ["config_hash", "deep_merge", "load_config", "local_twin"]


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into ``base`` recursively (mappings merge, anything else replaces)."""
    out: dict[str, Any] = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def local_twin(path: Path) -> Path:
    """The site-local override of a config file: ``<dir>/local/<name>``."""
    return path.parent / "local" / path.name


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Names of the valid keys of the (sub)model that ``loc`` points into."""
    current: type[BaseModel] = model
    for part in loc:
        field = current.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            current = ann
        else:
            break
    return list(current.model_fields)


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            valid = _fields_at(PipelineConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            lines.append(f"unknown key '{dotted}': {hint}valid keys here: {', '.join(valid)}")
        else:
            lines.append(f"'{dotted}': {err['msg']}")
    return ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(lines))


def load_config(
    path: Path | str | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> PipelineConfig:
    """Build the configuration from defaults, file, local twin, environment and overrides.

    Parameters
    ----------
    path:
        A YAML config file, or None for defaults only.
    overrides:
        Highest-precedence values (the CLI's flags), as a nested mapping.
    environ:
        Environment to read ``PACSFLOW__*`` variables from (default ``os.environ``).
    defaults:
        Values just above the model defaults and below the file (a command's embedded
        defaults, e.g. the demo's).

    Returns
    -------
    PipelineConfig
        The validated, frozen configuration.

    Raises
    ------
    ConfigError
        When a file cannot be read or parsed, or a value or key is invalid; unknown keys are
        reported with the closest valid key.
    """
    merged: dict[str, Any] = dict(defaults or {})
    sources = ["defaults"]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        merged = deep_merge(merged, _read_yaml(path))
        sources.append(str(path))
        twin = local_twin(path)
        if twin.is_file():
            merged = deep_merge(merged, _read_yaml(twin))
            sources.append(str(twin))
    env = env_overrides(environ)
    if env:
        merged = deep_merge(merged, env)
        sources.append("PACSFLOW__* environment")
    if overrides:
        merged = deep_merge(merged, {k: v for k, v in overrides.items() if v is not None})
        sources.append("command-line flags")
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as exc:
        raise _explain(exc, " + ".join(sources)) from None


def manifest_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The configuration as run manifests record it: without the review users (their password
    hashes are credentials, and adding a reviewer does not change what a pipeline run does)."""
    return cfg.model_dump(mode="json", exclude={"review": {"users"}})


def config_hash(cfg: PipelineConfig) -> str:
    """A stable SHA-256 of the effective configuration (recorded in run manifests)."""
    blob = json.dumps(manifest_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
