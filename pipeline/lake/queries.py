"""Every SQL statement pacsflow runs over the lake, by name, with bound parameters.

Values never enter SQL text: run ids, sources, destinations, model identities,
preprocessing hashes, config flags and UID lists are DuckDB parameters (``$name``), bound when
the statement runs. Three kinds of text cannot be bound everywhere and are spliced, each by
one audited helper of this module and nowhere else:

- **file paths** (the Parquet folders of the lake tables, a crawl's listing, the DuckDB spill
  folder): :func:`sql_path` writes a string literal (single quotes doubled, NUL refused) and
  :func:`parquet_glob` escapes the glob characters of the folder (``*``, ``?``, ``[``) first.
  They are spliced because a view cannot hold a parameter (DuckDB 2.0: "This type of
  statement can't be prepared") and the table fragments below compose into views;
- **identifiers** (view, table and column names): :func:`identifier` accepts only a name of
  a given whitelist (the lake's tables, a schema's columns, a result's columns) and quotes it;
- **operator-written filters** (a model's ``applies_to``, the ``where`` of a cohort): only
  :func:`filter_expression`, which parses the text as one boolean expression and refuses
  anything else (a second statement, a comment eating the rest of the query).

The functions return a :class:`Query` (SQL text and its parameters) or, for fragments that
compose into larger statements, the SQL text of a relation in parentheses.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow as pa

from pipeline.errors import ConfigError, LakeError
from pipeline.lake.paths import LakePaths
from pipeline.lake.schemas import schema_for

__all__ = [
    "COHORT_KEYS",
    "OBJECT_EVENTS",
    "OWN_UIDS",
    "CrawlQueries",
    "Query",
    "allowed_prefixes",
    "cohort_base",
    "cohort_join",
    "count_rows",
    "create_lineage_table",
    "create_scan_view",
    "create_view",
    "current_index",
    "deid_export_todo",
    "deid_new_objects",
    "deid_own_results",
    "deid_patients",
    "deid_series_instances",
    "deid_studies",
    "empty_sql",
    "filter_expression",
    "finding_name",
    "finding_name_sql",
    "findings_view_sql",
    "identifier",
    "infer_channel_series",
    "infer_done_tensors",
    "infer_todo",
    "latest_sql",
    "lineage_sql",
    "object_states",
    "parquet_glob",
    "patient_age_years_sql",
    "research_view_sql",
    "review_catalog",
    "review_descriptions",
    "run_ids_about",
    "scan_sql",
    "set_temp_directory",
    "sql_path",
    "status_findings",
    "status_reviews",
    "subject_series",
    "tensors_todo",
    "version_sql",
    "volume_verdicts",
    "writeback_confirmed",
    "writeback_groups",
    "writeback_originals",
    "writeback_status",
]


@dataclass(frozen=True)
class Query:
    """One SQL statement and the values bound to its ``$name`` parameters."""

    sql: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def total(self, expr: str = "count(*)") -> Query:
        """``expr`` over this query's rows (a stage's total for its progress), e.g.
        ``count(*)`` or ``coalesce(sum(len(objects)), 0)``; ``expr`` is pacsflow's own text."""
        return Query(f"SELECT {expr} FROM ({self.sql}) AS todo", self.params)


# ---------------------------------------------------------------------------------------------
# the audited splicing helpers
# ---------------------------------------------------------------------------------------------

_PLAIN_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def sql_path(path: str | os.PathLike[str]) -> str:
    """A file path as a SQL string literal: single quotes doubled, nothing else interpreted.

    Raises
    ------
    LakeError
        For a path holding a NUL character (no file system allows one).
    """
    text = os.fspath(path)
    if "\x00" in text:
        raise LakeError("a lake path holds a NUL character; choose another lake folder")
    return "'" + text.replace("'", "''") + "'"


def parquet_glob(folder: Path, pattern: str = "**/*.parquet") -> str:
    """The literal of a glob over ``folder``: the folder's own glob characters escaped (so a
    folder named ``o'brien [1]`` matches itself), then ``pattern`` (code-written)."""
    return sql_path(glob.escape(str(folder)) + "/" + pattern)


def allowed_prefixes(folder: Path) -> list[str]:
    """DuckDB ``allowed_directories`` entries for ``folder``: the folder, and its glob-escaped
    spelling (which :func:`parquet_glob` patterns start with when the name holds ``[``,
    ``*`` or ``?``; as a glob it matches only ``folder`` itself)."""
    plain = str(folder.resolve()) + "/"
    return sorted({plain, glob.escape(plain)})


def identifier(name: str, allowed: Iterable[str]) -> str:
    """``name`` as a quoted SQL identifier, when it is one of ``allowed``.

    Raises
    ------
    ValueError
        For a name outside the whitelist.
    """
    allowed = set(allowed)
    if name not in allowed:
        raise ValueError(
            f"{name!r} is not one of the expected names ({', '.join(sorted(allowed))})"
        )
    return '"' + name.replace('"', '""') + '"'


def _columns(table: str, names: str) -> str:
    """A code-written column list (``"result_uid, dest"``) checked against ``table``'s schema."""
    known = set(schema_for(table).names)
    parts = [p.strip() for p in names.split(",")]
    for p in parts:
        if p not in known or not _PLAIN_NAME.match(p):
            raise ValueError(f"{p!r} is not a column of lake table {table!r}")
    return ", ".join(parts)


def filter_expression(expr: str, *, what: str) -> str:
    """An operator-written boolean filter (``"Modality = 'CT' AND volume_ok"``), parsed as one
    expression and spliced as DuckDB's own rendering of it, in parentheses: nothing outside the
    expression (a second statement, a closing parenthesis and a UNION, a comment that would
    swallow the rest of the query) can reach the query.

    Parameters
    ----------
    expr:
        The filter, DuckDB syntax.
    what:
        Where it comes from, for the error (``"model 'x': applies_to"``).

    Raises
    ------
    ConfigError
        For text that is not exactly one expression.
    """
    import duckdb

    parse = getattr(duckdb, "SQLExpression", None)
    try:
        if parse is not None:  # duckdb >= 1.2: the parser's rendering, comments dropped
            rendered = str(parse(expr))
        else:  # pragma: no cover - older duckdb: the text itself, if it is one statement
            statements = duckdb.extract_statements(f"SELECT 1 WHERE ({expr}\n)")
            if len(statements) != 1 or statements[0].type.name != "SELECT":
                raise ConfigError(f"{what} {expr!r} is not one filter expression")
            rendered = expr
    except duckdb.Error as exc:
        raise ConfigError(
            f"{what} {expr!r} is not one filter expression ({str(exc).splitlines()[0]})"
        ) from None
    return f"({rendered})"


# ---------------------------------------------------------------------------------------------
# fragments: a table's rows, its latest rows, the lineage
# ---------------------------------------------------------------------------------------------


