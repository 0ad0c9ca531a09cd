"""Checksums of the lake's table files: recorded when a file is committed, checked before a
stage reads and by ``pacsflow status --check``.

Every Parquet file a table commit adds (a Delta commit of a research table, a partition file
of a restricted table) gets one line in ``<table folder>/_pacsflow_checksums.jsonl``: its
path under the table folder, size, modification time (ns) and SHA-256. Lines are appended
with one ``write`` on an ``O_APPEND`` descriptor (workers commit concurrently); a torn last
line is ignored, and its file counts as unrecorded.

:func:`check` compares the files a table is made of now (the current Delta version's, or
the restricted table's visible ``*.parquet``) with their records. ``full=False`` (before every
stage) costs one ``stat`` per file: a size that differs is damage, and a file whose
modification time changed is hashed again (an overwrite in place changes it). ``full=True``
(``status --check``) hashes every recorded file, which also catches bit rot, and decodes
every page of files that have no record (written before checksums were recorded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.lake.paths import RESEARCH_TABLES, RESTRICTED_TABLES, LakePaths

logger = logging.getLogger(__name__)

__all__ = ["CHECKSUMS", "Damage", "check", "damage_line", "record_files"]

#: The record's file name in each table folder (``_``: Delta and hive readers skip it).
CHECKSUMS = "_pacsflow_checksums.jsonl"


@dataclass(frozen=True)
class Damage:
    """One table file that is not what was committed.

    Attributes:
        table: the table it belongs to.
        path: the file, relative to the lake root.
        why: what differs (size, checksum, an unreadable footer).
    """

    table: str
    path: str
    why: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def record_files(
    lake: LakePaths, name: str, files: list[Path], *, as_names: list[Path] | None = None
) -> None:
    """Append the checksum records of ``files`` (committed to table ``name``).

    ``as_names``: the final paths the files will have (a temporary file recorded before its
    rename: a crash in between leaves a record that matches no file, never a file whose
    record is missing; a path may have several records, any of them vouches for it).
    """
    folder = lake.table(name)
    lines = []
    for path, final in zip(files, as_names or files, strict=True):
        try:
            st = path.stat()
            sha = _sha256(path)
        except FileNotFoundError:  # replaced or vacuumed meanwhile: nothing to vouch for
            continue
        rel = final.relative_to(folder).as_posix()
        lines.append(
            json.dumps(
                {"path": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha},
                separators=(",", ":"),
            )
            + "\n"
        )
    if not lines:
        return
    fd = os.open(folder / CHECKSUMS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(lines).encode())
    finally:
        os.close(fd)


def _records(folder: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        text = (folder / CHECKSUMS).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            out.setdefault(str(rec["path"]), []).append(rec)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line: that file is unrecorded
    return out


def _current_files(lake: LakePaths, name: str) -> list[Path]:
    folder = lake.table(name)
    if name in RESEARCH_TABLES:
        from pipeline.lake import delta

        if delta.is_versioned(name):
            return [Path(f) for f in delta.data_files(lake, name)]
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)
    )


def check(lake: LakePaths, names: list[str] | None = None, *, full: bool = False) -> list[Damage]:
    """The damaged files of tables ``names`` (default: every table), see the module doc.

    Args:
        lake: the lake.
        names: the tables to check (research and restricted ones; others are ignored).
        full: hash every file (``status --check``); otherwise stat them, hashing only those
            whose modification time changed.
    """
    import pyarrow.parquet as pq

    tables = [
        n
        for n in (names if names is not None else [*RESTRICTED_TABLES, *RESEARCH_TABLES])
        if n in RESEARCH_TABLES or n in RESTRICTED_TABLES
    ]
    damaged: list[Damage] = []
    for name in dict.fromkeys(tables):
        folder = lake.table(name)
        records = _records(folder)
        for path in _current_files(lake, name):
            rel = path.relative_to(folder).as_posix()
            where = path.relative_to(lake.root).as_posix()
            recs = records.get(rel)
            try:
                st = path.stat()
            except FileNotFoundError:
                damaged.append(Damage(name, where, "missing"))
                continue
            if not recs:
                if full:  # no checksum to compare with: every page must decode
                    try:
                        for _ in pq.ParquetFile(path).iter_batches(batch_size=65_536):
                            pass
                    except Exception as exc:
                        damaged.append(Damage(name, where, f"unreadable ({type(exc).__name__})"))
                continue
            sized = [r for r in recs if r["size"] == st.st_size]
            if not sized:
                damaged.append(
                    Damage(name, where, f"size {st.st_size} bytes, committed {recs[-1]['size']}")
                )
                continue
            if not full and any(r["mtime_ns"] == st.st_mtime_ns for r in sized):
                continue
            if _sha256(path) not in {r["sha256"] for r in sized}:
                damaged.append(Damage(name, where, "checksum differs from the committed one"))
    return damaged


def damage_line(damaged: list[Damage]) -> str:
    """One line naming the first damaged file and how many there are."""
    first = damaged[0]
    more = f" (and {len(damaged) - 1} more file(s))" if len(damaged) > 1 else ""
    return (
        f"table {first.table!r}: {first.path} is damaged: {first.why}{more}; "
        "`pacsflow status --check` lists them, `pacsflow repair` rebuilds what it can"
    )
