"""A folder tree of DICOM files as an archive (any file names, nested to any depth)."""

from __future__ import annotations

import io
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.connectors.base import RawObject, StoreResult, Unit, result_path
from pipeline.dicom.atomic import atomic_write_bytes
from pipeline.enums import SourceKind
from pipeline.errors import SourceError

logger = logging.getLogger(__name__)

__all__ = ["FolderSource"]


@dataclass(frozen=True)
class FolderSource:
    """Every regular file below ``root`` is an object; ``location`` is its path relative to root.

    Directory symlinks are followed when ``follow_symlinks`` is true, and each directory is
    entered once (by device and inode), so symlink loops end. Hidden files and folders (names
    starting with ``.``) are skipped.
    """

    root: Path
    follow_symlinks: bool = True
    kind: SourceKind = SourceKind.FOLDER

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def source_id(self) -> str:
        """The absolute folder path."""
        return str(self.root)

    def is_available(self) -> bool:
        """True when the root folder exists and can be listed."""
        return self.root.is_dir() and os.access(self.root, os.R_OK | os.X_OK)

    def check(self) -> None:
        """Raise :class:`SourceError` when the root folder is missing or unreadable."""
        if not self.is_available():
            raise SourceError(f"archive folder not found or not readable: {self.root}")

    def list_units(self) -> Iterator[Unit]:
        """Walk the tree depth-first in sorted order (deterministic), yielding regular files.

        Each file is a unit whose watermark is its size and mtime.

        Raises
        ------
        SourceError
            When the root folder does not exist or cannot be read.
        """
        self.check()
        seen_dirs: set[tuple[int, int]] = set()
        stack = [self.root]
        root_len = len(str(self.root)) + 1
        while stack:
            folder = stack.pop()
            try:
                st = folder.stat()
            except OSError as exc:
                logger.warning("cannot stat folder %s: %s", str(folder)[root_len:], exc.strerror)
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                logger.debug("symlink loop or repeat skipped at %s", str(folder)[root_len:])
                continue
            seen_dirs.add(key)
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                logger.warning("cannot list folder %s: %s", str(folder)[root_len:], exc.strerror)
                continue
            subdirs = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=self.follow_symlinks):
                        subdirs.append(Path(entry.path))
                        continue
                    est = entry.stat(follow_symlinks=self.follow_symlinks)
                except OSError:
                    logger.debug("dangling entry skipped: %s", entry.path[root_len:])
                    continue
                if stat.S_ISREG(est.st_mode):
                    yield Unit(
                        entry.path[root_len:],
                        f"{est.st_size}:{est.st_mtime_ns}",
                        est.st_size,
                        est.st_mtime_ns,
                    )
            stack.extend(reversed(subdirs))

    def read_unit(self, unit: Unit) -> Iterator[RawObject]:
        """A file is one object: hand its path to the parser (header only)."""
        yield RawObject(
            location=unit.key,
            unit_key=unit.key,
            size_bytes=unit.size_bytes,
            mtime_ns=unit.mtime_ns,
            path=self.path_of(unit.key),
        )

    def path_of(self, location: str) -> Path:
        """The absolute path of an object, refusing locations that escape the root."""
        if ".." in Path(location).parts or Path(location).is_absolute():
            raise SourceError(f"location escapes the archive root: {location}")
        return self.root / location

    def open(self, location: str) -> BinaryIO:
        """Open an object for binary reading."""
        return open(self.path_of(location), "rb")

    # ---------------------------------------------------------------- as a write-back destination

    def store(self, files: list[Path]) -> list[StoreResult]:
        """Copy each file (atomically) to ``<root>/<study>/<series>/<sop>.dcm``."""
        import pydicom

        results = []
        for f in files:
            data = f.read_bytes()
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            target = result_path(
                self.root, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
            try:
                _atomic_write(target, data)
            except OSError as exc:
                raise SourceError(f"cannot write into {self.root}: {exc.strerror}") from None
            results.append(StoreResult(str(ds.SOPInstanceUID), True, "written"))
        return results

    def confirm(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """The file is there and is that object."""
        import pydicom

        path = result_path(self.root, study_uid, series_uid, sop_uid)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except (OSError, ValueError, EOFError):
            return False
        return str(ds.get("SOPInstanceUID", "")) == sop_uid


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it into place."""
    atomic_write_bytes(path, data)