def set_temp_directory(tmp: Path) -> Query:
    """Where DuckDB spills beyond its memory limit (``tmp/duckdb``)."""
    return Query("SET temp_directory = $dir", {"dir": str(tmp / "duckdb")})


def _duck_type(t: pa.DataType) -> str:
    """DuckDB's name of an Arrow type of the lake's schemas.

    Raises:
        TypeError: a type the schemas do not use (a new one must be added here, not read as
            text: an empty table, or the NULLs of a column older files lack, take it).
    """
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "VARCHAR"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_date32(t):
        return "DATE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_binary(t):
        return "BLOB"
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    if pa.types.is_struct(t):
        fields = ", ".join(f'"{f.name}" {_duck_type(f.type)}' for f in t)
        return f"STRUCT({fields})"
    raise TypeError(f"no DuckDB type for {t}")


def has_files(lake: LakePaths, name: str) -> bool:
    """Whether lake table ``name`` holds any rows' files yet (its latest version)."""
    from pipeline.lake import delta

    if delta.is_versioned(name):
        return bool(delta.data_files(lake, name, None))
    folder = lake.table(name)
    return folder.is_dir() and next(folder.rglob("*.parquet"), None) is not None


def scan_sql(lake: LakePaths, name: str, version: int | None = None) -> str:
    """SQL for a lake table: its Parquet files, or an empty relation of its schema.

    A research table reads the files of one Delta version (the latest, or ``version``), listed
    when this is called: a query sees that version whole, whatever commits meanwhile.
    Restricted tables' files are found at any depth. Hive folders ``key=value/`` read as
    string columns.
    """
    from pipeline.lake import delta

    folder = lake.table(name)  # KeyError for a name that is not a lake table
    opts = "union_by_name = true, hive_partitioning = true, hive_types_autocast = false"
    scan = None
    if delta.is_versioned(name):
        files = delta.data_files(lake, name, version)
        if files:
            scan = f"read_parquet([{', '.join(sql_path(f) for f in files)}], {opts})"
    elif folder.is_dir() and next(folder.rglob("*.parquet"), None) is not None:
        scan = f"read_parquet({parquet_glob(folder)}, {opts})"
    if scan is None:
        return empty_sql(name)
    # every declared column, typed, also where the files predate it (a lake written by an
    # earlier release: its rows read NULL in a column added since, instead of a Binder error)
    return f"({empty_sql(name)} UNION ALL BY NAME SELECT * FROM {scan})"


def version_sql(lake: LakePaths, name: str, versions: Mapping[str, int] | None) -> str:
    """:func:`scan_sql` of research table ``name`` at the version ``versions`` names (what a run
    manifest recorded); the latest with ``versions`` None, an empty relation when the mapping
    does not name the table (it had no rows by then)."""
    if versions is None:
        return scan_sql(lake, name)
    if name in versions:
        return scan_sql(lake, name, int(versions[name]))
    return empty_sql(name)


def empty_sql(name: str) -> str:
    """An empty relation with the declared columns of table ``name``."""
    cols = ", ".join(
        f"NULL::{_duck_type(f.type)} AS {identifier(f.name, [f.name])}" for f in schema_for(name)
    )
    return f"(SELECT {cols} WHERE false)"


#: A DICOM age string (``nnnD``, ``nnnW``, ``nnnM``, ``nnnY``; spaces and fewer digits
#: tolerated) split into its number and unit.
_AGE_PATTERN: Final = r"^\s*([0-9]{1,3})\s*([DWMYdwmy])\s*$"


def patient_age_years_sql(column: str) -> str:
    """SQL: the DICOM age string in ``column`` (pacsflow's own text) in years, as a DOUBLE;
    NULL where it is not one (``'049Y'`` -> 49.0, ``'018M'`` -> 1.5, ``'003W'`` -> 0.0575)."""
    num = f"TRY_CAST(regexp_extract({column}, '{_AGE_PATTERN}', 1) AS DOUBLE)"
    unit = f"upper(regexp_extract({column}, '{_AGE_PATTERN}', 2))"
    return (
        f"(CASE {unit} WHEN 'Y' THEN {num} WHEN 'M' THEN {num} / 12.0 "
        f"WHEN 'W' THEN {num} * 7.0 / 365.25 WHEN 'D' THEN {num} / 365.25 END)"
    )


def finding_name(label: str, instance: int | None) -> str:
    """The unique name of a finding in its volume and model: ``<label>_<instance>``, or the
    label where there is no instance (a label map's label, a class, a row written before
    issue #24). The finding key ends with it; write-back names the segment with it."""
    return label if instance is None else f"{label}_{instance}"


def finding_name_sql(alias: str) -> str:
    """SQL: the unique name of a finding in its volume and model, ``<label>_<instance>``
    (``lung_nodule_2``; the label alone where ``instance`` is null, as in rows written
    before issue #24, whose label holds the whole name). Write-back's segment labels and
    tracking UIDs and the finding keys use it, so they are the same as before the split."""
    a = identifier(alias, [alias])
    return (
        f"(CASE WHEN {a}.instance IS NULL THEN {a}.label "
        f"ELSE {a}.label || '_' || CAST({a}.instance AS VARCHAR) END)"
    )


#: The cohort keys of a tensor's series (CTEs ``st``: per study, ``fr``: per series; after a
#: CTE ``s`` of series rows) and the columns :func:`infer_todo` takes from them.
_COHORT_CTES: Final = """st AS (
            SELECT StudyInstanceUID, any_value(StudyDate) AS StudyDate,
                   any_value(PatientAge) AS PatientAge
            FROM {studies} GROUP BY StudyInstanceUID
        ), fr AS (
            SELECT SeriesInstanceUID, min(FrameOfReferenceUID) AS FrameOfReferenceUID,
                   min(AcquisitionNumber) AS AcquisitionNumber
            FROM {instances}
            WHERE SeriesInstanceUID IN (SELECT SeriesInstanceUID FROM s)
            GROUP BY SeriesInstanceUID
        )"""
_COHORT_COLUMNS: Final = (
    "s.patient_token, s.Manufacturer, st.StudyDate, "
    f"{patient_age_years_sql('st.PatientAge')} AS patient_age_years, "
    "fr.FrameOfReferenceUID, fr.AcquisitionNumber"
)
#: The cohort keys the result views carry (issue #24).
COHORT_KEYS: Final = (
    "patient_token",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Manufacturer",
    "StudyDate",
)
#: Old rows' ``label`` ``<class>_<n>``: the rows of candidates (their measurements hold a
#: diameter) and of boxes (``box_class``) before issue #24 split label and instance.
_OLD_INSTANCE: Final = (
    "(f.instance IS NULL AND regexp_matches(f.label, '_[0-9]+$') AND (f.box_class IS NOT NULL "
    "OR json_extract(f.measurements, '$.diameter_mm') IS NOT NULL))"
)


def _measured(key: str) -> str:
    return f"TRY_CAST(json_extract_string(f.measurements, '$.{key}.value') AS DOUBLE)"


