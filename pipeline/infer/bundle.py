"""MONAI bundles, loaded from a local folder or zip, never from the network.

A bundle is the MONAI model-zoo layout::

    <bundle>/configs/metadata.json     version, MONAI/PyTorch versions, network_data_format
    <bundle>/configs/inference.json    network_def, preprocessing, inferer, postprocessing
    <bundle>/models/model.pt           weights (a state dict; or model.ts, TorchScript)
    <bundle>/docs/README.md, LICENSE

:func:`load_bundle` validates the layout and ``metadata.json`` (against
``bundle_metadata.schema.json``, shipped beside this module), builds the network and the
pre/post-processing from ``inference.json`` with MONAI's ``ConfigParser`` and loads the
weights with ``torch.load(weights_only=True)``. pacsflow runs those pieces in its own batched
loop (:mod:`pipeline.infer.engine`), so neither MONAI's ``evaluator`` nor ``pytorch-ignite`` is
needed, and ``monai.bundle.download`` is never called: a bundle whose weights are absent (the
model zoo lists them as a download) fails with :class:`BundleError` saying where to put them.

Bundle configs execute code: ``"$..."`` expressions are Python, ``_target_`` names any
importable class, and TorchScript weights are programs. Two modes:

- ``"allow-list"`` (the default): nothing of the config is evaluated. Every ``_target_`` must be
  one of :data:`ALLOWED_TARGETS` (MONAI networks, transforms and inferers), every argument a
  plain JSON value (no ``$`` expressions, no ``%`` macros; the one reference allowed is
  ``"@preprocessing"``, for ``Invertd``), ``imports`` is ignored and TorchScript is refused;
- ``"trusted"``: the config as MONAI runs it, for bundles whose code you have read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from pipeline.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_TARGETS",
    "Bundle",
    "BundleError",
    "BundleMode",
    "load_bundle",
    "resolve_bundle_path",
    "validate_metadata",
]

BundleMode = Literal["allow-list", "trusted"]

#: ``_target_`` names accepted in allow-list mode (bare, or ``monai.<...>.<name>``).
ALLOWED_TARGETS: Final[frozenset[str]] = frozenset(
    {
        # networks
        "UNet",
        "BasicUNet",
        "BasicUnet",
        "AttentionUnet",
        "SegResNet",
        "DynUNet",
        "UNETR",
        "SwinUNETR",
        "DenseNet121",
        "ResNet",
        # composition and dictionary transforms
        "Compose",
        "LoadImaged",
        "EnsureChannelFirstd",
        "EnsureTyped",
        "CastToTyped",
        "Orientationd",
        "Spacingd",
        "Resized",
        "ScaleIntensityRanged",
        "ScaleIntensityd",
        "NormalizeIntensityd",
        "CropForegroundd",
        "SpatialPadd",
        "Activationsd",
        "AsDiscreted",
        "KeepLargestConnectedComponentd",
        "FillHolesd",
        "Invertd",
        "SqueezeDimd",
        # inferers
        "SimpleInferer",
        "SlidingWindowInferer",
    }
)
_CONFIG_KEYS: Final = ("network_def", "preprocessing", "inferer", "postprocessing")
_WEIGHTS: Final = ("models/model.pt", "models/model.ts")
_SCHEMA: Final = Path(__file__).with_name("bundle_metadata.schema.json")


class BundleError(ModelError):
    """A bundle that cannot be used, and why (no header values, no PHI)."""


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its identity, the network with weights, and its processing."""

    #: the folder name (or the zip's stem)
    name: str
    #: the folder the bundle was loaded from (a zip is extracted first)
    path: Path
    #: ``metadata.json`` ``version``
    version: str
    #: the whole ``metadata.json``
    metadata: Mapping[str, Any]
    #: output channel -> label name, from ``network_data_format.outputs.pred.channel_def``
    #: (channel 0 "background" left out)
    labels: Mapping[int, str]
    #: 2 (the network sees slices) or 3 (whole volumes, through the inferer)
    spatial_dims: int
    #: ``"sha256:<hex>"`` of the weights file
    weights_sha256: str
    mode: BundleMode
    network: Any = field(repr=False)
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]] | None = field(repr=False)
    inferer: Callable[..., Any] = field(repr=False)
    postprocessing: Callable[[dict[str, Any]], dict[str, Any]] | None = field(repr=False)

    @property
    def ref(self) -> str:
        """``name@version`` and the first 12 hex digits of the weights' sha256."""
        return f"{self.name}@{self.version}+{self.weights_sha256.removeprefix('sha256:')[:12]}"


