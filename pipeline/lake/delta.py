"""Versioned research tables: Delta Lake (delta-rs) under ``research/tables/<name>/``.

Every write to a research table is one Delta transaction: readers see the version before it or
the version after it, never part of a batch. Objects that come again (a corrected header, the
same instance stored twice) replace their row by key in the same transaction as the batch
(Delta's replaceWhere), so no version ever holds two rows of one object. Each run manifest
records the version of every research table it left
(:attr:`pipeline.lake.manifest.RunManifest.table_versions`), so a cohort can be read as it was
after that run (``pacsflow sql --as-of RUN``, ``cohort(..., as_of=RUN)``); :func:`vacuum`
removes the files no version still needs, keeping every version that a manifest pins.

delta-rs does the log: commits, conflict checks, checkpoints, vacuum. Reads take the data
files of one version from the log (:func:`data_files`) and hand them to pyarrow or DuckDB as
plain Parquet with hive partition folders, which every reader understands. (Scanning through
delta-rs' own pyarrow filesystem, ``DeltaTable.to_pyarrow_dataset()``, aborted the interpreter
at exit in 6 of 12 runs with deltalake 1.6.6 and pyarrow 26; reading the listed files did not,
12 of 12.) Tables written before this module (Parquet part files, no ``_delta_log``) are
adopted in place by :func:`adopt_parquet` on their next write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from pipeline.lake.paths import RESEARCH_TABLES, LakePaths

if TYPE_CHECKING:
    from deltalake import DeltaTable

logger = logging.getLogger(__name__)

__all__ = [
    "KEYS",
    "PARTITION_BY",
    "VERSIONED_TABLES",
    "CommitResult",
    "commit",
    "current_version",
    "data_files",
    "dedupe",
    "is_versioned",
    "last_commit_metadata",
    "table_versions",
    "vacuum",
]

#: The tables kept as Delta tables: the whole research zone.
VERSIONED_TABLES: tuple[str, ...] = RESEARCH_TABLES
#: Hive partition column per table (the folder ``<column>=<value>/``), where there is one.
PARTITION_BY: dict[str, str] = {"instances": "Modality", "series": "Modality"}
#: The columns naming one object of each table: a row that comes again replaces the old one.
KEYS: dict[str, tuple[str, ...]] = {
    "patients": ("patient_token",),
    "studies": ("StudyInstanceUID",),
    "series": ("SeriesInstanceUID",),
    "instances": ("SOPInstanceUID",),
    "tensors": ("tensor_key",),
    "findings": ("finding_key",),
    "reviews": ("review_id",),
    "queues": ("queue_id",),
    "corrections": ("correction_id",),
    "orders": ("order_key",),
    "reports": ("report_key",),
}
#: How often a commit that lost a race with another writer is tried again.
_RETRIES = 8


def is_versioned(name: str) -> bool:
    """True for the tables kept as Delta tables (the research zone)."""
    return name in VERSIONED_TABLES


def _log(lake: LakePaths, name: str) -> Path:
    return lake.table(name) / "_delta_log"


#: Characters delta-rs 1.6 cannot have in a table's path (it panics with
#: "InvalidDomainCharacter", through a symbolic link or a file:// URL too).
UNSUPPORTED_PATH_CHARACTERS = "[]"


def check_lake_path(root: Path) -> None:
    """Refuse a lake folder whose absolute path holds a character delta-rs cannot open.

    Raises
    ------
    LakeError
        The one-line reason and what to do.
    """
    text = str(root.absolute())
    bad = sorted({c for c in text if c in UNSUPPORTED_PATH_CHARACTERS})
    if bad:
        from pipeline.errors import LakeError

        raise LakeError(
            f"a lake cannot live under {text!r}: its path holds {' '.join(bad)}, which the "
            "Delta Lake library cannot open; choose a folder without square brackets"
        )


def _uri(lake: LakePaths, name: str) -> str:
    """The location delta-rs is given for table ``name`` (checked: :func:`check_lake_path`)."""
    check_lake_path(lake.root)
    return str(lake.table(name).absolute())


def _files(lake: LakePaths, name: str, table: DeltaTable) -> list[str]:
    """The data files of ``table`` (one version of ``name``) as paths under the table's real
    folder: the log's relative paths are URL-encoded (``Modality=C%20T``), and delta-rs's own
    ``file_uris`` encode the folder part too (a lake path with a space did not open)."""
    from urllib.parse import unquote

    folder = lake.table(name)
    # through the Arrow C stream: pa.table() of delta-rs's arro3 table imports pandas (0.4 s
    # of a `pacsflow status`)
    actions = pa.RecordBatchReader.from_stream(table.get_add_actions(flatten=True)).read_all()
    return sorted(str(folder / unquote(p)) for p in actions.column("path").to_pylist())


def _open(lake: LakePaths, name: str, version: int | None = None) -> DeltaTable | None:
    """The Delta table ``name`` at ``version`` (the latest when None), or None when the table
    has never been written.

    Raises
    ------
    LakeError
        A version the table does not have (not yet written, or its log was removed).
    """
    if not _log(lake, name).is_dir():
        return None
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    try:
        return DeltaTable(_uri(lake, name), version=version)
    except TableNotFoundError:
        return None  # an empty _delta_log (a writer killed before its first commit)
    except DeltaError as exc:
        from pipeline.errors import LakeError

        raise LakeError(
            f"research table {name!r} has no version {version}: {str(exc).splitlines()[0]}"
        ) from exc


def current_version(lake: LakePaths, name: str) -> int | None:
    """The latest committed version of research table ``name``, or None before its first."""
    table = _open(lake, name)
    return None if table is None else int(table.version())


def table_versions(lake: LakePaths) -> dict[str, int]:
    """The latest version of every research table written so far, ``{name: version}``."""
    out: dict[str, int] = {}
    for name in VERSIONED_TABLES:
        version = current_version(lake, name)
        if version is not None:
            out[name] = version
    return out


def data_files(lake: LakePaths, name: str, version: int | None = None) -> list[str]:
    """The Parquet files making up version ``version`` (the latest when None) of ``name``.

    Empty when the table has never been written, or that version holds no rows. The files sit
    in hive folders (``Modality=CT/``) below the table folder.

    Raises
    ------
    LakeError
        A ``version`` the table never had, or whose files vacuum removed.
    """
    table = _open(lake, name, version)
    if table is None:
        if version is None and not _log(lake, name).is_dir():  # from before Delta
            folder = lake.table(name)
            return sorted(str(p) for p in folder.rglob("*.parquet") if _visible(p, folder))
        return []
    files = _files(lake, name, table)
    if version is not None and not all(Path(f).is_file() for f in files):
        from pipeline.errors import LakeError

        raise LakeError(
            f"version {version} of research table {name!r} is no longer readable: "
            "`pacsflow vacuum` removed its files (it keeps the versions run manifests record)"
        )
    return files


def _visible(path: Path, folder: Path) -> bool:
    return not any(part.startswith((".", "_")) for part in path.relative_to(folder).parts)


@dataclass(frozen=True)
class CommitResult:
    """What one commit did: the version it made, rows added and rows that replaced others."""

    version: int
    added: int
    replaced: int


def _hooks() -> Any:
    from deltalake import PostCommitHookProperties

    # checkpoints keep reads fast; the log is never trimmed, or versions that a run manifest
    # pins would become unreadable (vacuum removes data files, never log entries)
    return PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


def _writer() -> Any:
    from deltalake import WriterProperties

    return WriterProperties(compression="ZSTD")


def _existing_keys(lake: LakePaths, name: str, table: pa.Table) -> pa.Table:
    """The key values of ``table`` that the latest version of ``name`` already holds."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    keys = list(KEYS[name])
    files = data_files(lake, name)
    if not files or table.num_rows == 0:
        return pa.table({k: pa.array([], table.schema.field(k).type) for k in keys})
    from pipeline.lake.schemas import schema_for

    dataset = ds.dataset(
        files,
        schema=schema_for(name),
        format="parquet",
        partitioning="hive",
        partition_base_dir=str(lake.table(name)),
    )
    wanted = table.select(keys)
    expr = None
    for k in keys:
        values = pc.unique(wanted.column(k))
        clause = ds.field(k).isin(values)
        expr = clause if expr is None else expr & clause
    return dataset.to_table(columns=keys, filter=expr)