def findings_view_sql(lake: LakePaths, versions: Mapping[str, int] | None = None) -> str:
    """The ``findings`` view of ``pacsflow sql`` (at the table ``versions`` a run recorded;
    None: the latest): the rows with their cohort keys, typed measurements and ``lesion_id``.

    - Rows inferred before issue #24 get the cohort keys from ``series`` and ``studies``, the
      typed measurements from ``measurements``, and ``label`` / ``instance`` split
      (``lung_nodule_2`` -> ``lung_nodule``, 2) where the row is a candidate or a box.
    - ``lesion_id`` links the findings of one acquisition (the same study, frame of
      reference and acquisition number: e.g. a soft-tissue and a lung-kernel reconstruction)
      by the same model and label whose centres lie in each other's extent (one's centre
      within the other's ``size_mm`` box, in patient coordinates): count
      ``DISTINCT lesion_id`` per patient, not rows. Linked through at most two steps; a row
      without a frame of reference or a centre is its own lesion. Its value: ``L`` and 16 hex
      digits of the SHA-256 of the smallest ``finding_key`` linked.
    """
    f = version_sql(lake, "findings", versions)
    series = version_sql(lake, "series", versions)
    studies = version_sql(lake, "studies", versions)
    keys = ", ".join(
        f"coalesce(f.{k}, s.{k}) AS {k}"
        for k in ("patient_token", "StudyInstanceUID", "Modality", "Manufacturer")
    )

    def inside(box: str) -> str:  # one centre within ``box``'s extent, on each axis
        return " AND ".join(
            f"abs(a.centre_mm[{i}] - b.centre_mm[{i}]) <= {box}.size_mm[{i}] / 2" for i in (1, 2, 3)
        )

    within = f"({inside('a')}) OR ({inside('b')})"
    return f"""(
        WITH n AS (
            SELECT f.* REPLACE (
                   {keys},
                   coalesce(f.StudyDate, st.StudyDate) AS StudyDate,
                   coalesce(f.patient_age_years, {patient_age_years_sql("st.PatientAge")})
                       AS patient_age_years,
                   CASE WHEN {_OLD_INSTANCE} THEN regexp_replace(f.label, '_[0-9]+$', '')
                        ELSE f.label END AS label,
                   CASE WHEN {_OLD_INSTANCE}
                        THEN CAST(regexp_extract(f.label, '_([0-9]+)$', 1) AS BIGINT)
                        ELSE f.instance END AS instance,
                   coalesce(f.mean_value, {_measured("mean_value")}) AS mean_value,
                   coalesce(f.diameter_mm, {_measured("diameter_mm")}) AS diameter_mm,
                   coalesce(f.elongation, {_measured("elongation")}) AS elongation)
            FROM {f} f
            LEFT JOIN (SELECT * FROM {series} QUALIFY row_number() OVER
                       (PARTITION BY SeriesInstanceUID ORDER BY n_instances DESC NULLS LAST) = 1) s
                   ON s.SeriesInstanceUID = f.SeriesInstanceUID
            LEFT JOIN (SELECT * FROM {studies} QUALIFY row_number() OVER
                       (PARTITION BY StudyInstanceUID ORDER BY n_series DESC NULLS LAST) = 1) st
                   ON st.StudyInstanceUID = coalesce(f.StudyInstanceUID, s.StudyInstanceUID)
        ), edges AS (
            SELECT a.finding_key AS k, b.finding_key AS other
            FROM n a JOIN n b
              ON a.FrameOfReferenceUID = b.FrameOfReferenceUID
             AND a.AcquisitionNumber IS NOT DISTINCT FROM b.AcquisitionNumber
             AND a.StudyInstanceUID IS NOT DISTINCT FROM b.StudyInstanceUID
             AND a.model = b.model AND a.label = b.label
             AND a.finding_key <> b.finding_key
             -- never two findings of one mask (two nodules of one volume)
             AND NOT (a.tensor_key = b.tensor_key AND a.model_version = b.model_version
                      AND a.weights_sha256 = b.weights_sha256)
            WHERE len(a.centre_mm) = 3 AND len(b.centre_mm) = 3
              AND len(a.size_mm) = 3 AND len(b.size_mm) = 3
              AND ({within})
            UNION ALL SELECT finding_key, finding_key FROM n
        ), hop AS (
            SELECT k, min(other) AS m FROM edges GROUP BY k
        ), hop2 AS (
            SELECT e.k, min(h.m) AS m FROM edges e JOIN hop h ON h.k = e.other GROUP BY e.k
        )
        SELECT n.*, 'L' || substr(sha256(coalesce(h.m, n.finding_key)), 1, 16) AS lesion_id
        FROM n LEFT JOIN hop2 h ON h.k = n.finding_key
    )"""


def _keyed_view_sql(
    lake: LakePaths, name: str, versions: Mapping[str, int] | None, columns: Sequence[str]
) -> str:
    """Table ``name`` (rows about a finding) with the finding's ``columns`` of the
    ``findings`` view: those the table has are filled where NULL (rows written before they
    existed), the others added."""
    own = set(schema_for(name).names)
    allowed = [*COHORT_KEYS, "label", "instance", "lesion_id"]
    filled = ", ".join(
        f"coalesce(r.{c}, k.{c}) AS {c}"
        for c in (identifier(c, allowed) for c in columns)
        if c in own
    )
    extra = ", ".join(f"k.{identifier(c, allowed)}" for c in columns if c not in own)
    return f"""(
        SELECT r.*{f" REPLACE ({filled})" if filled else ""}, {extra}
        FROM {version_sql(lake, name, versions)} r
        LEFT JOIN (SELECT * FROM {findings_view_sql(lake, versions)} QUALIFY row_number()
                   OVER (PARTITION BY finding_key ORDER BY inferred_at DESC NULLS LAST) = 1) k
               ON k.finding_key = r.finding_key
    )"""


def research_view_sql(lake: LakePaths, name: str, versions: Mapping[str, int] | None = None) -> str:
    """The relation of the research view ``name`` of ``pacsflow sql``: the table as it is
    (:func:`version_sql`), except ``findings`` (:func:`findings_view_sql`), ``reviews`` and
    ``corrections`` (with their finding's cohort keys, label, instance and lesion) and
    ``studies`` (``patient_age_years`` also for rows written before it)."""
    if name == "findings":
        return findings_view_sql(lake, versions)
    if name in ("reviews", "corrections"):
        return _keyed_view_sql(
            lake, name, versions, [*COHORT_KEYS, "label", "instance", "lesion_id"]
        )
    if name == "studies":
        age = patient_age_years_sql("PatientAge")
        return (
            f"(SELECT * REPLACE (coalesce(patient_age_years, {age}) AS patient_age_years) "
            f"FROM {version_sql(lake, name, versions)})"
        )
    return version_sql(lake, name, versions)


