"""DuckDB over lake tables: out-of-core scans, latest-row views, Arrow streaming.

Shared by the stages (they never import each other). Works with duckdb 1.x and 2.x.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.lake import delta
from pipeline.lake.paths import LakePaths
from pipeline.lake.schemas import schema_for

__all__ = [
    "RESEARCH_VIEWS",
    "SqlRefused",
    "arrow_reader",
    "arrow_table",
    "check_read_only",
    "connect",
    "latest_sql",
    "object_states",
    "research_sandbox",
    "scan_sql",
    "version_sql",
    "volume_verdicts",
]


def connect(tmp: Path | None = None) -> Any:
    """A DuckDB connection with bounded memory (spilling to ``tmp`` when given)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET memory_limit = '512MB'")  # spills to temp_directory beyond it
    if tmp is not None:
        con.execute(f"SET temp_directory = '{tmp / 'duckdb'}'")
    con.execute("SET threads = 2")
    con.execute("SET preserve_insertion_order = true")
    return con


def arrow_table(con: Any, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
    """Run a query and return an Arrow table (works across duckdb 1.x and 2.x)."""
    rel = con.sql(sql, params=dict(params) if params else None)
    fetch = getattr(rel, "to_arrow_table", None) or rel.arrow
    table = fetch()
    return table.read_all() if isinstance(table, pa.RecordBatchReader) else table


def arrow_reader(
    con: Any, sql: str, params: Mapping[str, Any] | None, rows: int
) -> pa.RecordBatchReader:
    """Run a query and stream its rows as Arrow record batches."""
    rel = con.sql(sql, params=dict(params) if params else None)
    fetch = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
    return fetch(rows)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def scan_sql(lake: LakePaths, name: str, version: int | None = None) -> str:
    """SQL for a lake table: its Parquet files, or an empty relation of its schema.

    A research table reads the files of one Delta version (the latest, or ``version``), listed
    when this is called: a query sees that version whole, whatever commits meanwhile.
    Restricted tables' files are found at any depth. Hive folders ``key=value/`` read as
    string columns.
    """
    folder = lake.table(name)
    opts = "union_by_name = true, hive_partitioning = true, hive_types_autocast = false"
    if delta.is_versioned(name):
        files = delta.data_files(lake, name, version)
        if files:
            return f"read_parquet([{', '.join(_quote(f) for f in files)}], {opts})"
    elif folder.is_dir() and next(folder.rglob("*.parquet"), None) is not None:
        return f"read_parquet({_quote(str(folder) + '/**/*.parquet')}, {opts})"
    return _empty_sql(name)


def version_sql(lake: LakePaths, name: str, versions: Mapping[str, int] | None) -> str:
    """:func:`scan_sql` of research table ``name`` at the version ``versions`` names (what a run
    manifest recorded); the latest with ``versions`` None, an empty relation when the mapping
    does not name the table (it had no rows by then)."""
    if versions is None:
        return scan_sql(lake, name)
    if name in versions:
        return scan_sql(lake, name, int(versions[name]))
    return _empty_sql(name)


def _empty_sql(name: str) -> str:
    """An empty relation with the declared columns of table ``name``."""
    cols = ", ".join(f'NULL::{_duck_type(f.type)} AS "{f.name}"' for f in schema_for(name))
    return f"(SELECT {cols} WHERE false)"


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    return "VARCHAR"


def latest_sql(lake: LakePaths, name: str, key: str, order: str, where: str = "true") -> str:
    return (
        f"(SELECT * FROM {scan_sql(lake, name)} WHERE {where} "
        f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {order} DESC) = 1)"
    )


