"""The one atomic file writer: a temporary file in the same folder, fsync, rename.

A file is written to a hidden temporary name beside its final path (``.NAME.tmp-<hex>``),
flushed to disk, and renamed into place (``os.replace`` is atomic on POSIX within one
filesystem), then the folder is flushed so the rename survives a crash. Readers never see a
half-written file; a failed write removes its temporary file; a killed writer leaves at most a
hidden ``.*.tmp-*`` file (:data:`TEMPORARY_GLOB`), which the lake sweeps.

``durable=False`` skips both fsyncs (still atomic for readers): for many small files made
durable together afterwards with :func:`sync_filesystem`, one ``syncfs`` per batch.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final

__all__ = [
    "TEMPORARY_GLOB",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "sync_filesystem",
    "temporary_path",
]

#: what a temporary file of this module looks like (``Path.glob``/``rglob`` pattern)
TEMPORARY_GLOB: Final = ".*.tmp-*"


def temporary_path(final: Path) -> Path:
    """A fresh hidden temporary name beside ``final``."""
    return final.parent / f".{final.name}.tmp-{uuid.uuid4().hex}"


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_path(final: Path, *, durable: bool = True) -> Iterator[Path]:
    """A temporary path to write; renamed to ``final`` when the block ends without error.

    For writers that take a path (``pyarrow.parquet.write_table``, ``zipfile``). The parent
    folders are made. On any error the temporary file is removed and ``final`` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        if durable:
            _fsync_dir(final.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(final: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file open for writing; it becomes ``final`` when the block ends without error.

    For writers that stream (a header, then bytes copied from another file). The parent
    folders are made when missing (tried only when the open fails for want of them).
    """
    tmp = temporary_path(final)
    try:
        fh = open(tmp, "xb")  # noqa: SIM115 - closed below, before the rename
    except FileNotFoundError:
        final.parent.mkdir(parents=True, exist_ok=True)
        fh = open(tmp, "xb")  # noqa: SIM115
    renamed = False
    try:
        with fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        renamed = True
        if durable:
            _fsync_dir(final.parent)
    finally:
        if not renamed:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes | memoryview, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename).

    ``durable=False`` skips the two fsyncs (still atomic for readers): for many small files
    made durable together afterwards with :func:`sync_filesystem`.
    """
    with atomic_open(path, durable=durable) as fh:
        fh.write(data)
    return path


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def sync_filesystem(path: Path) -> None:
    """Flush everything written to the filesystem holding ``path`` to disk: one ``syncfs``
    (Linux) for a whole batch of files instead of an fsync each; ``os.sync`` elsewhere."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    syncfs = getattr(ctypes.CDLL(libc_name, use_errno=True), "syncfs", None) if libc_name else None
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed", str(path))
    finally:
        os.close(fd)