def latest_sql(lake: LakePaths, name: str, key: str, order: str, where: str = "true") -> str:
    """The latest row of each ``key`` of table ``name`` by ``order``.

    ``key`` and ``order`` are column lists of the table's schema (checked); ``where`` is a
    code-written condition whose values are ``$name`` parameters, never spliced values.
    """
    return (
        f"(SELECT * FROM {scan_sql(lake, name)} WHERE {where} "
        f"QUALIFY row_number() OVER (PARTITION BY {_columns(name, key)} "
        f"ORDER BY {_columns(name, order)} DESC) = 1)"
    )


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


def create_scan_view(lake: LakePaths, view: str, allowed: Iterable[str]) -> str:
    """``CREATE VIEW <view>`` over a lake table (``view`` one of ``allowed``)."""
    return create_view(view, allowed, scan_sql(lake, view))


def create_view(view: str, allowed: Iterable[str], relation: str) -> str:
    """``CREATE VIEW <view>`` over ``relation`` (one of this module's relations; ``view`` one
    of ``allowed``)."""
    return f"CREATE VIEW {identifier(view, allowed)} AS SELECT * FROM {relation}"


def create_lineage_table(lake: LakePaths) -> str:
    """``CREATE TABLE lineage`` of :func:`lineage_sql` (materialised: it reads the vault)."""
    return f"CREATE TABLE lineage AS SELECT * FROM {lineage_sql(lake)}"


# ---------------------------------------------------------------------------------------------
# lake-wide views: object states, verdicts, counts
# ---------------------------------------------------------------------------------------------


def _index_event(lake: LakePaths, index_latest: str) -> str:
    return f"""SELECT object_key, source, location, state, NULL AS reason, crawled_at AS event_at
        FROM {scan_sql(lake, "index")}"""


def _quarantine_event(lake: LakePaths, index_latest: str) -> str:
    return f"""SELECT object_key, source, location, 'quarantined', reason, quarantined_at
        FROM {scan_sql(lake, "quarantine")}"""


def _deid_event(lake: LakePaths, index_latest: str) -> str:
    return f"""SELECT v.object_key, i.source, i.location, 'deidentified', NULL, v.deidentified_at
        FROM {scan_sql(lake, "vault")} v
        JOIN {index_latest} i ON i.object_key = v.object_key AND i.fingerprint = v.fingerprint"""


def _volume_event(state: str, offset: int, tensor_keys: Callable[[LakePaths], str] | None) -> Any:
    """The event of the objects of the stored volumes (``tensor_keys``: only those volumes),
    ``offset`` microseconds after their de-identification (the stages' order)."""

    def event(lake: LakePaths, index_latest: str) -> str:
        which = f"AND t.tensor_key IN ({tensor_keys(lake)})" if tensor_keys else ""
        return f"""SELECT v.object_key, i.source, i.location, '{state}', NULL,
                   v.deidentified_at + INTERVAL {offset} MICROSECOND
            FROM (SELECT DISTINCT unnest(t.sop_instance_uids) AS sop
                  FROM {scan_sql(lake, "tensors")} t WHERE t.status = 'ok' {which}) e
            JOIN {scan_sql(lake, "vault")} v ON v.sop_pseudonym = e.sop
            JOIN {index_latest} i
              ON i.object_key = v.object_key AND i.fingerprint = v.fingerprint"""

    return event


#: The events of an object, each the SELECT of (object_key, source, location, state, reason,
#: event_at) it adds to :func:`object_states`. Each stage declares the events it produces
#: (:attr:`pipeline.run.Stage.events`); ``pacsflow status`` unions the pipeline's.
OBJECT_EVENTS: Final[dict[str, Callable[[LakePaths, str], str]]] = {
    "index": _index_event,  # indexed | gone
    "quarantine": _quarantine_event,
    "deidentified": _deid_event,
    "tensorised": _volume_event("tensorised", 1, None),
    "inferred": _volume_event(
        "inferred", 2, lambda lake: f"SELECT tensor_key FROM {scan_sql(lake, 'findings')}"
    ),
    "written_back": _volume_event(
        "written_back",
        3,
        lambda lake: (
            f"SELECT tensor_key FROM {scan_sql(lake, 'outbox')} "
            "WHERE kind = 'SEG' AND status = 'confirmed'"
        ),
    ),
}


def object_states(lake: LakePaths, events: Iterable[str] | None = None) -> Query:
    """One row per object ever seen with its latest state (see ``duck.object_states``): the
    latest of the ``events`` (names of :data:`OBJECT_EVENTS`; None: all of them)."""
    names = list(OBJECT_EVENTS if events is None else dict.fromkeys(events))
    index_latest = latest_sql(lake, "index", "object_key", "crawled_at")
    union = "\n            UNION ALL\n".join(OBJECT_EVENTS[n](lake, index_latest) for n in names)
    return Query(f"""
        SELECT object_key, source, location, state, reason FROM (
            {union}
        ) QUALIFY row_number() OVER (PARTITION BY object_key ORDER BY event_at DESC) = 1
        ORDER BY source, location
    """)


def volume_verdicts(lake: LakePaths, tensors: str | None = None) -> Query:
    """The tensors stage's verdict per series: ``(SeriesInstanceUID, min status, min reason)``
    over ``tensors`` (a :func:`scan_sql` of the table already taken: one version), or the
    latest version."""
    return Query(
        f"""SELECT SeriesInstanceUID, min(status), min(reason)
            FROM {tensors or scan_sql(lake, "tensors")} GROUP BY 1"""
    )


def count_rows(
    lake: LakePaths, table: str, column: str | None = None, status: str | None = None
) -> Query:
    """Rows of a lake table (with ``column`` set, and ``status`` equal to a value)."""
    conds = ["true"]
    if column is not None:
        conds.append(f"{identifier(column, schema_for(table).names)} IS NOT NULL")
    params = {}
    if status is not None:
        conds.append("status = $status")
        params = {"status": status}
    return Query(
        f"SELECT count(*) FROM {scan_sql(lake, table)} WHERE {' AND '.join(conds)}", params
    )


def writeback_status(lake: LakePaths) -> Query:
    """Per destination and latest delivery status, the number of SEG/SR objects."""
    return Query(
        f"""SELECT dest, status, count(*) AS n
            FROM {latest_sql(lake, "outbox", "result_uid, dest", "updated_at")}
            GROUP BY 1, 2 ORDER BY 1, 2"""
    )


