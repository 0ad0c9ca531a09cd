"""The local retrieval cache of a DIMSE source.

``<cache_dir>/<sha256 of the study UID>/<sha256 of the SOP Instance UID>.dcm``: each file
written atomically, exactly as the PACS sent it, and a ``study.json`` marker (the study's
watermark and instances) once a study arrived in full, so reading it again costs no network.
Folder and file names are hashes, never UIDs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pipeline.connectors.base import RawObject
from pipeline.dicom.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "MARKER",
    "UNKNOWN_SERIES",
    "Stored",
    "cached_instances",
    "instance_location",
    "raw_object",
    "sha256",
    "study_folder",
    "trim_cache",
    "write_atomic",
    "write_marker",
]

MARKER: Final = "study.json"
#: The series of an instance whose dataset did not say (kept, under this name).
UNKNOWN_SERIES: Final = "unknown"


def sha256(text: str) -> str:
    """Hex SHA-256 of a UID: the pseudonymous name of a cache folder or file."""
    return hashlib.sha256(text.encode("ascii", "replace")).hexdigest()


@dataclass(frozen=True)
class Stored:
    """One instance received into the cache."""

    series_uid: str
    path: Path
    size_bytes: int


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file and a rename (the cache is
    rebuilt from the PACS when lost: no fsync)."""
    atomic_write_bytes(path, data, durable=False)


def instance_location(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def raw_object(
    study_uid: str, series_uid: str, sop_uid: str, path: Path, unit_key: str
) -> RawObject:
    """A raw object for a cached instance file."""
    try:
        size: int | None = path.stat().st_size
    except OSError:
        size = None
    return RawObject(
        location=instance_location(study_uid, series_uid, sop_uid),
        unit_key=unit_key,
        size_bytes=size,
        mtime_ns=None,
        path=path,
    )


def cached_instances(folder: Path, watermark: str) -> list[tuple[str, str, Path]] | None:
    """The cached instances of a complete study with ``watermark``, else None."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("watermark") != watermark:
        return None
    out: list[tuple[str, str, Path]] = []
    for series_uid, sop_uid in marker.get("instances", []):
        path = folder / f"{sha256(sop_uid)}.dcm"
        if not path.is_file():
            return None
        out.append((series_uid, sop_uid, path))
    return out


def write_marker(folder: Path, watermark: str, received: dict[str, Stored]) -> None:
    """Mark a study complete in the cache (atomically): its watermark and instances."""
    marker = {
        "watermark": watermark,
        "instances": sorted([s.series_uid, sop] for sop, s in received.items()),
    }
    write_atomic(folder / MARKER, json.dumps(marker).encode("ascii"))


def trim_cache(cache_dir: Path, max_bytes: int, keep: Path | None = None) -> int:
    """Evict whole study folders of the retrieval cache, least recently written first, until
    it holds at most ``max_bytes`` (``keep``, the study in use, is never evicted). Returns the
    bytes freed. An evicted study is retrieved again when next read (a crawl unit, or an
    ``open`` of one of its instances by a later stage)."""
    import shutil

    if not cache_dir.is_dir():
        return 0
    studies = []
    total = 0
    for entry in os.scandir(cache_dir):
        if not entry.is_dir(follow_symlinks=False):
            continue
        size = newest = 0
        for f in os.scandir(entry.path):
            st = f.stat(follow_symlinks=False)
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
        studies.append((newest, size, Path(entry.path)))
        total += size
    freed = 0
    for _newest, size, folder in sorted(studies):
        if total - freed <= max_bytes:
            break
        if keep is not None and folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        freed += size
    if freed:
        logger.info(
            "DIMSE cache: evicted %.1f MB to stay under %.1f MB", freed / 1e6, max_bytes / 1e6
        )
    return freed


def study_folder(cache_dir: Path, study_uid: str) -> Path:
    """The cache folder of one study."""
    return cache_dir / sha256(study_uid)
