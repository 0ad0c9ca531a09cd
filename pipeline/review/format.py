"""One way to write a measurement: readable names and units for the pages and the report.

Findings store measurements as JSON ``{key: {"value": v, "unit": u}}`` with machine keys
(``diameter_mm``, ``mean_hu``) and UCUM units (``[hnsf'U]``, ``1``). Pages show them as
``diameter 12.3 mm``, ``mean density -42 HU``, ``elongation 1.16``: the unit is said once, by
the value, and a dimensionless ``1`` is not written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["NAMES", "UNITS", "label_name", "measurement_rows", "quantity", "unit_text"]

#: Readable names of measurement keys (a key not here: underscores become spaces and a known
#: unit suffix is dropped).
NAMES: dict[str, str] = {
    "voxel_count": "voxels",
    "volume_ml": "volume",
    "mean_hu": "mean density",
    "mean_value": "mean value",
    "diameter_mm": "diameter",
    "centre_mm": "centre",
    "size_mm": "size",
    "elongation": "elongation",
    "score": "score",
    "probability": "probability",
}
#: UCUM and stored units -> how pages write them ("" for none).
UNITS: dict[str, str] = {
    "1": "",
    "": "",
    "ml": "mL",
    "mL": "mL",
    "mm": "mm",
    "[hnsf'U]": "HU",
    "hu": "HU",
    "voxels": "",
    "stored": "",
}
#: Key suffixes that name a unit, and that unit.
_SUFFIX_UNITS = {"_mm": "mm", "_ml": "mL", "_hu": "HU", "_s": "s"}
#: Decimals by unit (others: 2).
_DIGITS = {"HU": 0, "mL": 2, "mm": 1}


def unit_text(unit: str | None) -> str:
    """How a page writes ``unit`` (``[hnsf'U]`` -> ``HU``, ``1`` -> nothing)."""
    if unit is None:
        return ""
    return UNITS.get(unit, UNITS.get(unit.lower(), unit))


def label_name(key: str) -> str:
    """The readable name of a measurement key or label (``diameter_mm`` -> ``diameter``,
    ``adipose_tissue`` -> ``adipose tissue``)."""
    if key in NAMES:
        return NAMES[key]
    for suffix in _SUFFIX_UNITS:
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
            break
    return key.replace("_", " ").strip()


def _unit_of_key(key: str) -> str:
    if key == "mean_hu":
        return "HU"
    for suffix, unit in _SUFFIX_UNITS.items():
        if key.endswith(suffix):
            return unit
    return ""


def _number(value: float | int, unit: str, digits: int | None) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ")
    d = digits if digits is not None else _DIGITS.get(unit, 2)
    if abs(value) >= 1000:
        d = 0
    return f"{value:.{d}f}"


def quantity(
    value: Any, unit: str | None = None, *, key: str = "", digits: int | None = None
) -> str:
    """A value with its unit, readable: ``12.3 mm``, ``1.16``, ``-42 HU``, ``12.5 × 8.0 mm``;
    ``—`` for none. The unit is the given one (UCUM or stored), else the key's suffix.

    Examples
    --------
    >>> quantity(1.1634, "1", key="elongation")
    '1.16'
    >>> quantity(12.34, "mm")
    '12.3 mm'
    >>> quantity(-41.6, "[hnsf'U]")
    '-42 HU'
    >>> quantity([12.5, 8.0, 3.0], key="size_mm")
    '12.5 × 8.0 × 3.0 mm'
    >>> quantity(None)
    '—'
    """
    u = unit_text(unit) if unit is not None else _unit_of_key(key)
    if value is None:
        return "—"
    if isinstance(value, Sequence) and not isinstance(value, str):
        parts = [_number(v, u, digits) if isinstance(v, int | float) else str(v) for v in value]
        text = " × ".join(parts)
    elif isinstance(value, int | float):
        text = _number(value, u, digits)
    else:
        text = str(value)
    return f"{text} {u}".rstrip() if u else text


def measurement_rows(
    raw: str | Mapping[str, Any] | None, *, skip: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """A finding's measurements (its ``measurements`` JSON, or the parsed mapping) as
    ``(readable name, readable value with unit)`` pairs, keys in ``skip`` left out.

    Examples
    --------
    >>> measurement_rows('{"diameter_mm": {"value": 12.34, "unit": "mm"},'
    ...                  ' "elongation": {"value": 1.16, "unit": "1"}}')
    [('diameter', '12.3 mm'), ('elongation', '1.16')]
    """
    if isinstance(raw, str) or raw is None:
        try:
            parsed = json.loads(raw or "{}")
        except ValueError:
            parsed = {}
    else:
        parsed = raw
    out: list[tuple[str, str]] = []
    if not isinstance(parsed, Mapping):
        return out
    for key, m in parsed.items():
        if key in skip:
            continue
        if isinstance(m, Mapping):
            out.append((label_name(key), quantity(m.get("value"), m.get("unit"), key=key)))
        else:
            out.append((label_name(key), quantity(m, key=key)))
    return out
