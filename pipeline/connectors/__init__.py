"""Archive connectors: a folder tree now; DICOMweb (QIDO/WADO) and DIMSE (C-FIND/C-GET) next."""

from __future__ import annotations

from pathlib import Path

from pipeline.connectors.base import RawObject, Source, Unit
from pipeline.connectors.folder import FolderSource
from pipeline.enums import SourceKind
from pipeline.errors import ConfigError, NotImplementedStage, SourceError

__all__ = ["FolderSource", "RawObject", "Source", "Unit", "open_source", "source_kind"]


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


def open_source(uri: str, *, follow_symlinks: bool = True) -> Source:
    """Build the connector for ``uri``.

    Raises
    ------
    ConfigError
        For an unknown scheme.
    SourceError
        When a folder source does not exist or cannot be read.
    NotImplementedStage
        For PACS connectors not built yet.
    """
    kind = source_kind(uri)
    if kind is SourceKind.FOLDER:
        folder = FolderSource(Path(uri), follow_symlinks=follow_symlinks)
        if not folder.is_available():
            raise SourceError(f"archive folder not found or not readable: {folder.root}")
        return folder
    raise NotImplementedStage(
        f"{kind.value} sources are not implemented yet (issue #3); crawl a folder for now"
    )
