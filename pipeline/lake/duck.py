"""DuckDB over lake tables: out-of-core scans, latest-row views, Arrow streaming.

Shared by the stages (they never import each other). Works with duckdb 1.x and 2.x. The SQL
itself lives in :mod:`pipeline.lake.queries` (``scan_sql``, ``latest_sql`` and ``lineage_sql``
are re-exported here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.lake import queries
from pipeline.lake.paths import LakePaths
from pipeline.lake.queries import latest_sql, lineage_sql, scan_sql, version_sql

__all__ = [
    "RESEARCH_VIEWS",
    "SqlRefused",
    "arrow_reader",
    "arrow_table",
    "check_read_only",
    "connect",
    "latest_sql",
    "lineage_sql",
    "object_states",
    "relation_arrow",
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
        q = queries.set_temp_directory(tmp)
        con.execute(q.sql, q.params)
    con.execute("SET threads = 2")
    con.execute("SET preserve_insertion_order = true")
    return con


def arrow_table(con: Any, sql: str, params: Mapping[str, Any] | None = None) -> pa.Table:
    """Run a query and return an Arrow table (works across duckdb 1.x and 2.x)."""
    return relation_arrow(con.sql(sql, params=dict(params) if params else None))


def relation_arrow(rel: Any) -> pa.Table:
    """A DuckDB relation's rows as an Arrow table (works across duckdb 1.x and 2.x)."""
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


def object_states(lake: LakePaths, events: Iterable[str] | None = None) -> pa.Table:
    """One row per object ever seen: key, source, location, ``state`` and quarantine ``reason``.

    The state is the latest event of the object across the index, the quarantine and the
    vault (``indexed``, ``quarantined``, ``gone``, ``deidentified``, ``tensorised``: part of
    a stored volume; ``inferred``: part of a volume a model has findings for;
    ``written_back``: part of a volume whose SEG a destination confirmed). ``events``: the
    events to take (:data:`pipeline.lake.queries.OBJECT_EVENTS` names; None: all), as the
    stages declare them (:func:`pipeline.run.object_states`).
    """
    import duckdb

    con = duckdb.connect()
    try:
        q = queries.object_states(lake, events)
        table = arrow_table(con, q.sql, q.params)
    finally:
        con.close()
    return table


def volume_verdicts(con: Any, lake: LakePaths) -> dict[str, tuple[bool, str | None]]:
    """The tensors stage's verdict per series, taken on the pixels: ``{series UID: (volume_ok,
    volume_reason)}`` (empty before any tensors run). It outranks the header-level verdict the
    deid stage computes for the ``series`` table."""
    if not queries.has_files(lake, "tensors"):
        return {}
    tensors = scan_sql(lake, "tensors")
    rows = con.execute(queries.volume_verdicts(lake, tensors).sql).fetchall()
    return {uid: (status == "ok", reason) for uid, status, reason in rows}


#: The research views of ``pacsflow sql``.
RESEARCH_VIEWS = (
    "instances",
    "series",
    "studies",
    "patients",
    "tensors",
    "findings",
    "reviews",
    "corrections",
    "orders",
    "reports",
)
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
        # every view exists from the start: an empty one, typed, before the table's first rows
        # findings, reviews and corrections with the cohort keys (issue #24)
        sql = queries.research_view_sql(lake, view, versions)
        con.execute(queries.create_view(view, RESEARCH_VIEWS, sql))
    if versions is None and any(lake.table("vault").rglob("*.parquet")):
        # pseudonyms, hashes and result UIDs only
        con.execute(queries.create_lineage_table(lake))
    con.execute(
        "SET allowed_directories = $dirs", {"dirs": queries.allowed_prefixes(lake.research)}
    )
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allow_community_extensions = false")
    con.execute("SET lock_configuration = true")
    return con
