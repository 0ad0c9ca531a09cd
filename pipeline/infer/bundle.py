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
importable class, ``scripts/`` is imported, and TorchScript weights are programs. A model-zoo
bundle runs as shipped (only its weights supplied): :mod:`pipeline.infer.bundle_config` removes
its loader, savers and device placement and keeps every other transform. Two modes, decided by
:func:`pipeline.infer.trust.decide` (trust by pin, never by a flag):

- ``"allow-list"`` (any bundle not pinned and approved): nothing of the config runs. Every
  ``_target_`` must be one of :data:`ALLOWED_TARGETS` (MONAI networks, transforms and
  inferers); ``@`` references and ``$`` expressions that only combine data are resolved
  without evaluating code, anything else is refused naming its place; ``imports`` is ignored,
  ``scripts/`` is not importable and TorchScript is refused;
- ``"trusted"`` (the registry pins the bundle's content hash and a person approved it with
  ``pacsflow models trust PATH``): the config as MONAI runs it, ``scripts/`` importable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from pipeline.errors import ModelError
from pipeline.infer.bundle_config import BundleConfigError, content_hash, prepare, weights_file

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
        "TorchVisionFCModel",
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
    #: the key the bundle's transforms read the image under (its loader's keys)
    image_key: str = "image"
    #: ``"sha256:<hex>"`` of configs/ and scripts/ (what a trust pin approves)
    content_sha256: str = ""

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


def _check_target(target: Any, where: str) -> None:
    """Allow-list mode: refuse a ``_target_`` that is not on :data:`ALLOWED_TARGETS`."""
    name = str(target).rsplit(".", 1)[-1]
    if name not in ALLOWED_TARGETS or ("." in str(target) and not str(target).startswith("monai.")):
        raise BundleError(
            f"{where}: _target_ {target!r} is not on the allow-list; pin the bundle in the "
            "registry and approve it (`pacsflow models trust PATH`) if you have read its code"
        )


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause of ``exc`` (MONAI wraps a failure in its config expression as
    "Failed to evaluate ConfigExpression", the real error being its cause)."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        seen.add(id(nxt))
        exc = nxt