def review_catalog(lake: LakePaths) -> Query:
    """The findings joined with their volume, series and study (the review catalog)."""
    return Query(f"""
        SELECT f.finding_key, f.SeriesInstanceUID, f.tensor_key, f.tensor_checksum,
               f.volume_index, f.model, f.model_version, f.weights_sha256,
               {finding_name_sql("f")} AS label, f.label_value, f.score, f.voxel_count,
               f.volume_ml, f.mean_hu, f.bbox,
               f.measurements, f.mask_path, f.mask_checksum, f.device, f.run_id, f.inferred_at,
               f.box_class, f.box_mm, f.centre_mm, f.size_mm, f.task, f.predicted,
               t.path AS tensor_path, t.shape, t.spacing, t.rescaled,
               s.Modality, s.Manufacturer, s.ManufacturerModelName, s.BodyPartExamined,
               s.SeriesDate, st.StudyDate, s.StudyInstanceUID,
               f.model_entry, s.patient_token, s.SeriesNumber
        FROM {scan_sql(lake, "findings")} f
        LEFT JOIN (SELECT * FROM {scan_sql(lake, "tensors")} WHERE status = 'ok') t
               ON t.tensor_key = f.tensor_key
        LEFT JOIN (SELECT * FROM {scan_sql(lake, "series")} QUALIFY row_number() OVER
                   (PARTITION BY SeriesInstanceUID ORDER BY n_instances DESC NULLS LAST) = 1) s
               ON s.SeriesInstanceUID = f.SeriesInstanceUID
        LEFT JOIN (SELECT * FROM {scan_sql(lake, "studies")} QUALIFY row_number() OVER
                   (PARTITION BY StudyInstanceUID ORDER BY n_series DESC NULLS LAST) = 1) st
               ON st.StudyInstanceUID = s.StudyInstanceUID
        QUALIFY row_number() OVER (PARTITION BY f.finding_key ORDER BY f.inferred_at DESC) = 1
        ORDER BY f.finding_key
    """)


def review_descriptions(lake: LakePaths) -> Query:
    """Per series: its and its study's description, from the de-identified header of its first
    instance (null where the de-identification removed them)."""
    return Query(f"""
        SELECT SeriesInstanceUID,
               arg_min(json_extract_string(header_json, '$."0008103E".Value[0]'),
                       InstanceNumber) AS SeriesDescription,
               arg_min(json_extract_string(header_json, '$."00081030".Value[0]'),
                       InstanceNumber) AS StudyDescription
        FROM {scan_sql(lake, "instances")}
        GROUP BY SeriesInstanceUID
    """)


# ---------------------------------------------------------------------------------------------
# audit
# ---------------------------------------------------------------------------------------------

#: Lake tables whose rows name a series, and the column that names it.
_SERIES_COLUMN: Final = {
    "vault": "series_pseudonym",
    "findings": "SeriesInstanceUID",
    "outbox": "source_series_pseudonym",
}


def subject_series(
    lake: LakePaths, *, patient: str | None, study: str | None, series: str | None
) -> Query:
    """The (patient, study, series) pseudonyms of research ``series`` matching the given ones."""
    conds, params = [], {}
    for col, name, value in (
        ("patient_token", "patient", patient),
        ("StudyInstanceUID", "study", study),
        ("SeriesInstanceUID", "series", series),
    ):
        if value:
            conds.append(f"{col} = ${name}")
            params[name] = value
    return Query(
        "SELECT DISTINCT patient_token, StudyInstanceUID, SeriesInstanceUID FROM "
        f"{scan_sql(lake, 'series')} WHERE {' AND '.join(conds) or 'true'}",
        params,
    )


def run_ids_about(lake: LakePaths, table: str, series: Sequence[str]) -> Query:
    """The runs that wrote rows of ``table`` (vault, findings, outbox) about ``series``."""
    if table not in _SERIES_COLUMN:
        raise ValueError(f"{table!r} is not one of {', '.join(_SERIES_COLUMN)}")
    col = identifier(_SERIES_COLUMN[table], _SERIES_COLUMN.values())
    return Query(
        f"SELECT DISTINCT run_id FROM {scan_sql(lake, table)} "
        f"WHERE {col} IN (SELECT unnest($series::VARCHAR[]))",
        {"series": list(series)},
    )


# ---------------------------------------------------------------------------------------------
# crawl
# ---------------------------------------------------------------------------------------------


def current_index(lake: LakePaths) -> Query:
    """The latest row of each object of the index."""
    return Query(
        f"SELECT * FROM {latest_sql(lake, 'index', 'object_key', 'crawled_at')} ORDER BY object_key"
    )


#: Index columns of a ``gone`` row.
_GONE_COLUMNS: Final = (
    "object_key, source, location, unit_key, PatientID, StudyInstanceUID, "
    "SeriesInstanceUID, SOPInstanceUID, SOPClassUID, Modality, TransferSyntaxUID, "
    "InstanceNumber, has_pixel_data, size_bytes, mtime_ns, fingerprint"
)


@dataclass(frozen=True)
class CrawlQueries:
    """A crawl's comparison of its listing with the lake, as the lake stood when it started.

    Build with :meth:`at_start` before the crawl writes anything; every query binds the
    source (``$src``).
    """

    source: str
    listing: str
    units_latest: str
    index_latest: str
    quarantine_latest: str
    incremental: bool

    @classmethod
    def at_start(
        cls, lake: LakePaths, listing: Path, *, source: str, incremental: bool
    ) -> CrawlQueries:
        """The queries of a crawl of ``source`` whose listing parts lie in ``listing``."""
        units_latest = latest_sql(lake, "units", "unit_key", "crawled_at", "source = $src")
        if not incremental:
            units_latest = f"(SELECT * FROM {units_latest} WHERE false)"
        return cls(
            source=source,
            listing=f"read_parquet({parquet_glob(listing, '*.parquet')})",
            units_latest=units_latest,
            index_latest=latest_sql(lake, "index", "object_key", "crawled_at", "source = $src"),
            quarantine_latest=latest_sql(
                lake, "quarantine", "object_key", "quarantined_at", "source = $src"
            ),
            incremental=incremental,
        )

    def unchanged(self) -> Query:
        """(units, objects) listed with the watermark they were read at."""
        return Query(
            f"SELECT count(*), coalesce(sum(u.n_objects), 0) FROM {self.listing} l "
            f"JOIN {self.units_latest} u ON l.unit_key = u.unit_key "
            "AND u.state = 'read' AND u.watermark = l.watermark",
            {"src": self.source},
        )

    def diff(self) -> Query:
        """The listed units to read, with the objects the index knows in each."""
        return Query(
            f"""
            SELECT l.seq, l.unit_key, l.watermark, l.size_bytes, l.mtime_ns,
                   i.object_key, i.fingerprint
            FROM {self.listing} l
            LEFT JOIN {self.units_latest} u
              ON l.unit_key = u.unit_key AND u.state = 'read' AND u.watermark = l.watermark
            LEFT JOIN (SELECT unit_key, object_key, fingerprint FROM {self.index_latest}
                       WHERE state <> 'gone' AND $incremental) i
              ON i.unit_key = l.unit_key
            WHERE u.unit_key IS NULL
            ORDER BY l.seq
            """,
            {"src": self.source, "incremental": self.incremental},
        )

    def gone_units(self) -> Query:
        """Units read before and no longer listed."""
        return Query(
            f"""
            SELECT u.unit_key FROM {self.units_latest} u
            WHERE u.state = 'read' AND u.unit_key NOT IN (SELECT unit_key FROM {self.listing})
            """,
            {"src": self.source},
        )

    def gone_objects(self, lake: LakePaths, run_id: str, gone_units: list[str]) -> Query:
        """Objects of the gone units, and objects no longer in a unit this run read again
        (the units this run read are scanned now, after the crawl wrote them)."""
        read_now = (
            f"(SELECT unit_key, unnest(object_keys) AS object_key FROM {scan_sql(lake, 'units')} "
            "WHERE source = $src AND run_id = $run AND state = 'read')"
        )
        cols = _GONE_COLUMNS
        return Query(
            f"""
            SELECT {cols} FROM (
                SELECT {cols}, crawled_at AS event_at FROM {self.index_latest}
                WHERE state <> 'gone'
                UNION ALL
                SELECT object_key, source, location, unit_key, NULL, NULL, NULL, NULL, NULL,
                       NULL, NULL, NULL, NULL, size_bytes, mtime_ns, NULL, quarantined_at
                FROM {self.quarantine_latest}
            ) o
            WHERE (o.unit_key IN (SELECT unnest($gone::VARCHAR[]))
                   OR (o.unit_key IN (SELECT unit_key FROM {read_now})
                       AND o.object_key NOT IN (SELECT object_key FROM {read_now})))
              AND o.object_key NOT IN (
                  SELECT object_key FROM {self.index_latest} WHERE state = 'gone')
            QUALIFY row_number() OVER (PARTITION BY object_key ORDER BY event_at DESC) = 1
            """,
            {"src": self.source, "run": run_id, "gone": gone_units},
        )


