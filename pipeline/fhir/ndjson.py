"""Read a FHIR Bulk Data export folder: the NDJSON files an EHR's ``$export`` writes.

An export (FHIR Bulk Data Access IG, ``$export``) is a set of NDJSON files, one resource per
line, often one file per resource type (``ServiceRequest.ndjson``, ``1.DiagnosticReport.ndjson``),
and a manifest: a JSON document with ``transactionTime``, ``request`` and ``output`` (a list of
``{"type", "url", "count"}``). Where the folder holds a manifest, its ``output`` entries name
the files (the last path segment of each ``url``, found in the folder); otherwise every
``*.ndjson`` (and ``*.ndjson.gz``) file of the folder is read, in name order. A manifest
naming a file the folder lacks is an error (an incomplete copy of the export).

Lines are yielded as they are (text), with the file's name and the line's number: the caller
parses and validates them, and names a bad line by ``<file>:<line>`` (never by its content).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.errors import ConfigError

__all__ = ["ExportFile", "NdjsonLine", "export_files", "read_lines"]


@dataclass(frozen=True)
class ExportFile:
    """One NDJSON file of an export: its path, the resource type the manifest gives it (None
    without a manifest), its size and mtime."""

    path: Path
    resource_type: str | None
    size_bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class NdjsonLine:
    """One non-blank line of an export file."""

    file: ExportFile
    #: the file's name relative to the export folder
    name: str
    #: 1-based
    number: int
    text: str

    @property
    def location(self) -> str:
        """``<file>:<line>``: where the line is, for quarantine rows and messages."""
        return f"{self.name}:{self.number}"


def _manifest(folder: Path) -> dict[str, object] | None:
    for candidate in sorted(folder.glob("*.json")):
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("output"), list):
            return data
    return None


def _file(path: Path, resource_type: str | None) -> ExportFile:
    st = path.stat()
    return ExportFile(path, resource_type, st.st_size, st.st_mtime_ns)


def export_files(folder: Path) -> list[ExportFile]:
    """The NDJSON files of the export in ``folder``.

    Raises
    ------
    ConfigError
        ``folder`` is not a folder, holds no NDJSON file, or its manifest names a file it
        lacks.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"no FHIR export folder at {folder}")
    manifest = _manifest(folder)
    if manifest is not None:
        files = []
        for entry in manifest["output"]:  # type: ignore[attr-defined]
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                raise ConfigError(f"the export manifest in {folder} has an output without a url")
            name = entry["url"].rstrip("/").rsplit("/", 1)[-1]
            path = folder / name
            if not path.is_file():
                raise ConfigError(
                    f"the export manifest in {folder} lists {name}, which the folder lacks "
                    "(an incomplete copy of the export?)"
                )
            kind = entry.get("type")
            files.append(_file(path, kind if isinstance(kind, str) else None))
        return files
    found = sorted([*folder.glob("*.ndjson"), *folder.glob("*.ndjson.gz")])
    if not found:
        raise ConfigError(f"{folder} holds no FHIR Bulk Data export (*.ndjson, manifest)")
    return [_file(p, None) for p in found]


def _open(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def read_lines(folder: Path, files: list[ExportFile] | None = None) -> Iterator[NdjsonLine]:
    """Every non-blank line of the export in ``folder`` (of ``files``, default
    :func:`export_files`), file by file (streamed: one line in memory at a time)."""
    folder = Path(folder)
    for f in files if files is not None else export_files(folder):
        name = f.path.relative_to(folder).as_posix()
        with _open(f.path) as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    yield NdjsonLine(f, name, number, line)
