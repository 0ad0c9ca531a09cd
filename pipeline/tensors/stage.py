"""The tensors stage: de-identified series -> geometry-exact volumes in ``research/tensors/``.

1. DuckDB lists the de-identified series (the vault's current rows joined with the index for
   where each object lives) that have no row yet in ``research/tables/tensors`` for this
   de-identification version and preprocessing hash (incremental; a changed preprocessing adds
   a new version beside the old);
2. workers read each object whole through the connector that crawled it, de-identify it with
   the same engine and key (so every UID in the volume's metadata is a pseudonym), decode the
   pixels (:mod:`pipeline.tensors.decode`), build the volume(s) (:mod:`pipeline.tensors.volume`),
   preprocess them (:mod:`pipeline.tensors.preprocess`) and store one ``.npy`` file per volume,
   content-addressed ``tensors/<series>/<preprocessing hash>-<deid version>-<volume>.npy``;
3. a series that cannot be a volume gets a ``refused`` row with the reason, and its objects
   whose pixels cannot be decoded go to the quarantine (stage ``tensors``, reason
   ``undecodable``/``truncated``); the ``series`` table's ``volume_ok``/``volume_reason`` take
   the verdict taken on the pixels.

Memory: one series at a time per worker (its datasets and volume).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.compute import map_bounded
from pipeline.config import PipelineConfig
from pipeline.connectors import Source, open_source
from pipeline.enums import Stage
from pipeline.errors import GeometryError, InputError, SourceError, UnreadableDicom
from pipeline.lake import LakePaths, StageCounts, atomic_write_bytes, table_exists, write_partition
from pipeline.lake.duck import arrow_reader, connect, latest_sql, scan_sql

logger = logging.getLogger(__name__)

__all__ = ["TensorsRunResult", "load_tensor", "run", "tensors_batch"]

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TensorsRunResult:
    """What one tensors run did, in numbers."""

    run_id: str
    counts: StageCounts


def _deid_version() -> str:
    from pipeline.deid.stage import DEID_VERSION

    return DEID_VERSION


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_tensor(lake: LakePaths, path: str) -> np.ndarray[Any, Any]:
    """Load a stored volume by its ``tensors.path`` (relative to ``research/``)."""
    return np.load(lake.research / path, allow_pickle=False)


def _quarantine_row(
    obj: dict[str, Any], exc: InputError, run_id: str, now: dt.datetime
) -> dict[str, Any]:
    return {
        "object_key": obj["object_key"],
        "source": obj["source"],
        "location": obj["location"],
        "unit_key": obj["unit_key"],
        "stage": Stage.TENSORS.value,
        "reason": exc.reason.value,
        "error_class": type(exc).__name__,
        "message": str(exc),
        "size_bytes": obj["size_bytes"],
        "mtime_ns": obj["mtime_ns"],
        "run_id": run_id,
        "quarantined_at": now,
    }


def _series_datasets(
    cfg: PipelineConfig,
    lake: LakePaths,
    objects: list[dict[str, Any]],
    deid: Any,
    sources: dict[str, Source],
) -> tuple[list[Any], list[tuple[dict[str, Any], InputError]]]:
    """Read and de-identify a series' objects; decode failures come back, not raised."""
    import pydicom

    from pipeline.tensors.decode import decode_frames

    datasets, failed = [], []
    for obj in objects:
        try:
            source = sources.get(obj["source"]) or open_source(
                obj["source"], cfg.source, cache_dir=lake.restricted / "cache"
            )
            sources[obj["source"]] = source
            with source.open(obj["location"]) as fp, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's warnings quote header values
                ds = pydicom.dcmread(fp, force=True)
            ds = deid.deidentify(ds, in_place=True).dataset
            decode_frames(ds)  # fail here, per object, not later for the whole series
            datasets.append(ds)
        except InputError as exc:
            failed.append((obj, exc))
        except (SourceError, OSError) as exc:
            failed.append((obj, UnreadableDicom(f"cannot be read ({type(exc).__name__})")))
        except Exception as exc:  # pydicom on a corrupt object
            failed.append((obj, UnreadableDicom(f"cannot be parsed ({type(exc).__name__})")))
    return datasets, failed