def object_states(lake: LakePaths) -> pa.Table:
    """One row per object ever seen: key, source, location, ``state`` and quarantine ``reason``.

    The state is the latest event of the object across the index, the quarantine and the
    vault (``indexed``, ``quarantined``, ``gone``, ``deidentified``, ``tensorised``: part of
    a stored volume; ``inferred``: part of a volume a model has findings for;
    ``written_back``: part of a volume whose SEG a destination confirmed).
    """
    import duckdb

    con = duckdb.connect()
    try:
        sql = f"""
            SELECT object_key, source, location, state, reason FROM (
                SELECT object_key, source, location, state, NULL AS reason, crawled_at AS event_at
                FROM {scan_sql(lake, "index")}
                UNION ALL
                SELECT object_key, source, location, 'quarantined', reason, quarantined_at
                FROM {scan_sql(lake, "quarantine")}
                UNION ALL
                SELECT v.object_key, i.source, i.location, 'deidentified', NULL, v.deidentified_at
                FROM {scan_sql(lake, "vault")} v
                JOIN {latest_sql(lake, "index", "object_key", "crawled_at")} i
                  ON i.object_key = v.object_key AND i.fingerprint = v.fingerprint
                UNION ALL
                SELECT v.object_key, i.source, i.location, 'tensorised', NULL,
                       v.deidentified_at + INTERVAL 1 MICROSECOND
                FROM (SELECT DISTINCT unnest(sop_instance_uids) AS sop
                      FROM {scan_sql(lake, "tensors")} WHERE status = 'ok') t
                JOIN {scan_sql(lake, "vault")} v ON v.sop_pseudonym = t.sop
                JOIN {latest_sql(lake, "index", "object_key", "crawled_at")} i
                  ON i.object_key = v.object_key AND i.fingerprint = v.fingerprint
                UNION ALL
                SELECT v.object_key, i.source, i.location, 'inferred', NULL,
                       v.deidentified_at + INTERVAL 2 MICROSECOND
                FROM (SELECT DISTINCT unnest(t.sop_instance_uids) AS sop
                      FROM {scan_sql(lake, "tensors")} t
                      WHERE t.tensor_key IN (SELECT tensor_key FROM {scan_sql(lake, "findings")})
                     ) f
                JOIN {scan_sql(lake, "vault")} v ON v.sop_pseudonym = f.sop
                JOIN {latest_sql(lake, "index", "object_key", "crawled_at")} i
                  ON i.object_key = v.object_key AND i.fingerprint = v.fingerprint
                UNION ALL
                SELECT v.object_key, i.source, i.location, 'written_back', NULL,
                       v.deidentified_at + INTERVAL 3 MICROSECOND
                FROM (SELECT DISTINCT unnest(t.sop_instance_uids) AS sop
                      FROM {scan_sql(lake, "tensors")} t
                      WHERE t.tensor_key IN (SELECT tensor_key FROM {scan_sql(lake, "outbox")}
                                             WHERE kind = 'SEG' AND status = 'confirmed')
                     ) w
                JOIN {scan_sql(lake, "vault")} v ON v.sop_pseudonym = w.sop
                JOIN {latest_sql(lake, "index", "object_key", "crawled_at")} i
                  ON i.object_key = v.object_key AND i.fingerprint = v.fingerprint
            ) QUALIFY row_number() OVER (PARTITION BY object_key ORDER BY event_at DESC) = 1
            ORDER BY source, location
        """
        table = arrow_table(con, sql)
    finally:
        con.close()
    return table


def volume_verdicts(con: Any, lake: LakePaths) -> dict[str, tuple[bool, str | None]]:
    """The tensors stage's verdict per series, taken on the pixels: ``{series UID: (volume_ok,
    volume_reason)}`` (empty before any tensors run). It outranks the header-level verdict the
    deid stage computes for the ``series`` table."""
    tensors = scan_sql(lake, "tensors")
    if not tensors.startswith("read_parquet"):
        return {}
    rows = con.execute(
        f"""SELECT SeriesInstanceUID, min(status), min(reason)
            FROM {tensors} GROUP BY 1"""
    ).fetchall()
    return {uid: (status == "ok", reason) for uid, status, reason in rows}


