"""A model-zoo bundle's ``inference.json`` made runnable by pacsflow, as shipped.

A bundle's inference config is written for MONAI's own loop: ``LoadImaged`` reads a file from
``datalist``, ``SaveImaged`` writes the prediction to ``output_dir``, the inferer picks its
``device``, the weights are found by ``checkpointloader``. pacsflow runs the network in its
own batched loop (:mod:`pipeline.infer.engine`) on its own volumes, so, as MONAI Deploy does,
it keeps every other transform of the bundle and changes only these (:func:`prepare`):

- the **loader** (``LoadImage``/``LoadImaged`` in ``preprocessing``) is removed: pacsflow feeds
  each volume as the MetaTensor ``LoadImaged`` + ``EnsureChannelFirstd`` would give (float32,
  channel first, RAS affine, ``original_channel_dim`` 0, ``spatial_shape``), under the
  loader's key (``image_key``); a later ``EnsureChannelFirstd`` is then a no-op;
- **savers** (``SaveImage``/``SaveImaged`` and any ``Save*`` transform) are removed from
  ``postprocessing``: results go to the lake;
- the inferer's ``device``/``sw_device`` are removed: pacsflow places the work
  (``compute.device``);
- the registry entry's ``overrides`` (``id#path: value``, e.g. ``displayable_configs#highres:
  false`` for wholeBody's low-res variant) and ``drop`` (ids removed, e.g. a keyword the
  installed MONAI no longer takes) are applied first.

Allow-list mode (any bundle whose content hash is not pinned and approved, see
:mod:`pipeline.infer.trust`) evaluates no code. What it accepts:

- ``_target_`` names on :data:`pipeline.infer.bundle.ALLOWED_TARGETS`;
- plain JSON values and ``@id`` / ``@id#key`` references to other plain values of the config
  (resolved here, as MONAI would, recursively; a reference to a component such as
  ``@preprocessing`` for ``Invertd`` is kept for MONAI's parser);
- ``$`` expressions that are *data*: literals, lists, ``@`` references, ``a if c else b``,
  comparisons, ``and``/``or``/``not`` and ``+ - * /`` on them (:func:`data_expression`), e.g.
  wholeBody's ``"$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]"``.
  Anything else (a call, an attribute, a lambda, an import, a ``%`` macro) is refused with
  its place in the config, before anything is built.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pipeline.errors import ModelError

__all__ = [
    "CONFIG_KEYS",
    "BundleConfigError",
    "PreparedConfig",
    "content_hash",
    "data_expression",
    "prepare",
    "weights_file",
]

#: the parts of ``inference.json`` pacsflow builds
CONFIG_KEYS: Final = ("network_def", "preprocessing", "inferer", "postprocessing")
#: transforms that read files (removed: pacsflow feeds the volume)
_LOADERS: Final = frozenset({"LoadImage", "LoadImaged"})
#: inferer arguments pacsflow decides
_PLACEMENT: Final = ("device", "sw_device")
#: what a bundle's content hash covers
_HASHED: Final = ("configs", "scripts")
_REF: Final = re.compile(r"@([A-Za-z_][\w]*(?:#[\w]+)*)")


class BundleConfigError(ModelError):
    """A config that cannot be made runnable; the message names where and why."""


@dataclass
class PreparedConfig:
    """The parts pacsflow builds, with the bundle's ``@`` references they need."""

    #: ``network_def``, ``preprocessing``, ``inferer``, ``postprocessing`` and the ids they refer
    #: to, ready for MONAI's ``ConfigParser``
    config: dict[str, Any]
    #: the key the bundle's loader wrote the image under (``image`` when none)
    image_key: str = "image"
    #: what was changed, for the log: ``preprocessing: removed LoadImaged``, ...
    changes: list[str] = field(default_factory=list)


def _name(target: Any) -> str:
    return str(target).rsplit(".", 1)[-1]


def content_hash(path: Path) -> str:
    """``sha256:<hex>`` over every file of the bundle's ``configs/`` and ``scripts/`` (relative
    path and bytes, in path order): what a pin approves. Weights are identified apart (their
    own sha256 in the model identity)."""
    digest = hashlib.sha256()
    for folder in _HASHED:
        root = path / folder
        if not root.is_dir():
            continue
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            if "__pycache__" in file.parts:
                continue
            rel = file.relative_to(path).as_posix().encode()
            data = file.read_bytes()
            digest.update(len(rel).to_bytes(8, "big") + rel)
            digest.update(len(data).to_bytes(8, "big") + data)
    return "sha256:" + digest.hexdigest()


