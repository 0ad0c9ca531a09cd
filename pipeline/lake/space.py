"""Full disks: recognise "no space left on device" wherever it surfaces, and say where.

pyarrow, delta-rs, numpy and the atomic writer each report a full disk their own way: an
``OSError`` with ``errno.ENOSPC`` (or ``EDQUOT``, a quota), or a library error whose message
carries the OS's text ("No space left on device (os error 28)"), sometimes as the cause or
context of another exception. :func:`no_space_in` finds it; :func:`no_space_error` names the
filesystem (device and mount point) and how much room the stage needed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from pipeline.errors import NoSpace

__all__ = ["free_by_mount", "free_bytes", "mount_of", "no_space_error", "no_space_in"]

_CODES = frozenset({errno.ENOSPC, errno.EDQUOT})
_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def no_space_in(exc: BaseException | None) -> BaseException | None:
    """The exception in ``exc``'s chain (itself, its cause or context) that says a disk is
    full, or None."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not e for e in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:  # a NoSpace already says the most (recording it may fill the disk again)
        if isinstance(e, NoSpace):
            return e
    for e in chain:
        if isinstance(e, OSError) and e.errno in _CODES:
            return e
        if any(t in str(e).lower() for t in _TEXTS):
            return e
    return None


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_of(path: Path) -> tuple[str, str]:
    """``(device, mount point)`` of the filesystem holding ``path`` (or its nearest existing
    parent); the device is the mount point when ``/proc/self/mounts`` does not say."""
    mount = _existing(path)
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = str(mount)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) >= 2 and fields[1].replace("\\040", " ") == str(mount):
                    device = fields[0]  # the last matching line is the one on top
    except OSError:
        pass
    return device, str(mount)


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the filesystem holding ``path`` (0 when unknown)."""
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return 0


def free_by_mount(paths: list[Path]) -> dict[str, int]:
    """Bytes free now on the filesystem of each of ``paths``, by mount point."""
    return {mount_of(p)[1]: free_bytes(p) for p in paths}


def no_space_error(
    exc: BaseException, *candidates: Path, free_before: dict[str, int] | None = None
) -> NoSpace:
    """A :class:`NoSpace` for the full disk ``exc`` reports (see :func:`no_space_in`).

    Args:
        exc: what :func:`no_space_in` found.
        candidates: where the stage writes (the lake's root, an export folder): when ``exc``
            names no file, the one with the least room left is the full one.
        free_before: bytes free by mount point when the stage started
            (:func:`free_by_mount`): it used them all and needed more, so that is what it
            needed at least (absent: unknown).
    """
    if isinstance(exc, NoSpace):
        return exc
    if isinstance(exc, OSError) and exc.filename:
        where = Path(os.fsdecode(exc.filename))
    else:
        where = min(candidates or (Path.cwd(),), key=free_bytes)
    device, mount = mount_of(where)
    return NoSpace(device, mount, needed=(free_before or {}).get(mount, 0), free=free_bytes(where))
