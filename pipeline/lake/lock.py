"""One run per lake at a time: an exclusive ``flock`` on ``<lake>/.pacsflow.lock``.

The kernel releases an ``flock`` when its holder dies, however it dies (SIGKILL included), so a
lock left by a dead process is never in the way: the next run takes it and logs that the
previous holder (pid, host, start time, written into the file) did not finish. A live holder
makes :func:`lake_lock` fail at once with who holds it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator

from pipeline.errors import LakeError
from pipeline.lake.paths import LakePaths

logger = logging.getLogger(__name__)

__all__ = ["lake_lock", "lock_holder"]


@contextlib.contextmanager
def lake_lock(lake: LakePaths, command: str) -> Iterator[None]:
    """Hold the lake's lock for the duration of the block.

    Raises:
        LakeError: another live process holds it (the message says which).
    """
    lake.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(lake.lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            raise LakeError(
                f"another pacsflow run holds {lake.lock} ({holder}); wait for it to finish"
            ) from None
        previous = _read(fd)
        if previous != "unknown":
            logger.warning("the previous run did not finish (%s); taking its lock over", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }).encode(), 0)  # fmt: skip
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_holder(lake: LakePaths) -> str | None:
    """Who holds the lake's lock now (``"pid ... on host, command since ..."``), or None when
    no live process does. Takes nothing: a probe with a shared, non-blocking ``flock``."""
    try:
        fd = os.open(lake.lock, os.O_RDONLY)
    except OSError:
        return None  # never locked
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return "unknown"
    try:
        info = json.loads(data)
        return f"pid {info['pid']} on {info['host']}, {info['command']} since {info['started_at']}"
    except (ValueError, KeyError, TypeError):
        return "unknown"
