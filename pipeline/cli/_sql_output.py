"""How ``pacsflow sql`` writes a result: a readable table, CSV, JSON records or Parquet.

The result stays an Arrow table from DuckDB to the output, so a NULL stays NULL (never NaN)
and an integer stays an integer: DuckDB's ``sum`` of integers is a HUGEINT, which Arrow holds
as ``decimal128(38, 0)``; it is written as an integer (pandas made both of them floats).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

__all__ = ["FORMATS", "TABLE_MAX_ROWS", "SqlFormat", "integral_decimals", "render", "write"]

SqlFormat = Literal["table", "csv", "json", "parquet"]
#: the output formats of ``pacsflow sql --format``
FORMATS: tuple[str, ...] = ("table", "csv", "json", "parquet")
#: rows the ``table`` format prints (the others write every row)
TABLE_MAX_ROWS = 200
NULL = "NULL"


def integral_decimals(table: pa.Table) -> pa.Table:
    """``table`` with its scale-0 decimal columns (DuckDB's HUGEINT sums) as int64 where every
    value fits, so every format writes them as integers."""
    fields = []
    arrays = []
    for field, column in zip(table.schema, table.columns, strict=True):
        typ = field.type
        if pa.types.is_decimal(typ) and typ.scale == 0:
            try:
                column = column.cast(pa.int64())
                field = field.with_type(pa.int64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # larger than int64: stays a decimal, still printed as an integer
        fields.append(field)
        arrays.append(column)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def _plain(value: Any) -> Any:
    """A JSON-able Python value of one Arrow value (dates as ISO 8601, NaN as null)."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cell(value: Any) -> str:
    """One value as the ``table`` format prints it (NULL for null, integers as integers)."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, (decimal.Decimal, dt.date, dt.datetime, dt.time, dt.timedelta, bytes)):
        return str(_plain(value))
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_plain(value))
    return str(value)


def _table_text(table: pa.Table, max_rows: int) -> str:
    names = list(table.column_names)
    rows = table.slice(0, max_rows).to_pylist()
    cells = [[_cell(row[n]) for n in names] for row in rows]
    numeric = [
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
        for t in table.schema.types
    ]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    # a header line, then one line per row (as before: scripts split it on whitespace)
    out = [line(names), *(line(r) for r in cells)]
    more = table.num_rows - len(rows)
    if more > 0:
        out.append(f"... {more} more rows (--format csv|json|parquet --out FILE writes all)")
    return "\n".join(out)


def render(table: pa.Table, fmt: SqlFormat, *, max_rows: int = TABLE_MAX_ROWS) -> str:
    """``table`` as text: ``table`` (aligned columns, NULL as ``NULL``, at most ``max_rows``
    rows), ``csv`` (a header line; NULL as an empty field) or ``json`` (an array of records;
    NULL as null). Parquet is not text: see :func:`write`."""
    table = integral_decimals(table)
    if fmt == "table":
        return _table_text(table, max_rows)
    if fmt == "json":
        return json.dumps([_plain(r) for r in table.to_pylist()], indent=1, ensure_ascii=False)
    if fmt == "csv":
        import csv
        import io

        import pyarrow.csv as pacsv

        nested = [
            i
            for i, t in enumerate(table.schema.types)
            if pa.types.is_nested(t) or pa.types.is_binary(t)
        ]
        for i in nested:  # CSV has no lists: JSON text in the field
            values = [
                None if v is None else json.dumps(_plain(v)) for v in table.column(i).to_pylist()
            ]
            table = table.set_column(i, table.field(i).name, pa.array(values, pa.string()))
        header = io.StringIO()
        csv.writer(header, lineterminator="\n").writerow(table.column_names)
        buf = io.BytesIO()
        opts = pacsv.WriteOptions(include_header=False, quoting_style="needed")
        pacsv.write_csv(table, buf, opts)
        return header.getvalue() + buf.getvalue().decode()
    raise ValueError(f"format {fmt!r} is not text; use write() with a file")


def write(table: pa.Table, fmt: SqlFormat, out: Path) -> None:
    """Write ``table`` to the file ``out`` in ``fmt`` (parquet: a Parquet file)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(integral_decimals(table), out)
        return
    text = render(table, fmt, max_rows=table.num_rows)
    out.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
