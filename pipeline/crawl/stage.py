"""The crawl stage: list a source's units, read the changed ones on Dask, write index rows.

How a crawl runs, with the driver's memory bounded by the batch size, not the archive:

1. the source's units (files, or PACS studies) are streamed to a temporary Parquet listing;
2. DuckDB compares the listing with the lake's incremental state (the ``units`` table: the
   latest watermark of every unit) out of core, and streams back the changed and new units,
   each with the fingerprints of the objects the index already holds for it;
3. those units go to workers in batches of ``compute.partition_size``; a worker fetches each
   unit (headers only), parses every object, skips objects whose fingerprint is unchanged (the
   SOP Instance UID dedup of a changed study), writes its index and quarantine rows, and then its
   ``units`` rows, the commit marker of the batch (all atomic, part files named by run and
   batch, so a retried task replaces rather than duplicates);
4. units that vanished from the source, and objects that vanished from a re-read unit, get an
   index row with state ``gone``.

A crawl killed at any point leaves whole part files only; the rerun skips what was committed,
re-reads the rest, and deduplicates by fingerprint: the current index equals an uninterrupted
crawl's. Every entry seen ends as exactly one of: indexed, quarantined, unchanged, or skipped
by the listing with a reason (a folder's links, temporary files, FIFOs...: see
:class:`~pipeline.enums.SkipReason`), counted per reason in ``counts.extra``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.compute import map_bounded, set_total
from pipeline.config import LimitsConfig, PipelineConfig
from pipeline.connectors import FolderSource, Skipped, Source, Unit
from pipeline.crawl.core import parse_raw
from pipeline.enums import ObjectState, Stage
from pipeline.errors import InputError
from pipeline.lake import LakePaths, StageCounts, read_table, schema_for, write_partition
from pipeline.lake.crypto import Sealer
from pipeline.lake.duck import (
    arrow_reader,
    arrow_table,
    connect,
    object_states,
)
from pipeline.lake.queries import CrawlQueries
from pipeline.lake.queries import current_index as current_index_query

logger = logging.getLogger(__name__)

__all__ = [
    "CrawlResult",
    "crawl_batch",
    "current_index",
    "object_key",
    "object_states",
    "run",
    "skipped_text",
]

Progress = Callable[[int], None]
_LISTING_CHUNK = 50_000


def object_key(source_id: str, location: str) -> str:
    """Stable key of an object: SHA-256 of its source id and location (no PHI in it)."""
    return hashlib.sha256(f"{source_id}\x00{location}".encode()).hexdigest()


def skipped_text(skipped: Mapping[str, int]) -> str:
    """`` (reason n, ...)`` for a summary line; empty when nothing was skipped."""
    if not skipped:
        return ""
    return " (" + ", ".join(f"{reason} {n}" for reason, n in skipped.items()) + ")"


@dataclass(frozen=True)
class CrawlResult:
    """What one crawl did, in numbers (``counts.extra`` holds gone and unit counts)."""

    run_id: str
    counts: StageCounts


# --------------------------------------------------------------------------------------------
# DuckDB over the lake (out of core)
# --------------------------------------------------------------------------------------------


def current_index(lake: LakePaths) -> pa.Table:
    """The index as it stands now: the latest row of each object (older rows are history)."""
    if not any(lake.table("index").glob("*.parquet")):
        return read_table(lake, "index")
    import duckdb

    con = duckdb.connect()
    try:
        q = current_index_query(lake)
        table = arrow_table(con, q.sql, q.params)
    finally:
        con.close()
    sealer = lake.sealer()
    table = sealer.open_table("index", table) if sealer is not None else table
    return table.cast(schema_for("index"))


# --------------------------------------------------------------------------------------------
# the worker side
# --------------------------------------------------------------------------------------------


def crawl_batch(
    source: Source,
    units: list[Unit],
    known: dict[str, dict[str, str]],
    *,
    lake: LakePaths,
    run_id: str,
    part: str,
    on_invalid: str = "quarantine",
    limits: LimitsConfig | None = None,
) -> dict[str, int]:
    """Read a batch of units and write its index, quarantine and units part files.

    Runs on a Dask worker (or in-process). ``known`` maps a unit key to the
    ``object_key -> fingerprint`` of the objects the index already holds for it; an object
    read again with the same fingerprint is counted unchanged and writes no row. The units
    rows are written last: they commit the batch.

    Returns
    -------
    dict
        ``indexed``, ``quarantined``, ``unchanged`` and ``units`` counts, and
        ``skipped:<reason>`` for members of packages passed over (links, duplicates).
    """
    now = datetime.now(UTC)
    kind = source.kind.value
    index_rows: list[dict[str, Any]] = []
    quarantine_rows: list[dict[str, Any]] = []
    unit_rows: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    unchanged = 0
    for unit in units:
        previous = known.get(unit.key, {})
        keys: list[str] = []
        n_skipped = 0
        for raw in source.read_unit(unit):
            if raw.skip is not None:  # a package's member passed over (a link, a duplicate)
                skipped[raw.skip.value] = skipped.get(raw.skip.value, 0) + 1
                n_skipped += 1
                continue
            key = object_key(source.source_id, raw.location)
            keys.append(key)
            try:
                record = parse_raw(raw, limits)
            except InputError as exc:
                if on_invalid == "raise":
                    raise
                quarantine_rows.append(
                    {
                        "object_key": key,
                        "source": source.source_id,
                        "location": raw.location,
                        "unit_key": unit.key,
                        "stage": Stage.CRAWL.value,
                        "reason": exc.reason.value,
                        "error_class": type(exc).__name__,
                        "message": str(exc),
                        "size_bytes": raw.size_bytes,
                        "mtime_ns": raw.mtime_ns,
                        "run_id": run_id,
                        "quarantined_at": now,
                    }
                )
                logger.debug("quarantined %s: %s", raw.location, exc.reason.value)
                continue
            if previous.get(key) == record.fingerprint:
                unchanged += 1
                continue
            index_rows.append(
                {
                    "object_key": key,
                    "source": source.source_id,
                    "source_kind": kind,
                    "location": raw.location,
                    "unit_key": unit.key,
                    **asdict(record),
                    "size_bytes": raw.size_bytes,
                    "mtime_ns": raw.mtime_ns,
                    "crawl_run": run_id,
                    "state": ObjectState.INDEXED.value,
                    "crawled_at": now,
                }
            )
        unit_rows.append(
            {
                "source": source.source_id,
                "unit_key": unit.key,
                "watermark": unit.watermark,
                # skipped members too: a rerun of an unchanged package counts them unchanged
                "n_objects": len(keys) + n_skipped,
                "object_keys": keys,
                "state": "read",
                "run_id": run_id,
                "crawled_at": now,
            }
        )
    if index_rows:
        write_partition(lake, "index", index_rows, part=part)
    if quarantine_rows:
        write_partition(lake, "quarantine", quarantine_rows, part=part)
    if unit_rows:
        write_partition(lake, "units", unit_rows, part=part)
    return {
        "indexed": len(index_rows),
        "quarantined": len(quarantine_rows),
        "unchanged": unchanged,
        "units": len(unit_rows),
        **{f"skipped:{reason}": n for reason, n in skipped.items()},
    }


# --------------------------------------------------------------------------------------------
# the driver side
# --------------------------------------------------------------------------------------------


def _write_listing(
    source: Source, folder: Path, sealer: Sealer | None = None
) -> tuple[int, dict[str, int]]:
    """Stream the source's units into Parquet chunks; return how many there are, and how many
    entries the source skipped, per reason. Unit keys are sealed as the units table holds them
    (a lake encrypted at rest), so the diff joins."""
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("seq", pa.int64()),
            ("unit_key", pa.string()),
            ("watermark", pa.string()),
            ("size_bytes", pa.int64()),
            ("mtime_ns", pa.int64()),
        ]
    )
    n = 0
    chunk: list[Unit] = []
    skipped: dict[str, int] = {}

    def flush() -> None:
        if not chunk:
            return
        cols = {
            "seq": list(range(n - len(chunk), n)),
            "unit_key": [sealer.seal("unit_key", u.key) if sealer else u.key for u in chunk],
            "watermark": [u.watermark for u in chunk],
            "size_bytes": [u.size_bytes for u in chunk],
            "mtime_ns": [u.mtime_ns for u in chunk],
        }
        pq.write_table(pa.table(cols, schema=schema), folder / f"{n:012d}.parquet")
        chunk.clear()

    for unit in source.list_units():
        if isinstance(unit, Skipped):
            skipped[unit.reason.value] = skipped.get(unit.reason.value, 0) + 1
            continue
        chunk.append(unit)
        n += 1
        if len(chunk) >= _LISTING_CHUNK:
            flush()
    flush()
    if n == 0:
        pq.write_table(schema.empty_table(), folder / "empty.parquet")
    return n, dict(sorted(skipped.items()))


def _batches(
    con: Any,
    sql: str,
    params: Mapping[str, Any],
    batch_units: int,
    sealer: Sealer | None = None,
) -> Iterator[tuple[list[Unit], dict[str, dict[str, str]]]]:
    """Group the diff query's rows (ordered by listing) into batches of whole units (their
    keys opened, to be read from the source)."""
    reader = arrow_reader(con, sql, params, 10_000)
    units: list[Unit] = []
    known: dict[str, dict[str, str]] = {}
    last: str | None = None
    for rb in reader:
        cols = rb.to_pydict()
        for uk, wm, size, mtime, okey, fp in zip(
            cols["unit_key"],
            cols["watermark"],
            cols["size_bytes"],
            cols["mtime_ns"],
            cols["object_key"],
            cols["fingerprint"],
            strict=True,
        ):
            if sealer is not None:
                uk = sealer.open("unit_key", uk)
            if uk != last:
                if len(units) >= batch_units:
                    yield units, known
                    units, known = [], {}
                units.append(Unit(uk, wm, size, mtime))
                last = uk
            if okey is not None and fp is not None:
                known.setdefault(uk, {})[okey] = fp
    if units:
        yield units, known


def _write_gone(
    con: Any,
    lake: LakePaths,
    source: Source,
    run_id: str,
    sql: str,
    params: Mapping[str, Any],
    tag: str,
) -> int:
    """Write index rows with state ``gone`` for what ``sql`` selects (streamed)."""
    now = datetime.now(UTC)
    n = 0
    reader = arrow_reader(con, sql, params, 50_000)
    for i, rb in enumerate(reader):
        rows = rb.to_pylist()
        for row in rows:
            row.update(
                source_kind=source.kind.value,
                crawl_run=run_id,
                state=ObjectState.GONE.value,
                crawled_at=now,
            )
        if rows:
            write_partition(lake, "index", rows, part=f"{run_id}-{tag}-{i:05d}")
            n += len(rows)
    return n


def _sweep_dead_runs(lake: LakePaths) -> None:
    """Remove the scratch folders of crawls whose process is gone (killed runs)."""
    for scratch in lake.root.glob(".crawl-*"):
        try:
            host, pid = (scratch / "pid").read_text().split()
            if host != socket.gethostname():
                continue  # another machine's run: not ours to judge
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(scratch, ignore_errors=True)
        except (OSError, ValueError):
            continue  # no pid yet (a run starting) or not ours to judge


def run(
    cfg: PipelineConfig,
    lake: LakePaths,
    source: Source,
    *,
    run_id: str,
    client: Any = None,
    progress: Progress | None = None,
    checked: bool = False,
) -> CrawlResult:
    """Crawl ``source`` into ``lake``.

    Parameters
    ----------
    cfg:
        Configuration (``crawl`` and ``compute.partition_size`` are used).
    lake:
        The lake to write to (created if absent).
    source:
        The archive connector.
    run_id:
        The run this crawl belongs to (names its part files).
    client:
        A ``distributed.Client``; None runs the batches in this process.
    progress:
        Called with the number of units finished, as batches complete.
    checked:
        The caller already ran ``source.check()`` (the stage does, before it starts a Dask
        cluster, so an unreachable PACS fails within its timeouts).

    Returns
    -------
    CrawlResult
    """
    t0 = time.perf_counter()
    if isinstance(source, FolderSource) and source.limits != cfg.limits:
        # the config's bounds on packages, as the later stages open them (open_source)
        source = replace(source, limits=cfg.limits)
    lake.create()
    if not checked:
        source.check()
    _sweep_dead_runs(lake)
    tmp = lake.root / f".crawl-{run_id}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "pid").write_text(f"{socket.gethostname()} {os.getpid()}")
    src = source.source_id
    try:
        n_units, skipped = _write_listing(source, tmp / "listing", lake.sealer())
        con = connect(tmp)
        crawl_q = CrawlQueries.at_start(
            lake, tmp / "listing", source=src, incremental=cfg.crawl.incremental
        )
        same = crawl_q.unchanged()
        units_unchanged, objects_unchanged = con.execute(same.sql, same.params).fetchall()[0]
        diff = crawl_q.diff()
        set_total(progress, n_units)
        if progress and units_unchanged:
            progress(int(units_unchanged))
        logger.info(
            "crawl: %d units listed, %d unchanged, %d to read, %d entries skipped",
            n_units,
            units_unchanged,
            n_units - units_unchanged,
            sum(skipped.values()),
        )
        totals = {"indexed": 0, "quarantined": 0, "unchanged": 0, "units": 0}
        on_invalid = cfg.crawl.on_invalid
        batches = _batches(con, diff.sql, diff.params, cfg.compute.partition_size, lake.sealer())

        def add(result: dict[str, int]) -> None:
            for k in totals:
                totals[k] += result[k]
            for k, n in result.items():
                if k.startswith("skipped:"):
                    reason = k.removeprefix("skipped:")
                    skipped[reason] = skipped.get(reason, 0) + n
            if progress:
                progress(result["units"])

        calls = (
            (
                (source, units, known),
                {
                    "lake": lake,
                    "run_id": run_id,
                    "part": f"{run_id}-{i:05d}",
                    "on_invalid": on_invalid,
                    "limits": cfg.limits,
                },
            )
            for i, (units, known) in enumerate(batches)
        )
        for result in map_bounded(crawl_batch, calls, client=client):
            add(result)

        # what vanished: whole units no longer listed, and objects no longer in a re-read unit
        gone_units_q = crawl_q.gone_units()
        now = datetime.now(UTC)
        gone_units = [r[0] for r in con.execute(gone_units_q.sql, gone_units_q.params).fetchall()]
        if gone_units:
            write_partition(
                lake,
                "units",
                [
                    {
                        "source": src,
                        "unit_key": k,
                        "watermark": "",
                        "n_objects": 0,
                        "object_keys": [],
                        "state": "gone",
                        "run_id": run_id,
                        "crawled_at": now,
                    }
                    for k in gone_units
                ],
                part=f"{run_id}-gone",
            )
        gone_objects = crawl_q.gone_objects(lake, run_id, gone_units)
        gone = _write_gone(
            con,
            lake,
            source,
            run_id,
            gone_objects.sql,
            gone_objects.params,
            "gone",
        )
        con.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    unchanged = totals["unchanged"] + int(objects_unchanged)
    skipped = dict(sorted(skipped.items()))
    n_skipped = sum(skipped.values())
    counts = StageCounts(
        seen=totals["indexed"] + totals["quarantined"] + unchanged + n_skipped,
        out=totals["indexed"],
        quarantined=totals["quarantined"],
        skipped=unchanged + n_skipped,
        seconds=round(time.perf_counter() - t0, 3),
        extra={
            "gone": gone,
            "unchanged": unchanged,
            "skipped_by_reason": skipped,
            "units_listed": n_units,
            "units_read": totals["units"],
            "units_unchanged": int(units_unchanged),
        },
    )
    logger.info(
        "crawl: seen %d = indexed %d + quarantined %d + unchanged %d + skipped %d%s; gone %d; "
        "in %.1f s",
        counts.seen,
        counts.out,
        counts.quarantined,
        unchanged,
        n_skipped,
        skipped_text(skipped),
        gone,
        counts.seconds,
    )
    return CrawlResult(run_id, counts)