def lineage_sql(lake: LakePaths) -> str:
    """The end-to-end lineage, one row per (object, volume, model identity, result object):
    object key -> pseudonyms -> tensor -> model -> result UID -> delivery status.

    Only non-identifying columns: the object key is a hash, the UIDs are pseudonyms or the
    keyed UIDs write-back derived; original UIDs and locations stay in the restricted zone.
    """
    vault = latest_sql(lake, "vault", "object_key", "deidentified_at")
    outbox = latest_sql(lake, "outbox", "result_uid, dest", "updated_at")
    return f"""(
        SELECT v.object_key, v.sop_pseudonym, v.series_pseudonym, v.deid_version,
               t.tensor_key, t.checksum AS tensor_checksum,
               f.model, f.model_version, f.weights_sha256,
               o.kind AS result_kind, o.result_uid, o.dest, o.status AS delivery_status,
               o.updated_at AS delivery_updated_at
        FROM {vault} v
        LEFT JOIN (SELECT tensor_key, checksum, unnest(sop_instance_uids) AS sop
                   FROM {scan_sql(lake, "tensors")} WHERE status = 'ok') t
               ON t.sop = v.sop_pseudonym
        LEFT JOIN (SELECT DISTINCT tensor_key, model, model_version, weights_sha256
                   FROM {scan_sql(lake, "findings")}) f
               ON f.tensor_key = t.tensor_key
        LEFT JOIN {outbox} o
               ON o.tensor_key = f.tensor_key AND o.model = f.model
              AND o.model_version = f.model_version AND o.weights_sha256 = f.weights_sha256
    )"""


#: The research views of ``pacsflow sql``.
RESEARCH_VIEWS = ("instances", "series", "studies", "patients", "tensors", "findings", "reviews")
#: Statement types a sandboxed query may run (DESCRIBE, SHOW, FROM and VALUES are SELECTs).
_READ_ONLY = frozenset({"SELECT", "EXPLAIN"})


class SqlRefused(ValueError):
    """A ``pacsflow sql`` statement that the sandbox does not run (one-line reason)."""


def check_read_only(sql: str) -> int:
    """The number of statements in ``sql``, all of them read-only queries.

    Raises
    ------
    SqlRefused
        For a statement that is not a query (COPY, ATTACH, INSTALL, LOAD, SET, PRAGMA, CREATE,
        ...), or no statement at all. A syntax error raises ``duckdb.Error``.
    """
    import duckdb

    statements = duckdb.extract_statements(sql)
    if not statements:
        raise SqlRefused("no SQL statement given")
    for st in statements:
        kind = st.type.name
        if kind not in _READ_ONLY:
            raise SqlRefused(
                f"{kind} statements are not allowed: `pacsflow sql` runs read-only queries "
                "(SELECT, WITH, FROM, DESCRIBE, SHOW, EXPLAIN) over the research views"
            )
    return len(statements)


def research_sandbox(lake: LakePaths, tmp: Path, versions: Mapping[str, int] | None = None) -> Any:
    """A DuckDB connection that can read the research zone and nothing else.

    With ``versions`` (``{table: version}``, what a run manifest recorded) each research view
    reads that version of its table, and a table the mapping does not name is an empty view
    (it did not exist yet); ``lineage`` is then left out (it joins restricted tables, which
    have no versions).

    The research tables are views (and ``lineage``, which joins the restricted vault and
    outbox's non-identifying columns, an in-memory table built first); then file access is
    limited to ``research/`` (and the private spill folder ``tmp``), extensions can neither be
    installed nor loaded, and the configuration is locked, so no statement can read the
    restricted zone, the key or any other file, reach the network, or undo the settings.
    Statements still need :func:`check_read_only` (COPY and ATTACH could write into
    ``research/``).
    """
    con = connect(tmp)
    for view in RESEARCH_VIEWS:
        sql = version_sql(lake, view, versions)
        if versions is None and not sql.startswith("read_parquet"):
            continue  # no such view before the table's first rows
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM {sql}")
    if versions is None and any(lake.table("vault").rglob("*.parquet")):
        # pseudonyms, hashes and result UIDs only
        con.execute(f"CREATE TABLE lineage AS SELECT * FROM {lineage_sql(lake)}")
    research = str(lake.research.resolve()) + "/"
    con.execute("SET allowed_directories = $dirs", {"dirs": [research]})
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allow_community_extensions = false")
    con.execute("SET lock_configuration = true")
    return con
