"""The crawl stage: list a source, read headers in Dask partitions, write index and quarantine.

Incremental: an object whose location, size and mtime match the current state of the lake is
skipped. Every object seen in a run ends as exactly one of: an index row, a quarantine row,
or a skip, and the counts reconcile.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import PipelineConfig
from pipeline.connectors import ObjectRef, Source
from pipeline.crawl.core import read_header
from pipeline.enums import ObjectState, QuarantineReason, Stage
from pipeline.errors import InputError
from pipeline.lake import LakePaths, StageCounts, read_table, write_partition

logger = logging.getLogger(__name__)

__all__ = ["CrawlResult", "current_index", "object_key", "run"]

Progress = Callable[[int], None]


def object_key(source_id: str, location: str) -> str:
    """Stable key of an object: SHA-256 of its source id and location (no PHI in it)."""
    return hashlib.sha256(f"{source_id}\x00{location}".encode()).hexdigest()


@dataclass(frozen=True)
class CrawlResult:
    """What one crawl did, in numbers."""

    run_id: str
    counts: StageCounts


def _latest(table: pa.Table, order_column: str) -> pa.Table:
    """Keep the last row per ``object_key`` (by ``order_column``)."""
    if table.num_rows == 0:
        return table
    table = table.sort_by([("object_key", "ascending"), (order_column, "ascending")])
    keys = table.column("object_key")
    if table.num_rows == 1:
        return table
    nxt = pc.not_equal(keys.slice(0, table.num_rows - 1), keys.slice(1))
    last = pa.concat_arrays([nxt.combine_chunks(), pa.array([True])])
    return table.filter(last)


def current_index(lake: LakePaths) -> pa.Table:
    """The index as it stands now: the latest row of each object (older rows are history)."""
    return _latest(read_table(lake, "index"), "crawled_at")


def _known_state(lake: LakePaths, source_id: str) -> dict[str, tuple[int | None, int | None]]:
    """``object_key -> (size, mtime)`` of the latest index or quarantine row from this source."""
    cols = ["object_key", "source", "size_bytes", "mtime_ns"]
    idx = read_table(lake, "index", columns=[*cols, "crawled_at"])
    quar = read_table(lake, "quarantine", columns=[*cols, "quarantined_at"])
    quar = quar.rename_columns([*cols, "crawled_at"])
    both = pa.concat_tables([idx, quar.cast(idx.schema)])
    both = both.filter(pc.equal(both.column("source"), source_id))
    latest = _latest(both, "crawled_at")
    return {
        k: (s, m)
        for k, s, m in zip(
            latest.column("object_key").to_pylist(),
            latest.column("size_bytes").to_pylist(),
            latest.column("mtime_ns").to_pylist(),
            strict=True,
        )
    }


def _chunks(items: Iterable[ObjectRef], size: int) -> Iterator[list[ObjectRef]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _quarantine_row(
    key: str,
    source: Source,
    ref: ObjectRef,
    run_id: str,
    now: datetime,
    reason: str,
    error_class: str,
    message: str,
) -> dict[str, Any]:
    return {
        "object_key": key,
        "source": source.source_id,
        "location": ref.location,
        "stage": Stage.CRAWL.value,
        "reason": reason,
        "error_class": error_class,
        "message": message,
        "size_bytes": ref.size_bytes,
        "mtime_ns": ref.mtime_ns,
        "run_id": run_id,
        "quarantined_at": now,
    }


def crawl_partition(
    source: Source,
    refs: list[ObjectRef],
    *,
    lake: LakePaths,
    run_id: str,
    part: str,
    on_invalid: str = "quarantine",
) -> dict[str, int]:
    """Read the headers of one partition of objects and write its index and quarantine files.

    Runs on a Dask worker (or in-process). Writing the same ``part`` again replaces the files,
    so a retried task does not duplicate rows.

    Returns
    -------
    dict
        ``{"indexed": n, "quarantined": m}``.
    """
    now = datetime.now(UTC)
    index_rows: list[dict[str, Any]] = []
    quarantine_rows: list[dict[str, Any]] = []
    for ref in refs:
        key = object_key(source.source_id, ref.location)
        try:
            with source.open(ref.location) as fp:
                size = ref.size_bytes if ref.size_bytes is not None else fp.seek(0, 2)
                fp.seek(0)
                record = read_header(fp, size)
        except InputError as exc:
            if on_invalid == "raise":
                raise
            quarantine_rows.append(
                _quarantine_row(
                    key, source, ref, run_id, now, exc.reason.value, type(exc).__name__, str(exc)
                )
            )
            logger.debug("quarantined %s: %s", ref.location, exc.reason.value)
            continue
        except OSError as exc:
            quarantine_rows.append(
                _quarantine_row(
                    key,
                    source,
                    ref,
                    run_id,
                    now,
                    QuarantineReason.UNREADABLE.value,
                    type(exc).__name__,
                    f"cannot read the file: {exc.strerror}",
                )
            )
            continue
        index_rows.append(
            {
                "object_key": key,
                "source": source.source_id,
                "source_kind": source.kind.value,
                "location": ref.location,
                **asdict(record),
                "size_bytes": ref.size_bytes,
                "mtime_ns": ref.mtime_ns,
                "crawl_run": run_id,
                "state": ObjectState.INDEXED.value,
                "crawled_at": now,
            }
        )
    if index_rows:
        write_partition(lake, "index", index_rows, part=part)
    if quarantine_rows:
        write_partition(lake, "quarantine", quarantine_rows, part=part)
    return {"indexed": len(index_rows), "quarantined": len(quarantine_rows)}


def run(
    cfg: PipelineConfig,
    lake: LakePaths,
    source: Source,
    *,
    run_id: str,
    client: Any = None,
    progress: Progress | None = None,
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
        The run this crawl belongs to (names its partition files).
    client:
        A ``distributed.Client``; None runs the partitions in this process.
    progress:
        Called with the number of objects finished, as partitions complete.

    Returns
    -------
    CrawlResult
    """
    t0 = time.perf_counter()
    lake.create()
    known = _known_state(lake, source.source_id) if cfg.crawl.incremental else {}
    seen = 0
    skipped = 0
    todo: list[ObjectRef] = []
    for ref in source.list_objects():
        seen += 1
        state = known.get(object_key(source.source_id, ref.location))
        if state is not None and state == (ref.size_bytes, ref.mtime_ns):
            skipped += 1
        else:
            todo.append(ref)
    if progress and skipped:
        progress(skipped)
    logger.info("crawl: %d objects listed, %d unchanged, %d to read", seen, skipped, len(todo))
    chunks = list(_chunks(todo, cfg.compute.partition_size))
    on_invalid = cfg.crawl.on_invalid
    indexed = quarantined = 0
    if client is None:
        for i, chunk in enumerate(chunks):
            r = crawl_partition(
                source,
                chunk,
                lake=lake,
                run_id=run_id,
                part=f"{run_id}-{i:05d}",
                on_invalid=on_invalid,
            )
            indexed += r["indexed"]
            quarantined += r["quarantined"]
            if progress:
                progress(len(chunk))
    else:
        from distributed import as_completed

        futures = [
            client.submit(
                crawl_partition,
                source,
                chunk,
                lake=lake,
                run_id=run_id,
                part=f"{run_id}-{i:05d}",
                on_invalid=on_invalid,
                pure=False,
            )
            for i, chunk in enumerate(chunks)
        ]
        sizes = {f.key: len(c) for f, c in zip(futures, chunks, strict=True)}
        for fut in as_completed(futures):
            r = fut.result()
            indexed += r["indexed"]
            quarantined += r["quarantined"]
            if progress:
                progress(sizes[fut.key])
    counts = StageCounts(
        seen=seen,
        out=indexed,
        quarantined=quarantined,
        skipped=skipped,
        seconds=round(time.perf_counter() - t0, 3),
    )
    logger.info(
        "crawl: seen %d = indexed %d + quarantined %d + unchanged %d in %.1f s",
        seen,
        indexed,
        quarantined,
        skipped,
        counts.seconds,
    )
    return CrawlResult(run_id, counts)