def _sql_literal(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"key values are text or integers, not {type(value).__name__}")
    return str(value)


def _keys_predicate(name: str, table: pa.Table) -> str:
    """A Delta predicate matching exactly the keys of ``table``'s rows (every row matches:
    delta-rs refuses a replaceWhere whose data falls outside its predicate)."""
    keys = KEYS[name]
    if len(keys) == 1:
        values = table.column(keys[0]).to_pylist()
        return f'"{keys[0]}" IN (' + ", ".join(_sql_literal(v) for v in values) + ")"
    rows = table.select(list(keys)).to_pylist()
    return " OR ".join(
        "(" + " AND ".join(f'"{k}" = {_sql_literal(row[k])}' for k in keys) + ")" for row in rows
    )


def _last_per_key(name: str, table: pa.Table) -> pa.Table:
    """``table`` with one row per key: the last one (a batch holding one object twice)."""
    keys = list(KEYS[name])
    if table.num_rows < 2:
        return table
    import pyarrow.compute as pc

    indexed = table.select(keys).append_column("__row", pa.array(range(table.num_rows)))
    last = indexed.group_by(keys, use_threads=False).aggregate([("__row", "max")])
    if last.num_rows == table.num_rows:
        return table
    return table.take(pc.sort_indices(last.column("__row_max")))


