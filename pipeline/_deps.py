"""Optional and heavy imports, library versions, pixel codecs and compute devices.

Heavy libraries are imported here, lazily, and only when a feature needs them, so that
``import pipeline`` and ``pacsflow --help`` stay fast and never load torch or monai.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_LIBRARIES",
    "CodecInfo",
    "DeviceInfo",
    "codec_table",
    "compute_devices",
    "library_versions",
    "optional_import",
    "resolve_device",
]

#: Libraries whose versions ``pacsflow status`` and run manifests record.
KEY_LIBRARIES: tuple[str, ...] = (
    "pacsflow",
    "pydicom",
    "numpy",
    "pandas",
    "pyarrow",
    "dask",
    "distributed",
    "duckdb",
    "pydantic",
    "pynetdicom",
    "dicomweb-client",
    "highdicom",
    "torch",
    "monai",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "imagecodecs",
    "python-gdcm",
    "cryptography",
    "typer",
    "rich",
)


def optional_import(module: str, *, feature: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` for ``feature``, or raise an ImportError that says how to get it.

    Parameters
    ----------
    module:
        Dotted module name, e.g. ``"torch"``.
    feature:
        What needs it, for the message (e.g. ``"GPU inference"``).
    extra:
        The pip extra or package that provides it.

    Returns
    -------
    ModuleType
        The imported module.

    Raises
    ------
    ImportError
        When the module is not installed, naming the feature and the install command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install {extra}" if extra else f"pip install {module}"
        raise ImportError(f"{feature} needs the '{module}' package: {hint}") from exc


def library_versions() -> dict[str, str | None]:
    """Installed version of each key library (``None`` when absent), read without importing."""
    out: dict[str, str | None] = {}
    for dist in KEY_LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


@dataclass(frozen=True)
class CodecInfo:
    """One transfer syntax and whether this install can decode and encode it."""

    transfer_syntax: str
    name: str
    decoders: tuple[str, ...]
    encoders: tuple[str, ...]


def codec_table() -> list[CodecInfo]:
    """List the compressed transfer syntaxes pydicom knows and the plug-ins available for each.

    Uses pydicom's own decoder/encoder registry, so what it reports is what ``pixel_array``
    will actually use.
    """
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS
    from pydicom.pixels.encoders.base import _PIXEL_DATA_ENCODERS
    from pydicom.uid import UID

    rows: list[CodecInfo] = []
    for uid in sorted(_PIXEL_DATA_DECODERS, key=str):
        dec = _PIXEL_DATA_DECODERS[uid][0]
        decoders = tuple(sorted(dec.available_plugins)) if dec.is_available else ()
        enc_entry = _PIXEL_DATA_ENCODERS.get(uid)
        encoders: tuple[str, ...] = ()
        if enc_entry is not None and enc_entry[0].is_available:
            encoders = tuple(sorted(enc_entry[0].available_plugins))
        rows.append(CodecInfo(str(uid), UID(uid).name, decoders, encoders))
    return rows


@dataclass(frozen=True)
class DeviceInfo:
    """A compute device pacsflow can run models on."""

    name: str
    kind: Literal["cpu", "cuda"]
    detail: str


def compute_devices() -> list[DeviceInfo]:
    """List the compute devices: always the CPU, plus each CUDA device torch can see.

    This imports torch, so only ``status`` and the model stages call it.
    """
    import os

    devices = [DeviceInfo("cpu", "cpu", f"{os.cpu_count()} logical cores")]
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        logger.debug("torch not installed: CPU only")
        return devices
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(
                DeviceInfo(
                    f"cuda:{i}",
                    "cuda",
                    f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                    f"CUDA {torch.version.cuda}",
                )
            )
    return devices


def resolve_device(choice: Literal["auto", "cpu", "cuda"] | str = "auto") -> str:
    """Pick the device to compute on: ``"cuda"`` when asked or available (auto), else ``"cpu"``.

    Raises
    ------
    ValueError
        For an unknown choice, or ``"cuda"`` when no CUDA device exists.
    """
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be one of auto, cpu, cuda; got {choice!r}")
    if choice == "cpu":
        return "cpu"
    has_cuda = any(d.kind == "cuda" for d in compute_devices())
    if choice == "cuda" and not has_cuda:
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return "cuda" if has_cuda else "cpu"
