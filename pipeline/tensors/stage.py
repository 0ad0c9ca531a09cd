"""The tensors stage: de-identified series -> geometry-exact volumes in ``research/tensors/``.

1. DuckDB lists the de-identified series (the vault's current rows joined with the index for
   where each object lives) that have no row yet in ``research/tables/tensors`` for this
   de-identification version and preprocessing hash (incremental; a changed preprocessing adds
   a new version beside the old);
2. workers read each object whole through the connector that crawled it, decode its pixels
   (:mod:`pipeline.tensors.decode`), build the volume(s) (:mod:`pipeline.tensors.volume`: only
   geometry and pixels are taken from the header; the SOP Instance UIDs listed with a volume
   are the vault's pseudonyms, so no key is needed),
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
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.compute import map_bounded, set_total
from pipeline.config import PipelineConfig, TensorsConfig
from pipeline.connectors import Source, open_source
from pipeline.dicom.limits import read_capped
from pipeline.enums import Stage
from pipeline.errors import GeometryError, InputError, SourceError, UnreadableDicom
from pipeline.lake import (
    LakePaths,
    StageCounts,
    delta,
    load_tensor,
    read_table,
    sync_filesystem,
    write_npy,
    write_partition,
)
from pipeline.lake.duck import arrow_reader, connect, volume_verdicts
from pipeline.lake.io import conform
from pipeline.lake.queries import tensors_todo
from pipeline.lake.space import no_space_in

logger = logging.getLogger(__name__)

#: Version of the rules deciding which series become tensors. A refused series is tried again
#: when it changes (its refused row names the rules that refused it): bump it when a change
#: turns refusals into tensors. 2: tilted CT, 2D radiographs/ultrasound/cine, 4D MR splits,
#: packed inputs (issue #21). 3: variable slice spacing equalized (issue #21).
VOLUME_RULES = 3

__all__ = ["TensorsRunResult", "load_tensor", "run", "tensors_batch", "write_npy"]

# load_tensor and write_npy live in pipeline.lake (the infer stage writes masks with it);
# re-exported here, where the tensors stage's readers and bench/ find them

Progress = Callable[[int], None]


@dataclass(frozen=True)
class TensorsRunResult:
    """What one tensors run did, in numbers."""

    run_id: str
    counts: StageCounts


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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
    sources: dict[str, Source],
) -> tuple[list[Any], list[Any], dict[str, str], list[tuple[dict[str, Any], InputError]]]:
    """Read a series' objects and decode their pixels, object by object.

    Returns the datasets, their decoded frames, the map from each object's SOP Instance UID to
    its pseudonym (from the vault: nothing of the header itself leaves this function but
    geometry), and the objects that failed with why.
    """
    from pipeline.dicom.redact import parse_boxes, redacted
    from pipeline.tensors.fastread import read_image

    datasets: list[Any]
    datasets, pixels, pseudonyms, failed = [], [], {}, []
    for obj in objects:
        try:
            source = sources.get(obj["source"]) or open_source(
                obj["source"], cfg.source, cache_dir=lake.restricted / "cache", limits=cfg.limits
            )
            sources[obj["source"]] = source
            with source.open(obj["location"]) as fp:
                data = read_capped(fp, cfg.limits)
            with warnings.catch_warnings():
                # pydicom's warnings quote header values (here an original UID): values are
                # converted lazily, on access, so they are silenced where they are read too
                warnings.simplefilter("ignore")
                # fails here, per object, not for the series
                ds, frames = read_image(data, cfg.limits)
                # burned-in text de-identification blacked out (the vault's boxes): the
                # source's pixels never reach a tensor without them
                frames = redacted(frames, parse_boxes(obj.get("pixel_redactions")))
                pseudonyms[str(ds.get("SOPInstanceUID", ""))] = obj["sop_pseudonym"]
            datasets.append(ds)
            pixels.append(frames)
        except InputError as exc:
            failed.append((obj, exc))
        except (SourceError, OSError) as exc:
            if no_space_in(exc) is not None:  # a full disk (the cache) is not the object's
                raise
            failed.append((obj, UnreadableDicom(f"cannot be read ({type(exc).__name__})")))
        except Exception as exc:  # pydicom on a corrupt object
            failed.append((obj, UnreadableDicom(f"cannot be parsed ({type(exc).__name__})")))
    return datasets, pixels, pseudonyms, failed


def _planar_rows(
    lake: LakePaths,
    cfg: TensorsConfig,
    images: list[Any],
    base: dict[str, Any],
    pseudonyms: dict[str, str],
    deid_version: str,
) -> list[dict[str, Any]]:
    """Store the 2D tensors of a planar series (:mod:`pipeline.tensors.planar`: one per
    object, the intensity steps of the preprocessing applied) and return their rows."""
    import numpy as np

    from pipeline.tensors.planar import planar_preprocessing
    from pipeline.tensors.preprocess import preprocess

    prep = planar_preprocessing(cfg)
    rows = []
    for index, image in enumerate(images):
        out = preprocess(image.array, np.eye(4), (1.0, 1.0, 1.0), prep)
        key = f"{base['SeriesInstanceUID']}/{base['preprocessing_hash']}-{_short(deid_version)}"
        rel = f"tensors/{key}-{index}.npy"
        rows.append(
            {
                **base,
                **image.row(),
                "preprocessing": prep.preprocessing_json(),  # what was applied to it
                "tensor_key": f"{key}-{index}",
                "volume_index": index,
                "n_volumes": len(images),
                "status": "ok",
                "path": rel,
                "shape": list(out.array.shape),
                "dtype": str(out.array.dtype),
                "checksum": write_npy(lake.research / rel, out.array),
                "sop_instance_uids": [pseudonyms[image.sop_uid]],
            }
        )
    return rows


def tensors_batch(
    cfg: PipelineConfig,
    series: list[dict[str, Any]],
    *,
    lake: LakePaths,
    run_id: str,
    part: str,
) -> dict[str, int]:
    """Build, preprocess and store the volumes of a batch of series; write their table rows."""
    from pipeline.tensors.planar import build_planar, is_planar
    from pipeline.tensors.preprocess import (
        preprocess_volume,
        preprocessing_hash,
        preprocessing_json,
        volume_preprocessing_json,
    )
    from pipeline.tensors.volume import build_volumes

    now = dt.datetime.now(dt.UTC)
    prep_json, prep_hash = preprocessing_json(cfg.tensors), preprocessing_hash(cfg.tensors)
    sources: dict[str, Source] = {}
    rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    counts = {"objects": 0, "volumes": 0, "refused": 0, "quarantined": 0}
    for s in series:
        uid, objects, deid_version = s["series_pseudonym"], s["objects"], s["deid_version"]
        counts["objects"] += len(objects)
        base = {
            "SeriesInstanceUID": uid,
            "preprocessing": prep_json,
            "preprocessing_hash": prep_hash,
            "deid_version": deid_version,
        }
        datasets, pixels, pseudonyms, failed = _series_datasets(cfg, lake, objects, sources)
        for obj, exc in failed:
            if cfg.tensors.on_invalid == "raise":
                raise exc
            quarantine.append(_quarantine_row(obj, exc, run_id, now))
        counts["quarantined"] += len(failed)
        try:
            if failed:
                raise GeometryError(f"{len(failed)} object(s) of the series cannot be decoded")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # as above: lazily converted header values
                if is_planar(datasets, cfg.tensors):  # radiographs, ultrasound, cine: 2D
                    planar = build_planar(datasets, pixels, cfg.tensors)
                    rows.extend(
                        _planar_rows(lake, cfg.tensors, planar, base, pseudonyms, deid_version)
                    )
                    counts["volumes"] += len(planar)
                    del datasets, pixels, planar
                    continue
                volumes = build_volumes(
                    datasets,
                    pixels,
                    allow_tilt=cfg.tensors.gantry_tilt != "refuse",
                    allow_variable=cfg.tensors.variable_spacing == "equalize",
                )
            # each volume's preprocessing: refuses here, before any is stored, a tilted
            # volume that cannot be de-tilted (and records a de-tilt and an equalization)
            preps = [volume_preprocessing_json(vol, cfg.tensors) for vol in volumes]
        except GeometryError as exc:
            counts["refused"] += 1
            rows.append(
                {
                    **base,
                    "tensor_key": (
                        f"{uid}/{prep_hash}-{_short(deid_version)}-refused-r{VOLUME_RULES}"
                    ),
                    "status": "refused",
                    "reason": str(exc),
                }
            )
            continue
        for index, (vol, vol_prep) in enumerate(zip(volumes, preps, strict=True)):
            out = preprocess_volume(vol, cfg.tensors)
            key = f"{uid}/{prep_hash}-{_short(deid_version)}-{index}"
            rel = f"tensors/{key}.npy"
            checksum = write_npy(lake.research / rel, out.array)
            rows.append(
                {
                    **base,
                    # the configured one, plus a de-tilt and an equalization if any
                    "preprocessing": vol_prep,
                    "tensor_key": key,
                    "volume_index": index,
                    "n_volumes": len(volumes),
                    "status": "ok",
                    "path": rel,
                    "shape": list(out.array.shape),
                    "spacing": [float(x) for x in out.spacing],
                    "affine": [float(x) for x in out.affine.reshape(-1)],
                    "dtype": str(out.array.dtype),
                    "checksum": checksum,
                    "rescaled": vol.rescaled,
                    # pseudonyms only: an object missing from the map cannot happen (each
                    # dataset read above put its own), and would fail loudly here
                    "sop_instance_uids": [pseudonyms[u] for u in vol.sop_instance_uids],
                    "frame_numbers": list(vol.frame_numbers),
                    "tensor_kind": "volume",
                    "bvalue": vol.bvalue,
                    "bvec": None if vol.bvec is None else list(vol.bvec),
                    "bvec_dcm2niix": None
                    if vol.bvec_dcm2niix is None
                    else [round(x, 6) + 0.0 for x in vol.bvec_dcm2niix],
                    "acquisition": vol.acquisition,
                }
            )
            counts["volumes"] += 1
        del datasets, pixels, volumes
    if counts["volumes"]:
        sync_filesystem(lake.research)  # the batch's volumes, before its rows commit them
    if quarantine:
        write_partition(lake, "quarantine", quarantine, part=f"tensors-{part}")
    if rows:  # last: it commits the batch (a rerun skips series the table holds)
        write_partition(lake, "tensors", rows, part=part)
    return counts


def _todo(
    con: Any,
    lake: LakePaths,
    prep_hash: str,
    batch_objects: int,
    progress: Progress | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """Series without a tensors row for this preprocessing and their de-identification
    version (the vault's), grouped into batches of about ``batch_objects`` objects."""
    q = tensors_todo(lake, prep_hash, VOLUME_RULES)
    if progress is not None:
        total = q.total("coalesce(sum(len(objects)), 0)")
        set_total(progress, int(con.execute(total.sql, dict(total.params)).fetchall()[0][0]))
    batch: list[dict[str, Any]] = []
    n = 0
    sealer = lake.sealer()
    for rb in arrow_reader(con, q.sql, q.params, 256):
        for row in rb.to_pylist():
            if sealer is not None:  # locations to read the objects from
                row["objects"] = [sealer.open_row("index", o) for o in row["objects"]]
            batch.append(row)
            n += len(row["objects"])
            if n >= batch_objects:
                yield batch
                batch, n = [], 0
    if batch:
        yield batch


def _apply_verdicts(con: Any, lake: LakePaths) -> None:
    """Set ``series.volume_ok``/``volume_reason`` from the verdicts taken on the pixels: the
    changed series rows in one commit (an upsert), which keeps the ``instances`` version the
    table was built from."""
    verdicts = volume_verdicts(con, lake)
    if not verdicts:
        return
    changed = []
    for row in read_table(lake, "series").to_pylist():
        verdict = verdicts.get(row["SeriesInstanceUID"])
        if verdict and (row["volume_ok"], row["volume_reason"]) != verdict:
            row["volume_ok"], row["volume_reason"] = verdict
            changed.append(row)
    if changed:
        built = {
            k: str(v)
            for k, v in delta.last_commit_metadata(lake, "series").items()
            if k.startswith("pacsflow.")
        }
        delta.commit(lake, "series", conform(changed, "series"), metadata=built)


def run(
    cfg: PipelineConfig,
    lake: LakePaths,
    *,
    run_id: str,
    client: Any = None,
    progress: Progress | None = None,
) -> TensorsRunResult:
    """Build the tensors of the de-identified series that have none for this preprocessing."""
    from pipeline.tensors.preprocess import preprocessing_hash

    t0 = time.perf_counter()
    con = connect()
    prep_hash = preprocessing_hash(cfg.tensors)
    done = {"objects": 0, "volumes": 0, "refused": 0, "quarantined": 0}

    def calls() -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        batches = _todo(con, lake, prep_hash, cfg.compute.partition_size // 4 or 1, progress)
        for i, series in enumerate(batches):
            kwargs = {
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
