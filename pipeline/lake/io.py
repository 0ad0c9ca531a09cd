"""Atomic Parquet writes and schema-checked reads of lake tables.

The research tables are Delta tables (:mod:`pipeline.lake.delta`): :func:`write_partition`
and :func:`write_partitioned` commit their rows as one Delta transaction, replacing the rows of
objects the table already holds, and :func:`read_table`/:func:`scan_batches` read one version
(the latest, or ``version=``). The restricted tables are plain hive Parquet datasets:

A partition is written to a hidden temporary file in its final folder, flushed to disk, and
renamed into place (``os.replace`` is atomic on POSIX within one filesystem). Readers (pyarrow,
pandas, Dask, DuckDB with ``*.parquet`` globs) never see a half-written file: the temporary name
starts with ``.`` and does not end in ``.parquet``. A killed writer leaves at most a hidden
``.*.tmp-*`` file, which :func:`sweep_temporaries` removes. The writer is
:mod:`pipeline.dicom.atomic`'s (``atomic_write_bytes``, ``atomic_write_text`` and
``sync_filesystem`` are re-exported here).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.dicom.atomic import (
    TEMPORARY_GLOB,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    sync_filesystem,
)
from pipeline.lake import delta
from pipeline.lake.crypto import SEALED_COLUMNS, VaultCipher
from pipeline.lake.paths import LakePaths
from pipeline.lake.schemas import schema_for

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "commit_rows",
    "conform",
    "partition_value",
    "read_table",
    "scan_batches",
    "sweep_temporaries",
    "sync_filesystem",
    "table_exists",
    "write_partition",
    "write_partitioned",
]

_SAFE = re.compile(r"^[A-Za-z0-9._=-]+$")


def conform(table: pa.Table | Mapping[str, Any] | list[dict[str, Any]], name: str) -> pa.Table:
    """Return ``table`` with exactly the declared schema of lake table ``name``.

    Accepts an Arrow table, a mapping of columns, or a list of row dicts. Missing nullable
    columns are filled with nulls; extra columns, missing non-nullable columns and values that
    do not cast raise ``ValueError``.
    """
    schema = schema_for(name)
    if isinstance(table, list):
        table = pa.Table.from_pylist(table, schema=schema) if table else schema.empty_table()
    elif not isinstance(table, pa.Table):
        table = pa.table(dict(table))
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"table {name!r} has undeclared columns: {sorted(extra)}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            if col.type != field.type:
                col = col.cast(field.type)
            if not field.nullable and col.null_count:
                raise ValueError(f"table {name!r}: column {field.name!r} has nulls")
            columns.append(col)
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, type=field.type))
        else:
            raise ValueError(f"table {name!r}: required column {field.name!r} is missing")
    return pa.Table.from_arrays(columns, schema=schema)


def write_partition(
    lake: LakePaths,
    name: str,
    table: pa.Table | Mapping[str, Any] | list[dict[str, Any]],
    *,
    part: str,
    partition: Mapping[str, str] | None = None,
) -> Path:
    """Write one partition file of lake table ``name`` atomically and return its path.

    Parameters
    ----------
    lake:
        The lake.
    name:
        Table name (``index``, ``series``, ...).
    table:
        The rows; conformed to the declared schema first.
    part:
        File stem, unique within the partition (e.g. the run id and a chunk number). Writing
        the same ``part`` again replaces the file, which makes retries idempotent.
    partition:
        Hive partition keys and values, e.g. ``{"Modality": "CT"}``. A key that is also a
        declared column is taken out of the file (its value lives in the folder name, the
        hive convention pandas, Dask, pyarrow and DuckDB all read).

    Returns
    -------
    Path
        The final path of the partition file (the table's folder for a research table: its
        rows are one Delta commit, objects already held replaced, see
        :func:`pipeline.lake.delta.commit`).
    """
    if delta.is_versioned(name):
        if not _SAFE.match(part):
            raise ValueError(f"unsafe part name {part!r}")
        conformed = conform(table, name)
        for key, value in (partition or {}).items():
            if key in conformed.column_names:
                index = conformed.schema.get_field_index(key)
                conformed = conformed.set_column(
                    index,
                    conformed.schema.field(index),
                    pa.array([value] * conformed.num_rows, conformed.schema.field(index).type),
                )
        commit_rows(lake, name, conformed)
        return lake.table(name)
    folder = lake.table(name)
    for key, value in (partition or {}).items():
        if not (_SAFE.match(key) and _SAFE.match(value)):
            raise ValueError(f"unsafe partition {key}={value!r}")
        folder = folder / f"{key}={value}"
    if not _SAFE.match(part):
        raise ValueError(f"unsafe part name {part!r}")
    final = folder / f"{part}.parquet"
    conformed = conform(table, name)
    sealer = lake.sealer() if name in SEALED_COLUMNS else None
    if sealer is not None:  # a lake encrypted at rest: its identifying columns are sealed
        conformed = sealer.seal_table(name, conformed)
    drop = [k for k in (partition or {}) if k in conformed.column_names]
    if drop:
        conformed = conformed.drop_columns(drop)
    from pipeline.lake.integrity import record_files

    with atomic_path(final) as tmp:
        pq.write_table(conformed, tmp, compression="zstd")
        # recorded before the rename (which keeps its times): checked before stages read it
        record_files(lake, name, [tmp], as_names=[final])
    logger.debug("wrote %d rows to %s", conformed.num_rows, final.relative_to(lake.root))
    return final


def partition_value(value: Any) -> str:
    """A hive folder value: the value itself when safe, ``UNKNOWN`` for null or unsafe ones.

    (pandas cannot read a null hive partition, so nulls get a spelled-out value.)
    """
    text = str(value).strip().replace(" ", "_") if value not in (None, "") else ""
    return text if text and _SAFE.match(text) and text != "UNKNOWN" else "UNKNOWN"


def write_partitioned(
    lake: LakePaths,
    name: str,
    rows: list[dict[str, Any]],
    *,
    part: str,
    by: str,
) -> list[Path]:
    """Write ``rows`` as hive partitions of table ``name`` split by column ``by``.

    One file ``<by>=<value>/<part>.parquet`` per distinct value (nulls and values unsafe in a
    path go to ``<by>=UNKNOWN``, read back as that string). Same ``part`` again replaces the
    files, as :func:`write_partition` does. A research table gets all the rows in one Delta
    commit (partitioned by :data:`pipeline.lake.delta.PARTITION_BY`, which ``by`` must name).
    """
    if delta.is_versioned(name):
        if delta.PARTITION_BY.get(name) != by:
            raise ValueError(f"research table {name!r} is not partitioned by {by!r}")
        if not _SAFE.match(part):
            raise ValueError(f"unsafe part name {part!r}")
        commit_rows(lake, name, rows)
        return [lake.table(name)]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        value = partition_value(row.get(by))
        row = {**row, by: value}
        groups.setdefault(value, []).append(row)
    return [
        write_partition(lake, name, group, part=part, partition={by: value})
        for value, group in sorted(groups.items())
    ]


def commit_rows(
    lake: LakePaths, name: str, table: pa.Table | Mapping[str, Any] | list[dict[str, Any]]
) -> delta.CommitResult:
    """Commit rows to research table ``name`` as one Delta transaction: rows of objects the
    table holds (by :data:`pipeline.lake.delta.KEYS`) replace theirs, the others are added.

    The partition column's nulls and values unsafe in a path become ``UNKNOWN``, as in
    :func:`write_partitioned`.
    """
    if not delta.is_versioned(name):
        raise ValueError(f"table {name!r} is not a research table")
    by = delta.PARTITION_BY.get(name)
    if by is not None and isinstance(table, list):
        table = [{**row, by: partition_value(row.get(by))} for row in table]
    return delta.commit(lake, name, conform(table, name))


def table_exists(lake: LakePaths, name: str) -> bool:
    """True when table ``name`` has at least one partition file (a research table: when its
    latest version holds one)."""
    if delta.is_versioned(name):
        return bool(delta.data_files(lake, name))
    folder = lake.table(name)
    return folder.is_dir() and next(folder.rglob("*.parquet"), None) is not None


def _dataset(lake: LakePaths, name: str, version: int | None) -> ds.Dataset | None:
    """The files of table ``name`` as a pyarrow dataset with its declared schema (version
    ``version`` of a research table), or None when there are none."""
    folder = lake.table(name)
    if delta.is_versioned(name):
        files = delta.data_files(lake, name, version)
        if not files:
            return None
        return ds.dataset(
            files,
            schema=schema_for(name),
            format="parquet",
            partitioning="hive",
            partition_base_dir=str(folder),
        )
    if version is not None:
        raise ValueError(f"table {name!r} is not versioned")
    if not table_exists(lake, name):
        return None
    return ds.dataset(
        folder,
        schema=schema_for(name),
        format="parquet",
        partitioning="hive",
        ignore_prefixes=[".", "_"],
    )


def read_table(
    lake: LakePaths,
    name: str,
    *,
    columns: list[str] | None = None,
    filter: Any = None,
    version: int | None = None,
) -> pa.Table:
    """Read lake table ``name`` (all partitions) with its declared schema.

    Returns an empty table of the right schema when the table has no files yet. Hive partition
    columns that duplicate a declared column are read as that column. Sealed columns (a lake
    encrypted at rest) come back opened, and the vault's originals decrypted, when ``lake``
    carries its keys; a ``filter`` sees them as stored. ``version`` reads that version of a
    research table (the latest when None).
    """
    dataset = _dataset(lake, name, version)
    if dataset is None:
        empty = schema_for(name).empty_table()
        return empty.select(columns) if columns else empty
    vault_keys = name == "vault" and lake.keys is not None
    wanted = columns
    if vault_keys and columns is not None and "object_key" not in columns:
        wanted = [*columns, "object_key"]  # the vault's ciphertexts are bound to it
    table = dataset.to_table(columns=wanted, filter=filter)
    if vault_keys:
        assert lake.keys is not None
        table = VaultCipher(lake.keys.secret).decrypt_table(table)
        if wanted is not columns:
            table = table.drop_columns(["object_key"])
    sealer = lake.sealer() if name in SEALED_COLUMNS else None
    return sealer.open_table(name, table) if sealer is not None else table


def scan_batches(
    lake: LakePaths,
    name: str,
    *,
    columns: list[str] | None = None,
    batch_size: int = 65_536,
    version: int | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream lake table ``name`` as record batches (memory bounded by ``batch_size``); sealed
    columns come back opened. ``version`` as in :func:`read_table`."""
    dataset = _dataset(lake, name, version)
    if dataset is None:
        return
    sealer = lake.sealer() if name in SEALED_COLUMNS else None
    for batch in dataset.to_batches(columns=columns, batch_size=batch_size):
        if sealer is None:
            yield batch
        else:
            opened = sealer.open_table(name, pa.Table.from_batches([batch]))
            yield from opened.to_batches()


def sweep_temporaries(lake: LakePaths) -> int:
    """Remove temporary files left by killed writers; return how many were removed."""
    n = 0
    if not lake.root.is_dir():
        return 0
    for tmp in lake.root.rglob(TEMPORARY_GLOB):
        if tmp.is_file():
            tmp.unlink()
            n += 1
    return n