def resolve_bundle_path(ref: str | Path, models_dir: Path) -> Path:
    """The bundle folder or zip that ``ref`` names: an existing path, else ``models_dir/ref``.

    Raises:
        BundleError: neither exists; the message lists the bundles in ``models_dir``.
    """
    path = Path(ref).expanduser()
    if path.exists():
        return path
    candidate = models_dir / str(ref)
    if candidate.exists():
        return candidate
    known = []
    if models_dir.is_dir():
        known = sorted(p.name for p in models_dir.iterdir() if p.is_dir())
    raise BundleError(
        f"no bundle {str(ref)!r}: not a path, and not a model in {models_dir} "
        f"(there: {', '.join(known) or 'none'})"
    )


def _extract_zip(zip_path: Path, into: Path) -> Path:
    """Extract a bundle zip (members checked: no absolute paths, no ``..``) into a folder named
    by the zip's sha256 under ``into``; return the folder holding ``configs/``."""
    digest = hashlib.sha256(zip_path.read_bytes()).hexdigest()[:16]
    target = into / f"{zip_path.stem}-{digest}"
    if not target.is_dir():
        tmp = into / f".{target.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for member in zf.namelist():
                    parts = Path(member).parts
                    if member.startswith(("/", "\\")) or ".." in parts:
                        raise BundleError(f"{zip_path.name}: unsafe member path {member!r}")
                zf.extractall(tmp)
        except zipfile.BadZipFile:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BundleError(f"{zip_path.name} is not a zip file") from None
        except BundleError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(target)
    roots = [p.parent.parent for p in target.rglob("configs/metadata.json")]
    if len(roots) != 1:
        raise BundleError(
            f"{zip_path.name}: expected one bundle (configs/metadata.json), found {len(roots)}"
        )
    return roots[0]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{what} is missing ({path})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BundleError(f"{what} must be a JSON object")
    return value