def commit(
    lake: LakePaths,
    name: str,
    data: pa.Table | pa.RecordBatchReader,
    *,
    mode: Literal["upsert", "append", "overwrite"] = "upsert",
    metadata: Mapping[str, str] | None = None,
) -> CommitResult:
    """Commit ``data`` (already conformed to the table's schema) to research table ``name`` as
    one Delta transaction.

    Parameters
    ----------
    lake
        The lake.
    name
        A research table.
    data
        The rows. ``overwrite`` also takes a record batch reader (streamed, bounded memory).
    mode
        ``upsert``: rows whose key (:data:`KEYS`) the table holds replace those rows, the others
        are appended, all in one transaction (a plain append when no key is held, the common
        case; otherwise an overwrite of exactly those keys, Delta's replaceWhere); ``append``:
        add the rows; ``overwrite``: the rows become the whole table.
    metadata
        Recorded with the commit (``history()``), e.g. the version of the table it was built
        from.

    Returns
    -------
    CommitResult
        The new version and what changed.
    """
    from deltalake import CommitProperties, write_deltalake
    from deltalake.exceptions import CommitFailedError

    folder = lake.table(name)
    folder.mkdir(parents=True, exist_ok=True)
    adopt_parquet(lake, name)
    # the log folder first: from now on a reader lists files from the log only, never the
    # data files of a first commit still being written
    _log(lake, name).mkdir(exist_ok=True)
    by = PARTITION_BY.get(name)
    props = CommitProperties(custom_metadata=dict(metadata or {}), max_commit_retries=_RETRIES)
    rows = data.num_rows if isinstance(data, pa.Table) else -1
    for attempt in range(_RETRIES):
        try:
            replaced = 0
            if mode == "upsert" and isinstance(data, pa.Table):
                data = _last_per_key(name, data)
                rows = data.num_rows
                held = _existing_keys(lake, name, data)
                replaced = held.num_rows
            if mode == "upsert" and replaced:
                # replaceWhere, not MERGE: one transaction that drops the rows holding these
                # keys and adds the batch; MERGE (DataFusion) writes string_view columns, on
                # which pyarrow's filtered dataset reads then fail
                write_deltalake(
                    _uri(lake, name),
                    data,
                    partition_by=[by] if by else None,
                    mode="overwrite",
                    predicate=_keys_predicate(name, data),
                    schema_mode="merge",
                    writer_properties=_writer(),
                    commit_properties=props,
                    post_commithook_properties=_hooks(),
                )
            else:
                write_deltalake(
                    _uri(lake, name),
                    data,
                    partition_by=[by] if by else None,
                    mode="overwrite" if mode == "overwrite" else "append",
                    schema_mode="merge" if mode != "overwrite" else "overwrite",
                    writer_properties=_writer(),
                    commit_properties=props,
                    post_commithook_properties=_hooks(),
                )
            break
        except CommitFailedError:
            # another writer's replacement touched the same files: start again from its version
            if attempt + 1 == _RETRIES or not isinstance(data, pa.Table):
                raise
            time.sleep(0.05 * (attempt + 1))
    version = current_version(lake, name)
    assert version is not None
    _record_added(lake, name, version)
    logger.debug("%s: version %d (%d rows, %d replaced)", name, version, rows, replaced)
    return CommitResult(version=version, added=max(rows, 0) - replaced, replaced=replaced)