def tensors_batch(
    cfg: PipelineConfig,
    series: list[dict[str, Any]],
    *,
    secret_key: bytes,
    lake: LakePaths,
    run_id: str,
    part: str,
) -> dict[str, int]:
    """Build, preprocess and store the volumes of a batch of series; write their table rows."""
    from pipeline.deid.core import Deidentifier
    from pipeline.deid.keys import Pseudonymizer
    from pipeline.tensors.preprocess import preprocess, preprocessing_hash, preprocessing_json
    from pipeline.tensors.volume import build_volumes

    now = dt.datetime.now(dt.UTC)
    deid = Deidentifier(Pseudonymizer(secret_key), cfg.deid.options)
    prep_json, prep_hash = preprocessing_json(cfg.tensors), preprocessing_hash(cfg.tensors)
    deid_version = _deid_version()
    sources: dict[str, Source] = {}
    rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    counts = {"objects": 0, "volumes": 0, "refused": 0, "quarantined": 0}
    for s in series:
        uid, objects = s["series_pseudonym"], s["objects"]
        counts["objects"] += len(objects)
        base = {
            "SeriesInstanceUID": uid,
            "preprocessing": prep_json,
            "preprocessing_hash": prep_hash,
            "deid_version": deid_version,
        }
        datasets, failed = _series_datasets(cfg, lake, objects, deid, sources)
        for obj, exc in failed:
            if cfg.tensors.on_invalid == "raise":
                raise exc
            quarantine.append(_quarantine_row(obj, exc, run_id, now))
        counts["quarantined"] += len(failed)
        try:
            if failed:
                raise GeometryError(f"{len(failed)} object(s) of the series cannot be decoded")
            volumes = build_volumes(datasets)
        except GeometryError as exc:
            counts["refused"] += 1
            rows.append(
                {
                    **base,
                    "tensor_key": f"{uid}/{prep_hash}-{_short(deid_version)}-refused",
                    "status": "refused",
                    "reason": str(exc),
                }
            )
            continue
        for index, vol in enumerate(volumes):
            out = preprocess(vol.array, vol.affine, vol.spacing, cfg.tensors)
            key = f"{uid}/{prep_hash}-{_short(deid_version)}-{index}"
            rel = f"tensors/{key}.npy"
            buf = io.BytesIO()
            np.save(buf, out.array, allow_pickle=False)
            data = buf.getvalue()
            atomic_write_bytes(lake.research / rel, data)
            rows.append(
                {
                    **base,
                    "tensor_key": key,
                    "volume_index": index,
                    "n_volumes": len(volumes),
                    "status": "ok",
                    "path": rel,
                    "shape": list(out.array.shape),
                    "spacing": [float(x) for x in out.spacing],
                    "affine": [float(x) for x in out.affine.reshape(-1)],
                    "dtype": str(out.array.dtype),
                    "checksum": "sha256:" + hashlib.sha256(data).hexdigest(),
                    "rescaled": vol.rescaled,
                    "sop_instance_uids": list(vol.sop_instance_uids),
                    "frame_numbers": list(vol.frame_numbers),
                }
            )
            counts["volumes"] += 1
        del datasets, volumes
    if quarantine:
        write_partition(lake, "quarantine", quarantine, part=f"tensors-{part}")
    if rows:  # last: it commits the batch (a rerun skips series the table holds)
        write_partition(lake, "tensors", rows, part=part)
    return counts


def _todo(
    con: Any, lake: LakePaths, prep_hash: str, deid_version: str, batch_objects: int
) -> Iterator[list[dict[str, Any]]]:
    """Series without a tensors row for this preprocessing, grouped into batches."""
    index_latest = latest_sql(lake, "index", "object_key", "crawled_at")
    vault_latest = latest_sql(lake, "vault", "object_key", "deidentified_at")
    done = (
        f"(SELECT SeriesInstanceUID FROM {scan_sql(lake, 'tensors')} "
        "WHERE preprocessing_hash = $h AND deid_version = $v)"
    )
    sql = f"""
        SELECT v.series_pseudonym,
               list(struct_pack(object_key := i.object_key, source := i.source,
                                location := i.location, unit_key := i.unit_key,
                                size_bytes := i.size_bytes, mtime_ns := i.mtime_ns)
                    ORDER BY v.sop_pseudonym) AS objects
        FROM {vault_latest} v
        JOIN {index_latest} i
          ON i.object_key = v.object_key AND i.fingerprint IS NOT DISTINCT FROM v.fingerprint
        WHERE i.state = 'indexed' AND v.series_pseudonym NOT IN {done}
        GROUP BY v.series_pseudonym ORDER BY v.series_pseudonym
    """
    batch: list[dict[str, Any]] = []
    n = 0
    for rb in arrow_reader(con, sql, {"h": prep_hash, "v": deid_version}, 256):
        for row in rb.to_pylist():
            batch.append(row)
            n += len(row["objects"])
            if n >= batch_objects:
                yield batch
                batch, n = [], 0
    if batch:
        yield batch