def validate_metadata(metadata: Mapping[str, Any]) -> None:
    """Check ``metadata.json`` against the shipped schema.

    Raises:
        BundleError: naming the first failing field and why.
    """
    import jsonschema

    schema = json.loads(_SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(dict(metadata)), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(top level)"
        raise BundleError(
            f"metadata.json is not a valid bundle metadata: {where}: {first.message}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
        )


def _labels(metadata: Mapping[str, Any]) -> dict[int, str]:
    outputs = metadata["network_data_format"]["outputs"]
    pred = outputs.get("pred") or next(iter(outputs.values()))
    channel_def = pred.get("channel_def") or {}
    labels = {int(k): str(v) for k, v in channel_def.items() if int(k) != 0}
    if not labels:
        n = int(pred["num_channels"])
        labels = {c: f"label_{c}" for c in range(1, max(n, 2))}
    return labels


def _check_allowed(node: Any, where: str) -> None:
    """Allow-list mode: refuse anything in ``node`` that would run code."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None:
            name = str(target).rsplit(".", 1)[-1]
            if name not in ALLOWED_TARGETS or (
                "." in str(target) and not str(target).startswith("monai.")
            ):
                raise BundleError(
                    f"{where}: _target_ {target!r} is not on the allow-list; load the bundle "
                    "in trusted mode (`--trust-bundle-code`) if you have read its code"
                )
        for key, value in node.items():
            if key in ("_mode_", "_requires_") or (key == "_disabled_" and value not in (False,)):
                raise BundleError(f"{where}: {key} is not allowed in allow-list mode")
            if key == "transform" and value == "@preprocessing":
                continue
            _check_allowed(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_allowed(value, f"{where}[{i}]")
    elif isinstance(node, str) and node[:1] in ("$", "@", "%"):
        raise BundleError(
            f"{where}: {node[:1]!r} expressions and references run code or pull config; not "
            "allowed in allow-list mode (`--trust-bundle-code` loads the bundle as MONAI would)"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _load_weights(network: Any, weights: Path, mode: BundleMode) -> Any:
    import torch

    if weights.suffix == ".ts":
        if mode != "trusted":
            raise BundleError(
                "models/model.ts is TorchScript, a program: load the bundle in trusted mode "
                "(`--trust-bundle-code`), or ship models/model.pt (a state dict)"
            )
        return torch.jit.load(str(weights), map_location="cpu")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(
            f"models/model.pt cannot be loaded with weights_only=True ({type(exc).__name__}): "
            "it must be a state dict of tensors"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # the model zoo's checkpoint layout
    if not isinstance(state, dict):
        raise BundleError("models/model.pt does not hold a state dict")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(f"the weights do not fit network_def: {first}") from None
    return network


def load_bundle(
    ref: str | Path,
    *,
    models_dir: Path,
    mode: BundleMode = "allow-list",
    extract_dir: Path | None = None,
) -> Bundle:
    """Load and validate the bundle ``ref`` (a folder, a zip, or a name in ``models_dir``).

    Parameters
    ----------
    ref:
        Bundle folder or ``.zip``, or the name of a folder in ``models_dir``.
    models_dir:
        Where named bundles live (the repository's ``models/``).
    mode:
        ``"allow-list"`` (nothing in the config is evaluated) or ``"trusted"``; see the module
        docstring.
    extract_dir:
        Where a zip is extracted (default: a ``.extracted`` folder beside the zip).

    Raises
    ------
    BundleError
        Layout, metadata, config or weights unusable; the message says which and what to do.
    """
    path = resolve_bundle_path(ref, models_dir)
    name = path.stem if path.suffix == ".zip" else path.name
    if path.is_file():
        if path.suffix != ".zip":
            raise BundleError(f"{path.name}: a bundle is a folder or a .zip")
        path = _extract_zip(path, extract_dir or path.parent / ".extracted")
    metadata = _read_json(path / "configs" / "metadata.json", "configs/metadata.json")
    validate_metadata(metadata)
    config = _read_json(path / "configs" / "inference.json", "configs/inference.json")
    if "network_def" not in config:
        raise BundleError("configs/inference.json has no network_def")
    weights = next((path / w for w in _WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise BundleError(
            f"bundle {name!r} has no weights: models/model.pt (or model.ts) is absent. "
            "Model-zoo bundles list their weights as a download; pacsflow never downloads. "
            f"Fetch them on a connected machine and put them at {path / _WEIGHTS[0]}"
        )
    for optional in ("docs/README.md", "LICENSE"):
        if not (path / optional).is_file():
            logger.warning("bundle %s has no %s", name, optional)

    import torch
    from monai.bundle import ConfigParser

    parts = {k: config[k] for k in _CONFIG_KEYS if k in config}
    if mode == "allow-list":
        for key, value in parts.items():
            _check_allowed(value, key)
        parser = ConfigParser(parts, globals=False)
    elif mode == "trusted":
        parser = ConfigParser(config)
    else:
        raise BundleError(f"unknown bundle mode {mode!r}")

    def parsed(key: str) -> Any:
        if key not in parts:
            return None
        try:
            return parser.get_parsed_content(key, instantiate=True)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(
                f"configs/inference.json: {key} cannot be built ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
            ) from None

    network = parsed("network_def")
    if not isinstance(network, torch.nn.Module):
        raise BundleError("network_def does not build a torch.nn.Module")
    network = _load_weights(network, weights, mode)
    network.eval()
    inferer = parsed("inferer")
    if inferer is None:
        from monai.inferers import SimpleInferer

        inferer = SimpleInferer()
    spatial = metadata["network_data_format"]["inputs"]
    spatial_dims = len(next(iter(spatial.values()))["spatial_shape"])
    return Bundle(
        name=name,
        path=path,
        version=str(metadata["version"]),
        metadata=metadata,
        labels=_labels(metadata),
        spatial_dims=spatial_dims,
        weights_sha256=_sha256(weights),
        mode=mode,
        network=network,
        preprocessing=parsed("preprocessing"),
        inferer=inferer,
        postprocessing=parsed("postprocessing"),
    )