def _record_added(lake: LakePaths, name: str, version: int) -> None:
    """Record the checksums of the files version ``version`` of ``name`` added
    (:mod:`pipeline.lake.integrity`)."""
    import json
    from urllib.parse import unquote

    from pipeline.lake.integrity import record_files

    log = _log(lake, name) / f"{version:020d}.json"
    added = []
    try:
        for line in log.read_text(encoding="utf-8").splitlines():
            action = json.loads(line) if line.strip() else {}
            if "add" in action:
                added.append(lake.table(name) / unquote(action["add"]["path"]))
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("%s: version %d not checksummed (%s)", name, version, exc)
        return
    record_files(lake, name, added)


def last_commit_metadata(lake: LakePaths, name: str) -> dict[str, Any]:
    """The commit information of the latest version of ``name`` (with the ``metadata`` given
    to :func:`commit`), or ``{}`` before its first."""
    table = _open(lake, name)
    if table is None:
        return {}
    history = table.history(1)
    return dict(history[0]) if history else {}


def dedupe(lake: LakePaths, name: str) -> int:
    """Keep one row per key in research table ``name``: the row committed last. Returns the
    number of rows dropped (one transaction; none when every key is held once).

    Batches committed at the same time by different workers can each add a row of one object
    (an instance stored twice in the archive, in two batches): each batch checked the
    version before the other's.
    """
    from urllib.parse import unquote

    import duckdb

    from pipeline.lake.duck import arrow_table
    from pipeline.lake.schemas import schema_for

    files = data_files(lake, name)
    if not files:
        return 0
    keys = ", ".join(KEYS[name])
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    scan = (
        f"read_parquet([{listed}], union_by_name = true, hive_partitioning = true, "
        "hive_types_autocast = false, filename = true, file_row_number = true)"
    )
    con = duckdb.connect()
    try:
        dup = con.execute(
            f"SELECT count(*) FROM (SELECT {keys} FROM {scan} GROUP BY ALL HAVING count(*) > 1)"
        ).fetchall()
        if not dup[0][0]:
            return 0
        table = _open(lake, name)
        assert table is not None
        actions = pa.table(table.get_add_actions(flatten=True))
        con.register(
            "pf_added",
            pa.table(
                {
                    "filename": [
                        str(lake.table(name) / unquote(p))
                        for p in actions.column("path").to_pylist()
                    ],
                    "added": actions.column("modification_time").cast(pa.int64()),
                }
            ),
        )
        ranked = f"""
            SELECT d.*, row_number() OVER (PARTITION BY {keys}
                ORDER BY a.added DESC, d.filename DESC, d.file_row_number DESC) AS pf_rank,
                count(*) OVER (PARTITION BY {keys}) AS pf_n
            FROM {scan} d LEFT JOIN pf_added a USING (filename)
        """
        winners = arrow_table(
            con,
            f"SELECT * EXCLUDE (filename, file_row_number, pf_rank, pf_n) FROM ({ranked}) "
            "WHERE pf_n > 1 AND pf_rank = 1",
        )
        dropped_row = con.execute(
            f"SELECT count(*) FROM ({ranked}) WHERE pf_n > 1 AND pf_rank > 1"
        ).fetchall()[0]
    finally:
        con.close()
    schema = schema_for(name)
    winners = pa.Table.from_arrays(
        [winners.column(f.name).cast(f.type) for f in schema], schema=schema
    )
    from deltalake import write_deltalake

    clauses = []
    for k in KEYS[name]:
        values = sorted({str(v) for v in winners.column(k).to_pylist()})
        quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
        clauses.append(f"{k} IN ({quoted})")
    by = PARTITION_BY.get(name)
    write_deltalake(
        _uri(lake, name),
        winners,
        partition_by=[by] if by else None,
        mode="overwrite",
        predicate=" AND ".join(clauses),
        writer_properties=_writer(),
        post_commithook_properties=_hooks(),
    )
    version = current_version(lake, name)
    if version is not None:
        _record_added(lake, name, version)
    dropped = int(dropped_row[0]) if dropped_row else 0
    logger.info("%s: %d row(s) of objects committed twice dropped", name, dropped)
    return dropped