def explain_build_error(exc: BaseException, where: str, metadata: Mapping[str, Any]) -> BundleError:
    """A :class:`BundleError` naming the component, the cause and the fix."""
    import monai

    cause = _root_cause(exc)
    made_for = str(metadata.get("monai_version") or "?")
    installed = str(monai.__version__)
    optional = metadata.get("optional_packages_version") or {}
    text = str(cause).splitlines()[0][:200] if str(cause) else ""
    missing = None
    if isinstance(cause, ModuleNotFoundError):
        named = cause.name or next(iter(re.findall(r"No module named '([^']+)'", text)), "")
        missing = named.split(".")[0] or None
    else:
        found = re.search(r"(?:No module named|requires|install) '?([A-Za-z0-9_\-]+)'?", text)
        if type(cause).__name__ == "OptionalImportError" and found:
            missing = found.group(1).split(".")[0]
    if missing:
        pinned = optional.get(missing)
        spec = f"{missing}=={pinned}" if pinned else missing
        return BundleError(
            f"{where}: needs the package {missing!r}, which is not installed "
            f"(the bundle's metadata lists {spec if pinned else 'no version'}): "
            f"`pip install {spec}`"
        )
    keyword = re.search(r"unexpected keyword argument '(\w+)'", text)
    if isinstance(cause, TypeError) and keyword:
        return BundleError(
            f"{where}: MONAI {installed} rejects the keyword {keyword.group(1)!r} "
            f"({text}); the bundle was made for MONAI {made_for}. Fix: add "
            f'`drop: ["{where}#{keyword.group(1)}"]` to the model\'s registry entry if the '
            f"keyword is obsolete, or install monai=={made_for}"
        )
    return BundleError(
        f"{where} cannot be built ({type(cause).__name__}: {text}; bundle made for MONAI "
        f"{made_for}, installed {installed})"
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
                f"{weights.name} is TorchScript, a program: pin and approve the bundle "
                "(`pacsflow models trust PATH`), or ship a state dict (.pt)"
            )
        return torch.jit.load(str(weights), map_location="cpu")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BundleError(
            f"{weights.name} cannot be loaded with weights_only=True ({type(exc).__name__}): "
            "it must be a state dict of tensors"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # the model zoo's checkpoint layout
    if not isinstance(state, dict):
        raise BundleError(f"{weights.name} does not hold a state dict")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(f"the weights do not fit network_def: {first}") from None
    return network


def _forget_scripts() -> None:
    """Drop the ``scripts`` package (a bundle's) and its modules from ``sys.modules``."""
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


def _check_monai(metadata: Mapping[str, Any]) -> None:
    """Refuse a bundle made for a newer MONAI than the installed one (its transforms or
    networks may not exist here); an older one is tried (build errors then name both)."""
    import monai

    def major_minor(text: str) -> tuple[int, int] | None:
        found = re.match(r"(\d+)\.(\d+)", text)
        return (int(found.group(1)), int(found.group(2))) if found else None

    wanted = major_minor(str(metadata.get("monai_version") or ""))
    have = major_minor(str(monai.__version__))
    if wanted and have and wanted > have:
        raise BundleError(
            f"the bundle was made for MONAI {metadata['monai_version']}, newer than the "
            f"installed {monai.__version__}: `pip install monai=={metadata['monai_version']}`"
        )


#: packages model-zoo metadata lists for MONAI's own training/evaluation loop, which pacsflow
#: does not run (its loop reads no files, writes no logs, computes no metrics)
_LOOP_ONLY: Final = frozenset(
    {
        "pytorch-ignite",
        "ignite",
        "tensorboard",
        "tensorboardx",
        "mlflow",
        "nibabel",
        "scikit-learn",
        "scikit-image",
        "fire",
        "pyyaml",
        "tqdm",
        "pandas",
        "matplotlib",
        "itk",
        "pillow",
        "psutil",
    }
)
#: distribution name -> import name, where they differ
_IMPORT_NAME: Final = {"pytorch-ignite": "ignite", "scikit-learn": "sklearn", "pillow": "PIL"}


def _check_packages(metadata: Mapping[str, Any]) -> None:
    """Refuse a bundle whose network or transforms need a package that is not installed
    (metadata ``optional_packages_version``; those only MONAI's own loop uses are skipped):
    otherwise the network would build and fail on its first forward pass (SwinUNETR without
    einops), after volumes were read."""
    import importlib.util

    listed = metadata.get("optional_packages_version") or {}
    missing = []
    for dist, version in sorted(listed.items()):
        if str(dist).lower() in _LOOP_ONLY:
            continue
        module = _IMPORT_NAME.get(str(dist).lower(), str(dist).replace("-", "_"))
        if module == "torchvision":
            from pipeline.infer.detect import provide_torchvision_parts

            provide_torchvision_parts()  # what a detector needs of it, if it is not usable
            continue
        if importlib.util.find_spec(module) is None:
            missing.append(f"{dist}=={version}" if version else str(dist))
    if missing:
        raise BundleError(
            f"the bundle needs {', '.join(missing)} (metadata optional_packages_version), not "
            f"installed: `pip install {' '.join(missing)}`"
            + (
                " (torchvision: the build matching the installed torch, README 'Installing')"
                if any(m.startswith("torchvision") for m in missing)
                else ""
            )
        )


def load_bundle(
    ref: str | Path,
    *,
    models_dir: Path,
    mode: BundleMode = "allow-list",
    extract_dir: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> Bundle:
    """Load and validate the bundle ``ref`` (a folder, a zip, or a name in ``models_dir``).

    Parameters
    ----------
    ref:
        Bundle folder or ``.zip``, or the name of a folder in ``models_dir``.
    models_dir:
        Where named bundles live (the repository's ``models/``).
    mode:
        ``"allow-list"`` (no code of the config is evaluated) or ``"trusted"`` (decided by
        :func:`pipeline.infer.trust.decide`, never by a flag); see the module docstring.
    extract_dir:
        Where a zip is extracted (default: a ``.extracted`` folder beside the zip).
    overrides, drop:
        The registry entry's changes to ``inference.json`` (``id#path: value``; ids removed).

    Raises
    ------
    BundleError
        Layout, metadata, config, packages or weights unusable; the message says which and
        what to do. Raised before any volume is read.
    """
    path = resolve_bundle_path(ref, models_dir)
    name = path.stem if path.suffix == ".zip" else path.name
    if path.is_file():
        if path.suffix != ".zip":
            raise BundleError(f"{path.name}: a bundle is a folder or a .zip")
        path = _extract_zip(path, extract_dir or path.parent / ".extracted")
    metadata = _read_json(path / "configs" / "metadata.json", "configs/metadata.json")
    validate_metadata(metadata)
    _check_monai(metadata)
    _check_packages(metadata)
    config = _read_json(path / "configs" / "inference.json", "configs/inference.json")
    if mode not in ("allow-list", "trusted"):
        raise BundleError(f"unknown bundle mode {mode!r}")
    try:
        prepared = prepare(
            config,
            overrides=overrides,
            drop=drop,
            check_target=_check_target if mode == "allow-list" else None,
        )
        weights, found_by = weights_file(path, config, overrides)
    except BundleConfigError as exc:
        raise BundleError(f"configs/inference.json: {exc}") from None
    if not weights.is_file():
        rel = weights.relative_to(path) if weights.is_relative_to(path) else weights
        raise BundleError(
            f"bundle {name!r} has no weights: {rel} is absent (found by {found_by}). "
            "Model-zoo bundles list their weights as a download; pacsflow never downloads. "
            f"Fetch them on a connected machine and put them at {weights}"
        )
    for optional in ("docs/README.md", "LICENSE"):
        if not (path / optional).is_file():
            logger.warning("bundle %s has no %s", name, optional)
    for change in prepared.changes:
        logger.debug("bundle %s: %s", name, change)

    import torch
    from monai.bundle import ConfigParser

    parts = prepared.config
    if mode == "allow-list":
        parser = ConfigParser(parts, globals=False)
    else:
        parts = dict(parts)
        parts["bundle_root"] = str(path)
        parser = ConfigParser(parts)

    def parsed(key: str) -> Any:
        if key not in parts:
            return None
        try:
            with warnings.catch_warnings():
                # MONAI's notes on defaults changing between versions (Orientationd's labels,
                # ...): about the bundle's MONAI, not actionable here
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                return parser.get_parsed_content(key, instantiate=True)
        except BundleError:
            raise
        except Exception as exc:
            raise explain_build_error(exc, key, metadata) from None

    # a trusted bundle's scripts/ are importable (as `scripts.<module>`), only while it is built;
    # every model-zoo bundle names its package `scripts`: another bundle's, imported before in
    # this process, must not answer for this one's (nor this one's for the next)
    added = mode == "trusted" and (path / "scripts").is_dir() and str(path) not in sys.path
    if added:
        _forget_scripts()
        sys.path.insert(0, str(path))
    try:
        network = parsed("network_def")
        if not isinstance(network, torch.nn.Module):
            raise BundleError("network_def does not build a torch.nn.Module")
        network = _load_weights(network, weights, mode)
        network.eval()
        inferer = parsed("inferer")
        preprocessing = parsed("preprocessing")
        postprocessing = parsed("postprocessing")
        if mode == "trusted":
            parsed("detector_ops")  # a detection bundle sets up its detector (threshold, window)
    finally:
        if added:
            sys.path.remove(str(path))
            _forget_scripts()
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
        preprocessing=preprocessing,
        inferer=inferer,
        postprocessing=postprocessing,
        image_key=prepared.image_key,
        content_sha256=content_hash(path),
    )
