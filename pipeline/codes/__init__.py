"""The coded concepts of a model's labels: what write-back puts into SEG segments and SR groups.

Codes follow the model, and are applied when results are built (write-back), never copied into
the findings at inference time: a corrected mapping takes effect on the next write-back,
without re-running inference. A label's codes come from the first of:

1. the model's registry entry (``configs/models.yaml``, ``labels: {<label>: {category, type,
   modifier}}``), when it gives both a category and a type;
2. the shipped code tables the entry names (``code_tables``, default ``[totalsegmentator]``),
   by label name (case, spaces and hyphens ignored): ``totalsegmentator`` is TotalSegmentator's
   SNOMED CT mapping of its classes (``data/README.md`` says where it comes from and under
   which licence), which codes the 104 labels of the model-zoo bundle
   ``wholeBody_ct_segmentation``;
3. otherwise a clearly local code: category ``C-UNCODED`` and type ``L<12 hex>`` in the private
   coding scheme ``99PACSFLOW``, the type's meaning being the label's name. Such a label is
   reported before inference (a warning naming it, and ``pacsflow models check``) and written
   back like any other, never dropped.

Nothing here imports a stage: the infer stage reports, the write-back stage applies.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

import yaml

from pipeline.errors import ConfigError

__all__ = [
    "DEFAULT_TABLES",
    "LOCAL_SCHEME",
    "TABLES",
    "LabelCodes",
    "ModelCodes",
    "codes_digest",
    "default_registry_path",
    "local_codes",
    "normalise_label",
    "registry_codes",
    "registry_entry",
    "resolve",
    "resolve_all",
    "table",
    "triple",
]

Triple = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)

#: the private coding scheme of labels that no registry entry or table codes
LOCAL_SCHEME: Final = "99PACSFLOW"
LOCAL_SCHEME_NAME: Final = "pacsflow local codes of model labels without a standard code"
_LOCAL_CATEGORY: Final = ("C-UNCODED", LOCAL_SCHEME, "Uncoded label")

#: shipped tables, by the name a registry entry's ``code_tables`` uses -> file in data/
TABLES: Final = {"totalsegmentator": "totalsegmentator_snomed_mapping.csv"}
#: the tables an entry consults when it names none
DEFAULT_TABLES: Final = ("totalsegmentator",)


@dataclass(frozen=True)
class LabelCodes:
    """The codes of one label and where they came from."""

    category: Triple  # SEG Segmented Property Category; SR finding category
    type: Triple  # SEG Segmented Property Type; SR finding type
    source: str  # "registry", a table name, or "local"
    type_modifier: Triple | None = None  # e.g. Left / Right
    region: Triple | None = None  # SEG Anatomic Region; SR finding site
    region_modifier: Triple | None = None
    rgb: tuple[int, int, int] | None = None  # recommended display colour

    @property
    def local(self) -> bool:
        """True for the private ``99PACSFLOW`` code of a label nothing else codes."""
        return self.source == "local"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (lists for triples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def triple(raw: Any, where: str = "code") -> Triple:
    """A ``(value, scheme, meaning)`` triple from ``[value, scheme, meaning]``, a mapping with
    those keys, or an object with those attributes (the registry's ``Code``).

    Raises:
        ConfigError: ``raw`` is none of these, or a part is empty.
    """
    if isinstance(raw, list | tuple) and len(raw) == 3:
        out = (str(raw[0]), str(raw[1]), str(raw[2]))
    elif isinstance(raw, Mapping) and {"value", "scheme", "meaning"} <= set(raw):
        out = (str(raw["value"]), str(raw["scheme"]), str(raw["meaning"]))
    elif all(hasattr(raw, a) for a in ("value", "scheme", "meaning")):
        out = (str(raw.value), str(raw.scheme), str(raw.meaning))
    else:
        raise ConfigError(f"{where}: expected [code value, scheme, meaning], got {raw!r}")
    if not all(part.strip() for part in out):
        raise ConfigError(f"{where}: a code needs a value, a scheme and a meaning: {raw!r}")
    return out


def normalise_label(label: str) -> str:
    """The key a label is looked up by in a table: lower case, runs of spaces, hyphens and
    underscores as one ``_`` (``"Right Kidney"`` -> ``right_kidney``)."""
    return re.sub(r"[\s_\-]+", "_", label.strip().lower())


def _cell_triple(row: Mapping[str, str], prefix: str) -> Triple | None:
    value = (row.get(f"{prefix}.CodeValue") or "").strip()
    if not value:
        return None
    return (
        value,
        (row.get(f"{prefix}.CodingSchemeDesignator") or "").strip(),
        (row.get(f"{prefix}.CodeMeaning") or "").strip(),
    )


def _read_table(name: str, text: str) -> dict[str, LabelCodes]:
    out: dict[str, LabelCodes] = {}
    for line, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        category = _cell_triple(row, "SegmentedPropertyCategoryCodeSequence")
        kind = _cell_triple(row, "SegmentedPropertyTypeCodeSequence")
        structure = (row.get("Structure") or "").strip()
        if not structure or category is None or kind is None:
            raise ConfigError(f"code table {name!r}, line {line}: no structure, category or type")
        rgb = None
        parts = [p.strip() for p in (row.get("DicomRGBColor") or "").split(",")]
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            rgb = (int(parts[0]), int(parts[1]), int(parts[2]))
        out[normalise_label(structure)] = LabelCodes(
            category=category,
            type=kind,
            source=name,
            type_modifier=_cell_triple(row, "SegmentedPropertyTypeModifierCodeSequence"),
            region=_cell_triple(row, "AnatomicRegionSequence"),
            region_modifier=_cell_triple(row, "AnatomicRegionModifierSequence"),
            rgb=rgb,
        )
    return out


@functools.lru_cache(maxsize=16)
def _cached_table(name: str, path: str, mtime_ns: int) -> dict[str, LabelCodes]:
    if path:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("pipeline.codes").joinpath("data", TABLES[name]).read_text("utf-8")
    return _read_table(name, text)


def table(name: str, *, path: Path | None = None) -> dict[str, LabelCodes]:
    """The code table ``name`` (see :data:`TABLES`), by normalised label name.

    ``path`` reads another copy of the table (e.g. a site's corrected one) under that name.

    Raises:
        ConfigError: an unknown table name (the message lists the known ones), a ``path``
            that cannot be read, or a row without a structure, category or type.
    """
    if path is None:
        if name not in TABLES:
            raise ConfigError(
                f"no code table {name!r}; shipped tables: {', '.join(sorted(TABLES))}"
            )
        return _cached_table(name, "", 0)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise ConfigError(f"code table {name!r}: cannot read {path} ({exc.strerror})") from None
    return _cached_table(name, str(path), mtime)


def local_codes(label: str) -> LabelCodes:
    """The private code of a label nothing codes: its meaning is the label's name."""
    digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:12].upper()
    return LabelCodes(
        category=_LOCAL_CATEGORY,
        type=(f"L{digest}", LOCAL_SCHEME, label[:64] or "unnamed label"),
        source="local",
    )


def _from_spec(spec: Any, where: str) -> LabelCodes | None:
    if spec is None:
        return None
    get = spec.get if isinstance(spec, Mapping) else lambda k: getattr(spec, k, None)
    category, kind, modifier = get("category"), get("type"), get("modifier")
    if category is None or kind is None:
        return None
    return LabelCodes(
        category=triple(category, f"{where}.category"),
        type=triple(kind, f"{where}.type"),
        source="registry",
        type_modifier=triple(modifier, f"{where}.modifier") if modifier is not None else None,
    )


def resolve(
    label: str,
    spec: Any = None,
    tables: Sequence[str] = DEFAULT_TABLES,
    *,
    table_paths: Mapping[str, Path] | None = None,
) -> LabelCodes:
    """The codes of ``label``: the registry's ``spec`` (a mapping or the registry's
    ``LabelSpec``) when it has a category and a type, else the first of ``tables`` that names
    it, else :func:`local_codes`.

    Raises:
        ConfigError: a malformed code in ``spec``, or an unknown table.
    """
    coded = _from_spec(spec, f"labels.{label}")
    if coded is not None:
        return coded
    key = normalise_label(label)
    for name in tables:
        hit = table(name, path=(table_paths or {}).get(name)).get(key)
        if hit is not None:
            return hit
    return local_codes(label)


def resolve_all(
    labels: Iterable[str],
    specs: Mapping[str, Any] | None = None,
    tables: Sequence[str] = DEFAULT_TABLES,
    *,
    table_paths: Mapping[str, Path] | None = None,
) -> dict[str, LabelCodes]:
    """:func:`resolve` for each of ``labels``, in order."""
    specs = specs or {}
    return {
        label: resolve(label, specs.get(label), tables, table_paths=table_paths) for label in labels
    }


def codes_digest(codes: Mapping[str, LabelCodes]) -> str:
    """A short digest of resolved codes (write-back derives its objects' UIDs from it, so a
    corrected mapping gives new objects instead of being skipped as already delivered)."""
    text = json.dumps({k: v.as_dict() for k, v in sorted(codes.items())}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class ModelCodes:
    """What codes one model's finding labels: its registry entry's ``labels`` and
    ``candidates`` (a candidate finding ``<name>_<n>`` takes the codes of ``<name>``), then its
    code ``tables`` (``table_paths``: other copies of some), then a local code."""

    labels: Mapping[str, Any] = field(default_factory=dict)
    candidates: Mapping[str, Any] = field(default_factory=dict)
    tables: tuple[str, ...] = DEFAULT_TABLES
    table_paths: Mapping[str, Path] = field(default_factory=dict)

    def spec(self, label: str) -> Any:
        """The registry's spec of a finding label, or None."""
        if label in self.labels:
            return self.labels[label]
        match = re.fullmatch(r"(.+)_(\d+)", label)
        if match and match.group(1) in self.candidates:
            return self.candidates[match.group(1)]
        return None

    def resolve(self, labels: Iterable[str]) -> dict[str, LabelCodes]:
        """:func:`resolve` of each of ``labels``, in order.

        Raises:
            ConfigError: a malformed code in the registry, or an unknown table.
        """
        return {
            label: resolve(label, self.spec(label), self.tables, table_paths=self.table_paths)
            for label in labels
        }


def default_registry_path() -> Path:
    """``configs/models.yaml`` of the pacsflow checkout."""
    return Path(__file__).resolve().parents[2] / "configs" / "models.yaml"


def registry_entry(path: Path, *, entry: str | None, model: str) -> Mapping[str, Any] | None:
    """The raw registry entry of a model in the registry file at ``path``, read afresh: the
    entry named ``entry`` (as the findings recorded it) or, without one, the one entry whose
    bundle folder is named ``model``; None when the file or the entry is not there.

    Raises:
        ConfigError: the registry is not valid YAML.
    """
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    models = raw.get("models") if isinstance(raw, Mapping) else None
    if not isinstance(models, Mapping):
        return None
    body: Any = models.get(entry) if entry else None
    if body is None:
        named = [
            b
            for b in models.values()
            if isinstance(b, Mapping)
            and Path(str(b.get("bundle", ""))).name.removesuffix(".zip") == model
        ]
        body = named[0] if len(named) == 1 else None
    return body if isinstance(body, Mapping) else None


def registry_codes(path: Path | None, *, entry: str | None, model: str) -> ModelCodes:
    """The :class:`ModelCodes` of a model in the registry at ``path`` (default
    :func:`default_registry_path`), read afresh (a corrected registry counts at once).

    The entry is ``entry`` (the registry name the findings recorded) or, for findings that did
    not record one, the one entry whose bundle folder is named ``model``. A model the registry
    does not name is coded by :data:`DEFAULT_TABLES`.

    Raises:
        ConfigError: the registry is not valid YAML.
    """
    path = path or default_registry_path()
    body = registry_entry(path, entry=entry, model=model)
    if body is None:
        return ModelCodes()
    return ModelCodes(
        labels=dict(body.get("labels") or {}),
        candidates=dict(body.get("candidates") or {}),
        tables=tuple(str(t) for t in body.get("code_tables", DEFAULT_TABLES) or ()),
        table_paths={
            str(k): path.parent / str(v) for k, v in (body.get("code_table_paths") or {}).items()
        },
    )