def adopt_parquet(lake: LakePaths, name: str) -> int:
    """Make a research table written before Delta (hive Parquet part files, no log) a Delta
    table in place: one commit that adds its files as they are (nothing is copied, so readers
    see the same rows before and after). Returns the number of files adopted.

    Rows of an object stored twice stay as they were (the next write of that object replaces
    them all).
    """
    folder = lake.table(name)
    if _log(lake, name).is_dir() or not folder.is_dir():
        return 0
    files = [p for p in folder.rglob("*.parquet") if _visible(p, folder)]
    if not files:
        return 0
    from deltalake import Schema, convert_to_deltalake

    by = PARTITION_BY.get(name)
    partitions = Schema.from_arrow(pa.schema([(by, pa.string())])) if by else None
    convert_to_deltalake(
        _uri(lake, name),
        partition_by=partitions,
        partition_strategy="hive" if by else None,
        post_commithook_properties=_hooks(),
    )
    logger.info("%s: %d Parquet file(s) adopted as Delta version 0", name, len(files))
    return len(files)


def vacuum(
    lake: LakePaths,
    *,
    retention_hours: int,
    keep: Mapping[str, Iterable[int]] | None = None,
    dry_run: bool = False,
) -> dict[str, list[str]]:
    """Remove the files of research tables that no kept version needs.

    A file goes when the latest version does not hold it, no version in ``keep`` holds it,
    and it was removed from the table (or never committed: a writer killed mid-write) more
    than ``retention_hours`` ago.

    Parameters
    ----------
    lake
        The lake.
    retention_hours
        Keep files younger than this (hours, >= 0), so that a reader that started before a
        commit can finish.
    keep
        ``{table: versions}`` that must stay readable (those the run manifests record).
    dry_run
        List only.

    Returns
    -------
    dict
        The removed (or removable) files per table, relative to the table folder.
    """
    if retention_hours < 0:
        raise ValueError("retention_hours must be >= 0")
    out: dict[str, list[str]] = {}
    for name in VERSIONED_TABLES:
        table = _open(lake, name)
        if table is None:
            continue
        latest = int(table.version())
        pinned = sorted({int(v) for v in (keep or {}).get(name, ()) if 0 <= int(v) <= latest})
        removed = table.vacuum(
            retention_hours=int(retention_hours),
            dry_run=dry_run,
            enforce_retention_duration=False,
            full=True,
            keep_versions=pinned or None,
            post_commithook_properties=_hooks(),
        )
        out[name] = sorted(removed)
    return out
