"""Archive connectors: a folder tree, DICOMweb (QIDO-RS/WADO-RS) and DIMSE (C-FIND/C-GET/C-MOVE)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.connectors.base import RawObject, Skipped, Source, Unit
from pipeline.connectors.folder import (
    FolderSource,
    decode_location,
    encode_location,
    member_location,
    split_location,
)
from pipeline.enums import SourceKind

if TYPE_CHECKING:
    from pipeline.config import LimitsConfig, SourceConfig
from pipeline.errors import ConfigError

__all__ = [
    "FolderSource",
    "RawObject",
    "Skipped",
    "Source",
    "Unit",
    "decode_location",
    "encode_location",
    "member_location",
    "open_source",
    "source_kind",
    "split_location",
]


def source_kind(uri: str) -> SourceKind:
    """Classify a source string: ``dicomweb+http(s)://``, ``dimse://`` or a folder path."""
    lowered = uri.lower()
    if lowered.startswith(("dicomweb+http://", "dicomweb+https://")):
        return SourceKind.DICOMWEB
    if lowered.startswith("dimse://"):
        return SourceKind.DIMSE
    if "://" in uri:
        raise ConfigError(
            f"unknown source scheme in {uri.split('://', 1)[0]!r}://; use a folder path, "
            "dicomweb+http(s)://host:port/root or dimse://AET@host:port"
        )
    return SourceKind.FOLDER


def open_source(
    uri: str,
    cfg: SourceConfig | None = None,
    *,
    follow_symlinks: bool = True,
    cache_dir: Path | None = None,
    limits: LimitsConfig | None = None,
) -> Source:
    """Build the connector for ``uri``.

    Parameters
    ----------
    uri:
        A folder, ``dicomweb+http(s)://host:port/root`` or ``dimse://AET@host:port``.
    cfg:
        The ``source`` section (credentials by reference, CA bundle, timeouts, DIMSE settings,
        and for a folder whether symlinks may lead out of it).
    follow_symlinks:
        Folder sources: follow symlinks at all (``crawl.follow_symlinks``); a link inside the
        root is never followed (its target is walked at its own path), one leaving it only
        with ``cfg.follow_symlinks_outside_root``.
    cache_dir:
        DIMSE sources: where retrieved studies are cached (in the lake's restricted zone).
    limits:
        Folder sources: the bounds on compressed files and packages (the config's
        ``limits``; default: :class:`~pipeline.config.LimitsConfig`'s).

    Raises
    ------
    ConfigError
        For an unknown scheme or a malformed URI.
    SourceError
        When a folder source does not exist or cannot be read.
    """
    from pipeline.config import LimitsConfig, SourceConfig

    cfg = cfg or SourceConfig()
    kind = source_kind(uri)
    if kind is SourceKind.FOLDER:
        folder = FolderSource(
            Path(uri),
            follow_symlinks=follow_symlinks,
            follow_symlinks_outside_root=cfg.follow_symlinks_outside_root,
            limits=limits or LimitsConfig(),
        )
        folder.check()
        return folder
    if kind is SourceKind.DICOMWEB:
        from pipeline.connectors.dicomweb import DicomwebSource

        return DicomwebSource.from_uri(uri, cfg)
    from pipeline.connectors.dimse import DimseSource

    if cache_dir is None:
        raise ConfigError("a DIMSE source needs a cache folder (the lake's restricted/cache)")
    return DimseSource.from_uri(uri, cfg, cache_dir=cache_dir)