# ---------------------------------------------------------------------------------------------
# deid
# ---------------------------------------------------------------------------------------------

#: The registered relation of pacsflow's own result UIDs (sealed like the index's when the
#: lake is encrypted at rest), one column ``uid``.
OWN_UIDS: Final = "pf_own_uids"


def _deid_new(lake: LakePaths) -> str:
    """Indexed objects not yet de-identified (nor quarantined by deid), with ``own``: true for
    pacsflow's own write-back results (their SOP Instance UID is in :data:`OWN_UIDS`)."""
    index_latest = latest_sql(lake, "index", "object_key", "crawled_at")
    q_deid = f"(SELECT object_key FROM {scan_sql(lake, 'quarantine')} WHERE stage = 'deid')"
    return f"""
        SELECT i.object_key, i.source, i.location, i.unit_key, i.PatientID, i.fingerprint,
               i.size_bytes, i.mtime_ns,
               i.SOPInstanceUID IN (SELECT uid FROM {OWN_UIDS}) AS own
        FROM {index_latest} i
        LEFT JOIN {scan_sql(lake, "vault")} v
          ON v.object_key = i.object_key AND v.fingerprint IS NOT DISTINCT FROM i.fingerprint
        WHERE i.state = 'indexed' AND v.object_key IS NULL
          AND i.object_key NOT IN {q_deid}
    """


def deid_own_results(lake: LakePaths) -> Query:
    """How many new indexed objects are pacsflow's own results."""
    return Query(f"SELECT count(*) FROM ({_deid_new(lake)}) WHERE own")


def deid_new_objects(lake: LakePaths) -> Query:
    """The new indexed objects to de-identify (not pacsflow's own results), by object key."""
    return Query(f"""
        SELECT * EXCLUDE (own) FROM ({_deid_new(lake)})
        WHERE own IS NOT TRUE
        ORDER BY object_key
    """)


def deid_export_todo(lake: LakePaths) -> Query:
    """Indexed objects de-identified before, with their pseudonyms (to check the export)."""
    index_latest = latest_sql(lake, "index", "object_key", "crawled_at")
    return Query(f"""
        SELECT i.object_key, i.source, i.location, i.unit_key, i.PatientID, i.fingerprint,
               i.size_bytes, i.mtime_ns,
               v.study_pseudonym, v.series_pseudonym, v.sop_pseudonym
        FROM {index_latest} i
        JOIN {scan_sql(lake, "vault")} v
          ON v.object_key = i.object_key AND v.fingerprint IS NOT DISTINCT FROM i.fingerprint
        WHERE i.state = 'indexed'
        QUALIFY row_number() OVER (PARTITION BY i.object_key ORDER BY v.deidentified_at DESC) = 1
        ORDER BY i.object_key
    """)


def deid_series_instances(lake: LakePaths, version: int | None = None) -> Query:
    """The ``instances`` columns a ``series`` row is built from, in series order (of the
    table's ``version``: None, the latest)."""
    cols = (
        "SeriesInstanceUID, StudyInstanceUID, patient_token, Modality, BodyPartExamined, "
        "Manufacturer, ManufacturerModelName, SeriesNumber, SeriesDate, ContentDate, Rows, "
        "Columns, ImageOrientationPatient, ImagePositionPatient, PixelSpacing, SliceThickness, "
        "KVP, MagneticFieldStrength, NumberOfFrames, SOPClassUID"
    )
    return Query(
        f"SELECT {cols} FROM {scan_sql(lake, 'instances', version)} "
        "ORDER BY SeriesInstanceUID, SOPInstanceUID"
    )


def deid_studies(lake: LakePaths, version: int | None = None) -> Query:
    """The ``studies`` aggregate of ``instances`` (at ``version``)."""
    return Query(
        f"""SELECT *, {patient_age_years_sql("PatientAge")} AS patient_age_years FROM (
            SELECT StudyInstanceUID, any_value(patient_token) AS patient_token,
                   min(coalesce(StudyDate, ContentDate)) AS StudyDate,
                   any_value(PatientAge) AS PatientAge,
                   list_sort(list_distinct(list(Modality))) AS ModalitiesInStudy,
                   count(DISTINCT SeriesInstanceUID) AS n_series, count(*) AS n_instances
            FROM {scan_sql(lake, "instances", version)}
            GROUP BY StudyInstanceUID) ORDER BY StudyInstanceUID"""
    )


def deid_patients(lake: LakePaths, version: int | None = None) -> Query:
    """The ``patients`` aggregate of ``instances`` (at ``version``)."""
    return Query(
        f"""SELECT patient_token, any_value(PatientSex) AS PatientSex,
                   count(DISTINCT StudyInstanceUID) AS n_studies,
                   count(DISTINCT SeriesInstanceUID) AS n_series, count(*) AS n_instances
            FROM {scan_sql(lake, "instances", version)}
            GROUP BY patient_token ORDER BY patient_token"""
    )


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------


def _non_volume_sql() -> str:
    """:data:`~pipeline.dicom.sopclass.NON_VOLUME_SOP_CLASSES` as a SQL list (constant UIDs;
    imported here, not at the top: ``pipeline.dicom`` loads pydicom, which light readers such
    as ``pacsflow status`` do without)."""
    from pipeline.dicom.sopclass import NON_VOLUME_SOP_CLASSES

    return ", ".join(f"'{uid}'" for uid in sorted(NON_VOLUME_SOP_CLASSES))