# ------------------------------------------------------------------------ config paths


def _split_id(ident: str) -> list[str]:
    return [p for p in ident.split("#") if p != ""]


def _get(config: Any, ident: str) -> Any:
    node = config
    for part in _split_id(ident):
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise KeyError(ident) from None
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(ident)
    return node


def _parent(config: dict[str, Any], ident: str) -> tuple[Any, str]:
    parts = _split_id(ident)
    if not parts:
        raise KeyError(ident)
    node: Any = config
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node, parts[-1]


def _set(config: dict[str, Any], ident: str, value: Any) -> None:
    try:
        node, last = _parent(config, ident)
        if isinstance(node, list):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise KeyError(ident)
    except (KeyError, IndexError, ValueError, TypeError):
        raise BundleConfigError(f"override {ident!r}: no such place in inference.json") from None


def _drop(config: dict[str, Any], ident: str) -> None:
    try:
        node, last = _parent(config, ident)
        if isinstance(node, list):
            del node[int(last)]
        else:
            del node[last]
    except (KeyError, IndexError, ValueError, TypeError):
        raise BundleConfigError(f"drop {ident!r}: no such place in inference.json") from None


# ------------------------------------------------------------------ data expressions

_BINARY: Final[dict[type[ast.operator], Callable[[Any, Any], Any]]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_COMPARE: Final[dict[type[ast.cmpop], Callable[[Any, Any], Any]]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_PLAIN = (str, int, float, bool, type(None), list, tuple, dict)


def data_expression(expr: str, resolve: Callable[[str], Any]) -> Any:
    """Evaluate a bundle ``$`` expression that only combines data, without running code.

    ``expr`` is the text after ``$``; ``@id`` references are looked up with ``resolve``.
    Accepted: literals (numbers, strings, ``True``/``False``/``None``, lists, tuples, dicts),
    references, ``a if c else b``, ``and``/``or``/``not``, unary minus, comparisons and
    ``+ - * /``. Anything else (names, calls, attributes, subscripts, lambdas, ...) raises
    :class:`BundleConfigError` naming it.
    """
    refs: dict[str, str] = {}

    def placeholder(match: re.Match[str]) -> str:
        name = f"__ref{len(refs)}"
        refs[name] = match.group(1)
        return name

    source = _REF.sub(placeholder, expr.strip())
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError:
        raise BundleConfigError("not a Python expression") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in refs:
            value = resolve(refs[node.id])
            if not isinstance(value, _PLAIN):
                raise BundleConfigError(f"@{refs[node.id]} is not a plain value")
            return copy.deepcopy(value)
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.Dict) and all(k is not None for k in node.keys):
            return {ev(k): ev(v) for k, v in zip(node.keys, node.values, strict=True) if k}
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, ast.BoolOp):
            values = [ev(v) for v in node.values]
            if isinstance(node.op, ast.And):
                return all(values) and values[-1]
            return next((v for v in values if v), values[-1])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not ev(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = ev(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = ev(right_node)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        what = type(node).__name__
        if isinstance(node, ast.Name):
            what = f"the name {node.id!r}"
        elif isinstance(node, ast.Attribute):
            what = f"the attribute {ast.unparse(node)!r}"
        elif isinstance(node, ast.Call):
            func = node.func
            short = func.id if isinstance(func, ast.Name) else ast.unparse(func)
            short = short if len(short) <= 40 else "..." + short[-37:]
            what = f"a call ({short}(...))"
        raise BundleConfigError(f"{what} is code")

    try:
        return ev(tree.body)
    except BundleConfigError:
        raise
    except Exception as exc:  # e.g. "a" + 1 in the bundle's own expression
        raise BundleConfigError(f"cannot be evaluated ({type(exc).__name__})") from None


# ---------------------------------------------------------------------------- prepare


def _strip(config: dict[str, Any], changes: list[str]) -> str:
    """Remove loaders, savers and placement; return the loader's image key."""
    image_key = "image"
    pre = config.get("preprocessing")
    if isinstance(pre, dict) and isinstance(pre.get("transforms"), list):
        kept = []
        for t in pre["transforms"]:
            if isinstance(t, dict) and _name(t.get("_target_")) in _LOADERS:
                keys = t.get("keys", "image")
                keys = keys[0] if isinstance(keys, list) and keys else keys
                if isinstance(keys, str) and keys.startswith("@"):
                    try:
                        keys = _get(config, keys[1:])
                    except KeyError:
                        keys = "image"
                image_key = str(keys) if isinstance(keys, str) else "image"
                changes.append(f"preprocessing: removed {_name(t['_target_'])} (pacsflow feeds)")
                continue
            kept.append(t)
        pre["transforms"] = kept
    post = config.get("postprocessing")
    if isinstance(post, dict) and isinstance(post.get("transforms"), list):
        kept = []
        for t in post["transforms"]:
            if isinstance(t, dict) and _name(t.get("_target_")).startswith("Save"):
                changes.append(
                    f"postprocessing: removed {_name(t['_target_'])} (results go to the lake)"
                )
                continue
            kept.append(t)
        post["transforms"] = kept
    inferer = config.get("inferer")
    if isinstance(inferer, dict):
        for key in _PLACEMENT:
            if key in inferer:
                del inferer[key]
                changes.append(f"inferer: removed {key} (pacsflow places the work)")
    return image_key


def _refs_in(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _refs_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs_in(value)
    elif isinstance(node, str):
        if node.startswith("@"):
            yield node[1:]
        elif node.startswith("$"):
            yield from _REF.findall(node)


def _is_component(node: Any) -> bool:
    return isinstance(node, dict) and "_target_" in node


def _plain(
    config: dict[str, Any],
    node: Any,
    where: str,
    check_target: Callable[[Any, str], None] | None,
    stack: tuple[str, ...] = (),
) -> Any:
    """``node`` with every data ``@`` reference and data ``$`` expression replaced by its
    value; component references (``@preprocessing``) kept. ``check_target`` refuses a
    ``_target_`` (allow-list mode); ``None`` accepts any."""

    def resolve(ident: str) -> Any:
        if ident in stack:
            raise BundleConfigError(f"{where}: @{ident} refers to itself")
        try:
            value = _get(config, ident)
        except KeyError:
            raise BundleConfigError(f"{where}: @{ident} is not in inference.json") from None
        return _plain(config, value, f"@{ident}", check_target, (*stack, ident))

    if isinstance(node, dict):
        if "_target_" in node and check_target is not None:
            check_target(node["_target_"], where)
        out = {}
        for key, value in node.items():
            if key in ("_requires_", "_mode_") and check_target is not None:
                raise BundleConfigError(f"{where}.{key}: not allowed in allow-list mode")
            if key == "_disabled_" and check_target is not None and value not in (False, "false"):
                raise BundleConfigError(f"{where}.{key}: not allowed in allow-list mode")
            out[key] = _plain(config, value, f"{where}.{key}", check_target, stack)
        return out
    if isinstance(node, list):
        return [_plain(config, v, f"{where}[{i}]", check_target, stack) for i, v in enumerate(node)]
    if isinstance(node, str) and node.startswith("@"):
        ident = node[1:]
        try:
            target = _get(config, ident)
        except KeyError:
            raise BundleConfigError(f"{where}: @{ident} is not in inference.json") from None
        if _is_component(target) and "#" not in ident:
            return node  # a component: MONAI's parser shares the instance
        return resolve(ident)
    if isinstance(node, str) and node.startswith("%"):
        raise BundleConfigError(
            f"{where}: {node[:40]!r} pulls in another file (a % macro): not allowed"
        )
    if isinstance(node, str) and node.startswith("$"):
        try:
            return data_expression(node[1:], resolve)
        except BundleConfigError as exc:
            if check_target is None:
                return node  # trusted: MONAI evaluates it
            raise BundleConfigError(
                f"{where}: {node[:70]!r}: {exc} (allow-list mode runs no code: pin and approve "
                "the bundle (`pacsflow models trust PATH`), or set a plain value in the registry "
                "entry's `overrides`)"
            ) from None
    return node


def _refuse_downloads(network: Any) -> None:
    """Refuse a ``network_def`` that would fetch pretrained weights when built (torchvision's
    ImageNet weights for ``TorchVisionFCModel(pretrained=True)``): pacsflow never downloads,
    and the bundle's own weights replace them anyway."""
    if not isinstance(network, dict):
        return
    value = network.get("pretrained")
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "$true")):
        raise BundleConfigError(
            "network_def#pretrained is true: building the network would download pretrained "
            "weights (pacsflow never downloads; the bundle's own weights replace them). Add "
            '`overrides: {"network_def#pretrained": false}` to the model\'s registry entry'
        )


def prepare(
    raw: Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | None = None,
    drop: Iterable[str] = (),
    check_target: Callable[[Any, str], None] | None = None,
) -> PreparedConfig:
    """The runnable parts of ``inference.json`` (see the module docstring).

    ``check_target`` given (allow-list mode): data references and expressions are resolved
    here and anything else refused; ``None`` (trusted): only the loaders, savers, placement,
    overrides and drops change, and MONAI's parser evaluates the rest.

    Raises:
        BundleConfigError: an override/drop names no place, or (allow-list) code is met.
    """
    config = copy.deepcopy(dict(raw))
    for ident in drop:
        _drop(config, ident)
    for ident, value in (overrides or {}).items():
        _set(config, ident, copy.deepcopy(value))
    changes = [f"override {k}" for k in (overrides or {})] + [f"drop {k}" for k in drop]
    image_key = _strip(config, changes)
    if "network_def" not in config:
        raise BundleConfigError("configs/inference.json has no network_def")
    _refuse_downloads(config["network_def"])
    if check_target is None:
        return PreparedConfig(config=config, image_key=image_key, changes=changes)
    parts: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        if key in config:
            parts[key] = _plain(config, config[key], key, check_target)
    # component references left for MONAI: bring those components along (checked the same way)
    pending = [r for v in parts.values() for r in _refs_in(v)]
    while pending:
        ident = pending.pop()
        if ident in parts:
            continue
        parts[ident] = _plain(config, _get(config, ident), f"@{ident}", check_target)
        pending.extend(_refs_in(parts[ident]))
    return PreparedConfig(config=parts, image_key=image_key, changes=changes)


# ------------------------------------------------------------------------------ weights

_DEFAULT_WEIGHTS: Final = ("models/model.pt", "models/model.ts")


def weights_file(
    path: Path, raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> tuple[Path, str]:
    """Where the bundle's own config says its weights are, and how that was found.

    ``checkpointloader#load_path`` (e.g. ``"$@bundle_root + '/models/' + @modelname"``) is
    evaluated as a data expression with ``bundle_root`` = the bundle folder and the registry
    overrides applied (so wholeBody's low-res variant finds ``models/model_lowres.pt``);
    without one, or when it is code, ``models/model.pt`` (or ``model.ts``).
    """
    config = copy.deepcopy(dict(raw))
    for ident, value in (overrides or {}).items():
        with contextlib.suppress(BundleConfigError):  # reported by prepare()
            _set(config, ident, copy.deepcopy(value))
    config["bundle_root"] = str(path)
    load_path = None
    with contextlib.suppress(KeyError):
        load_path = _get(config, "checkpointloader#load_path")
    if isinstance(load_path, str):
        try:
            value = (
                data_expression(load_path[1:], lambda i: _resolve_value(config, i))
                if load_path.startswith("$")
                else _resolve_value(config, load_path[1:])
                if load_path.startswith("@")
                else load_path
            )
        except (BundleConfigError, KeyError):
            value = None
        if isinstance(value, str) and value:
            candidate = Path(value)
            candidate = candidate if candidate.is_absolute() else path / candidate
            try:
                candidate.resolve().relative_to(path.resolve())
            except ValueError:
                raise BundleConfigError(
                    "checkpointloader#load_path points outside the bundle folder"
                ) from None
            return candidate, "checkpointloader#load_path"
    for rel in _DEFAULT_WEIGHTS:
        if (path / rel).is_file():
            return path / rel, "default"
    return path / _DEFAULT_WEIGHTS[0], "default"


def _resolve_value(config: dict[str, Any], ident: str) -> Any:
    value = _get(config, ident)
    if isinstance(value, str) and value.startswith("$"):
        return data_expression(value[1:], lambda i: _resolve_value(config, i))
    if isinstance(value, str) and value.startswith("@"):
        return _resolve_value(config, value[1:])
    return value