def _apply_verdicts(con: Any, lake: LakePaths) -> None:
    """Set ``series.volume_ok``/``volume_reason`` from the verdicts taken on the pixels."""
    import pyarrow.parquet as pq

    if not table_exists(lake, "series") or not table_exists(lake, "tensors"):
        return
    verdicts = {
        uid: (status == "ok", reason)
        for uid, status, reason in con.execute(
            f"""SELECT SeriesInstanceUID, any_value(status), any_value(reason)
                FROM {scan_sql(lake, "tensors")} GROUP BY 1"""
        ).fetchall()
    }
    for path in lake.table("series").rglob("*.parquet"):
        table = pq.read_table(path)
        rows = table.to_pylist()
        changed = False
        for row in rows:
            verdict = verdicts.get(row["SeriesInstanceUID"])
            if verdict and (row["volume_ok"], row["volume_reason"]) != verdict:
                row["volume_ok"], row["volume_reason"] = verdict
                changed = True
        if changed:
            buf = io.BytesIO()
            pq.write_table(
                type(table).from_pylist(rows, schema=table.schema), buf, compression="zstd"
            )
            atomic_write_bytes(path, buf.getvalue())


def run(
    cfg: PipelineConfig,
    lake: LakePaths,
    *,
    key: bytes,
    run_id: str,
    client: Any = None,
    progress: Progress | None = None,
) -> TensorsRunResult:
    """Build the tensors of the de-identified series that have none for this preprocessing."""
    from pipeline.tensors.preprocess import preprocessing_hash

    t0 = time.perf_counter()
    con = connect()
    prep_hash, deid_version = preprocessing_hash(cfg.tensors), _deid_version()
    done = {"objects": 0, "volumes": 0, "refused": 0, "quarantined": 0}

    def calls() -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        batches = _todo(con, lake, prep_hash, deid_version, cfg.compute.partition_size // 4 or 1)
        for i, series in enumerate(batches):
            kwargs = {
                "secret_key": key,
                "lake": lake,
                "run_id": run_id,
                "part": f"{run_id}-{i:05d}",
            }
            yield (cfg, series), kwargs

    for result in map_bounded(tensors_batch, calls(), client=client):
        for k in done:
            done[k] += result[k]
        if progress:
            progress(result["objects"])
    _apply_verdicts(con, lake)
    con.close()
    counts = StageCounts(
        seen=done["objects"],
        out=done["objects"] - done["quarantined"],
        quarantined=done["quarantined"],
        seconds=round(time.perf_counter() - t0, 3),
        extra={"volumes": done["volumes"], "refused_series": done["refused"]},
    )
    logger.info(
        "tensors: %d objects, %d volumes stored, %d series refused, %d quarantined in %.1f s",
        done["objects"],
        done["volumes"],
        done["refused"],
        done["quarantined"],
        counts.seconds,
    )
    return TensorsRunResult(run_id, counts)


def describe(lake: LakePaths) -> dict[str, Any]:
    """Counts of the tensors table (for summaries)."""
    con = connect()
    try:
        ok, refused = con.execute(
            f"""SELECT count(*) FILTER (WHERE status = 'ok'),
                       count(*) FILTER (WHERE status = 'refused')
                FROM {scan_sql(lake, "tensors")}"""
        ).fetchone()
    finally:
        con.close()
    return {"volumes": ok, "refused_series": refused, "json": json.dumps({})}