def tensors_todo(lake: LakePaths, preprocessing_hash: str, rules: int = 1) -> Query:
    """Series without a tensors row for this preprocessing at their de-identification
    version, with their objects. A refusal counts only when made under the volume ``rules``
    in force (its key ends ``-refused-r<rules>``): a series refused by older rules is tried
    again when the rules change (e.g. tilted CT, radiographs, 4D MR became tensors)."""
    index_latest = latest_sql(lake, "index", "object_key", "crawled_at")
    vault_latest = latest_sql(lake, "vault", "object_key", "deidentified_at")
    return Query(
        f"""
        WITH s AS (
            SELECT v.series_pseudonym, max(v.deid_version) AS deid_version,
                   list(struct_pack(object_key := i.object_key, source := i.source,
                                    location := i.location, unit_key := i.unit_key,
                                    size_bytes := i.size_bytes, mtime_ns := i.mtime_ns,
                                    sop_pseudonym := v.sop_pseudonym,
                                    pixel_redactions := v.pixel_redactions)
                        ORDER BY v.sop_pseudonym) AS objects
            FROM {vault_latest} v
            JOIN {index_latest} i
              ON i.object_key = v.object_key
             AND i.fingerprint IS NOT DISTINCT FROM v.fingerprint
            WHERE i.state = 'indexed'
              -- volume candidates only (issue #21): no SR, PR, KO, SEG, RT*, documents
              AND coalesce(i.has_pixel_data, true)
              AND coalesce(i.SOPClassUID, '') NOT IN ({_non_volume_sql()})
            GROUP BY v.series_pseudonym
        )
        SELECT s.* FROM s
        WHERE NOT EXISTS (
            SELECT 1 FROM {scan_sql(lake, "tensors")} t
            WHERE t.SeriesInstanceUID = s.series_pseudonym
              AND t.preprocessing_hash = $h AND t.deid_version = s.deid_version
              AND (t.status <> 'refused' OR ends_with(t.tensor_key, $refused))
        )
        ORDER BY s.series_pseudonym
        """,
        {"h": preprocessing_hash, "refused": f"-refused-r{rules}"},
    )


def cohort_base(
    lake: LakePaths,
    series_columns: Sequence[str],
    preprocessing_hash: str | None,
    versions: Mapping[str, int] | None = None,
) -> Query:
    """The ``ok`` tensors rows of each series' latest de-identification version, with the
    ``series_columns`` of their series (and of one preprocessing when given), at the table
    ``versions`` a run recorded (None: the latest)."""
    allowed = schema_for("series").names
    cols = ", ".join(f"s.{identifier(c, allowed)}" for c in series_columns)
    prep = "AND t.preprocessing_hash = $prep" if preprocessing_hash is not None else ""
    return Query(
        f"""
        SELECT t.*, {cols}
        FROM {version_sql(lake, "tensors", versions)} t
        LEFT JOIN {version_sql(lake, "series", versions)} s
               ON s.SeriesInstanceUID = t.SeriesInstanceUID
        WHERE t.status = 'ok' {prep}
        QUALIFY t.deid_version = max(t.deid_version) OVER (PARTITION BY t.SeriesInstanceUID)
        """,
        {"prep": preprocessing_hash} if preprocessing_hash is not None else {},
    )


def cohort_join(body: str, key: str, columns: Sequence[str], cohort_columns: Sequence[str]) -> str:
    """A user's cohort query ``body`` (its result ``columns``) joined to the ``cohort`` view on
    ``key``, keeping the query's columns and order and adding the cohort's other columns."""
    k = identifier(key, columns)
    extra = ", ".join(
        f"c.{identifier(c, cohort_columns)}" for c in cohort_columns if c not in columns
    )
    query = f"""
        SELECT q.*{", " + extra if extra else ""}
        FROM (SELECT *, row_number() OVER () AS __order FROM ({body})) q
        JOIN cohort c ON c.{k} = q.{k}
        ORDER BY q.__order, c.volume_index
    """
    return f"SELECT * EXCLUDE (__order) FROM ({query})"


# ---------------------------------------------------------------------------------------------
# infer and write-back
# ---------------------------------------------------------------------------------------------


def infer_todo(
    lake: LakePaths,
    *,
    entry: str,
    model: str,
    applies_to: str,
    preprocessing_hash: str,
    version: str,
    weights_sha256: str,
    tensor_kinds: Sequence[str] = ("volume",),
) -> Query:
    """Stored volumes of the series ``applies_to`` (the filter of registry entry ``entry``)
    selects that lack the findings of this model identity; ``tensor_kinds`` (``volume``,
    ``planar``, ``cine``) says which tensors the model takes (a 2D classifier: ``planar``).

    Raises
    ------
    ConfigError
        When ``applies_to`` is not one filter expression.
    """
    where = filter_expression(applies_to, what=f"model {entry!r}: applies_to")
    return Query(
        f"""
        WITH s AS (
            SELECT SeriesInstanceUID, Modality, StudyInstanceUID, patient_token, Manufacturer
            FROM {scan_sql(lake, "series")}
            WHERE {where}
        ), {
            _COHORT_CTES.format(
                studies=scan_sql(lake, "studies"), instances=scan_sql(lake, "instances")
            )
        }
        SELECT t.tensor_key, t.SeriesInstanceUID, t.path, t.shape, t.spacing, t.affine,
               t.checksum, t.rescaled, t.volume_index, t.preprocessing, t.sop_instance_uids,
               t.frame_numbers, s.Modality, s.StudyInstanceUID, {_COHORT_COLUMNS}
        FROM {scan_sql(lake, "tensors")} t
        JOIN s ON s.SeriesInstanceUID = t.SeriesInstanceUID
        LEFT JOIN st ON st.StudyInstanceUID = s.StudyInstanceUID
        LEFT JOIN fr ON fr.SeriesInstanceUID = s.SeriesInstanceUID
        WHERE t.status = 'ok' AND t.preprocessing_hash = $h
          -- the kinds of tensor the model takes: volumes for a volume model, 2D images
          -- (issue #21) for a 2D classifier
          AND list_contains($kinds, coalesce(t.tensor_kind, 'volume'))
          AND NOT EXISTS (
            SELECT 1 FROM {scan_sql(lake, "findings")} f
            WHERE f.tensor_key = t.tensor_key AND f.model = $m
              AND f.model_version = $v AND f.weights_sha256 = $w
          )
        ORDER BY t.tensor_key
        """,
        {
            "h": preprocessing_hash,
            "m": model,
            "v": version,
            "w": weights_sha256,
            "kinds": list(tensor_kinds),
        },
    )


def infer_channel_series(lake: LakePaths, *, applies_to: str, channel: str, where: str) -> Query:
    """The stored volumes of the series (of ``applies_to``) a multi-sequence model's input
    channel ``channel`` takes: ``where`` runs over the ``series`` table joined with its first
    instance's sequence attributes (and ``SeriesDescription`` from the de-identified header,
    where kept). Bound by the caller: ``$h``, the preprocessing hash.

    Raises
    ------
    ConfigError
        When ``applies_to`` or ``where`` is not one filter expression.
    """
    scope = filter_expression(applies_to, what=f"input {channel!r}: applies_to")
    match = filter_expression(where, what=f"input {channel!r}: where")
    return Query(
        f"""
        WITH i AS (
            SELECT SeriesInstanceUID,
                   arg_min(RepetitionTime, InstanceNumber) AS RepetitionTime,
                   arg_min(EchoTime, InstanceNumber) AS EchoTime,
                   arg_min(InversionTime, InstanceNumber) AS InversionTime,
                   arg_min(FlipAngle, InstanceNumber) AS FlipAngle,
                   arg_min(ContrastBolusAgent, InstanceNumber) AS ContrastBolusAgent,
                   arg_min(ScanningSequence, InstanceNumber) AS ScanningSequence,
                   arg_min(json_extract_string(header_json, '$."0008103E".Value[0]'),
                           InstanceNumber) AS SeriesDescription
            FROM {scan_sql(lake, "instances")}
            GROUP BY SeriesInstanceUID
        ), s AS (
            SELECT * FROM {scan_sql(lake, "series")} JOIN i USING (SeriesInstanceUID)
            WHERE {scope} AND {match}
        ), {
            _COHORT_CTES.format(
                studies=scan_sql(lake, "studies"), instances=scan_sql(lake, "instances")
            )
        }
        SELECT s.StudyInstanceUID, t.tensor_key, t.SeriesInstanceUID, t.path, t.shape,
               t.spacing, t.affine, t.checksum, t.rescaled, t.volume_index, t.preprocessing,
               t.sop_instance_uids, t.frame_numbers, s.Modality, {_COHORT_COLUMNS}
        FROM {scan_sql(lake, "tensors")} t
        JOIN s ON s.SeriesInstanceUID = t.SeriesInstanceUID
        LEFT JOIN st ON st.StudyInstanceUID = s.StudyInstanceUID
        LEFT JOIN fr ON fr.SeriesInstanceUID = s.SeriesInstanceUID
        WHERE t.status = 'ok' AND t.preprocessing_hash = $h
          AND coalesce(t.tensor_kind, 'volume') = 'volume'
        ORDER BY s.StudyInstanceUID, t.tensor_key
        """,
    )


def infer_done_tensors(lake: LakePaths) -> Query:
    """The tensors that have findings of one model identity (bound: ``$m``, ``$v``, ``$w``)."""
    return Query(
        f"""
        SELECT DISTINCT tensor_key FROM {scan_sql(lake, "findings")}
        WHERE model = $m AND model_version = $v AND weights_sha256 = $w
        """
    )


def writeback_groups(lake: LakePaths, model: str | None, *, with_entry: bool = True) -> Query:
    """One row per (volume, model identity) with findings (of ``model`` when given), with the
    registry entry that ran (``with_entry``: findings written before that column existed have
    none)."""
    where = "true" if model is None else "f.model = $model"
    entry = "any_value(f.model_entry)" if with_entry else "CAST(NULL AS VARCHAR)"
    return Query(
        f"""
        SELECT f.tensor_key, f.model, f.model_version, f.weights_sha256,
               {entry} AS model_entry,
               any_value(f.SeriesInstanceUID) AS series_pseudonym,
               any_value(f.mask_path) AS mask_path,
               list(struct_pack(label := {finding_name_sql("f")}, value := f.label_value,
                                category := f.category_code, type := f.type_code,
                                volume_ml := f.volume_ml, mean_hu := f.mean_hu,
                                voxels := f.voxel_count, score := f.score,
                                predicted := f.predicted, box_mm := f.box_mm,
                                box_class := f.box_class)
                    ORDER BY f.label_value) AS labels,
               any_value(f.task) AS task,
               any_value(t.sop_instance_uids) AS sops,
               any_value(t.frame_numbers) AS frames,
               any_value(t.preprocessing) AS preprocessing,
               any_value(t.volume_index) AS volume_index,
               any_value(t.shape) AS shape,
               any_value(t.affine) AS affine,
               any_value(t.spacing) AS spacing
        FROM {scan_sql(lake, "findings")} f
        JOIN {scan_sql(lake, "tensors")} t ON t.tensor_key = f.tensor_key
        WHERE {where}
        GROUP BY 1, 2, 3, 4
        ORDER BY 1, 2, 3, 4
        """,
        {"model": model} if model is not None else {},
    )


def writeback_originals(lake: LakePaths, sops: Sequence[str]) -> Query:
    """The vault and index rows of the pseudonymous SOP UIDs ``sops`` (restricted zone)."""
    vault = latest_sql(lake, "vault", "object_key", "deidentified_at")
    index = latest_sql(lake, "index", "object_key", "crawled_at")
    return Query(
        f"""
        SELECT v.sop_pseudonym, v.SOPInstanceUID, v.SeriesInstanceUID, v.StudyInstanceUID,
               v.object_key, i.source, i.location
        FROM {vault} v JOIN {index} i ON i.object_key = v.object_key
        WHERE v.sop_pseudonym IN (SELECT unnest($sops))
        """,
        {"sops": list(sops)},
    )


def writeback_confirmed(lake: LakePaths, dests: list[str]) -> Query:
    """result UID and its latest status at the destination recorded under any of ``dests``
    (one destination's names: see ``pipeline.writeback.stage._dest_aliases``)."""
    latest = latest_sql(
        lake, "outbox", "result_uid", "updated_at", where="list_contains($dests, dest)"
    )
    return Query(f"SELECT result_uid, status FROM {latest}", {"dests": list(dests)})


def status_findings(lake: LakePaths) -> Query:
    """``pacsflow status``: findings per model (rows, volumes with a finding)."""
    return Query(
        f"""SELECT model || '@' || model_version AS model, count(*) AS n,
                   count(DISTINCT tensor_key) AS volumes
            FROM {scan_sql(lake, "findings")} GROUP BY 1 ORDER BY 1"""
    )


def status_reviews(lake: LakePaths) -> Query:
    """``pacsflow status``: reviewer decisions in all, and the latest decision per finding."""
    latest = latest_sql(lake, "reviews", "finding_key", "reviewed_at")
    return Query(
        f"""SELECT decision, count(*) AS n,
                   (SELECT count(*) FROM {scan_sql(lake, "reviews")}) AS decisions
            FROM {latest} GROUP BY 1 ORDER BY 1"""
    )


def latest_decisions(reviews: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The status of each reviewed finding (``reviews`` rows): its latest decision (latest
    ``reviewed_at`` wins; ties broken by ``review_id`` so the answer never depends on file
    order). The review app and the FHIR report status both decide by it."""
    latest: dict[str, dict[str, Any]] = {}
    for row in reviews:
        key = row["finding_key"]
        have = latest.get(key)
        if have is None or (row["reviewed_at"], row["review_id"]) > (
            have["reviewed_at"],
            have["review_id"],
        ):
            latest[key] = dict(row)
    return latest
