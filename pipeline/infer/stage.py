"""The infer stage: a registered model over the tensor store -> masks and the findings table.

1. The registry entry (:mod:`pipeline.infer.registry`) names the bundle and the series it applies
   to (a WHERE clause over the research ``series`` table); the bundle is loaded once here to
   validate it and to learn its identity (name, version, weights sha256);
2. DuckDB lists the stored volumes (``tensors`` rows with status ok, of the configured
   preprocessing) of those series that have no findings yet for this exact model identity
   (incremental: a rerun skips them; a new version or new weights add rows beside the old);
3. workers (each loads the model once and keeps it) segment the volumes in batches
   (:class:`pipeline.infer.engine.Segmenter`), write one label map per volume in tensor geometry
   to ``research/masks/<tensor_key>/<model>@<version>+<weights12>.npy``, and one findings row per
   (volume, label): voxel count, volume (mL), mean HU on rescaled CT, bounding box, the
   registry entry's name, the mask's path and checksum, the tensor's checksum. Codes are not
   copied here: write-back applies them (:mod:`pipeline.codes`), so a corrected mapping takes
   effect without re-running inference; labels that would get only a local code are named in a
   warning before any volume is read;
4. the rows commit the batch (written last); objects of a volume with findings reach the state
   ``inferred``.

On a Dask cluster (``compute.scheduler``) with ``compute.device: cuda`` the tasks ask for the
worker resource ``infer.gpu_resource`` (start GPU workers with ``--resources GPU=1``). On one
machine (no scheduler) inference runs in-process on its GPU: no cluster needed; a torch without
CUDA, or no device, is said before any work.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.compute import map_bounded, set_total
from pipeline.config import PipelineConfig
from pipeline.dicom.volume import Volume
from pipeline.errors import ConfigError, ModelError
from pipeline.infer.cohort import cohort_columns, extent_mm
from pipeline.lake import LakePaths, StageCounts, sync_filesystem, write_npy, write_partition
from pipeline.lake.duck import arrow_reader, connect
from pipeline.lake.queries import finding_name, infer_todo

logger = logging.getLogger(__name__)

__all__ = ["InferRunResult", "infer_batch", "measure", "run"]

Progress = Callable[[int], None]


@dataclass(frozen=True)
class InferRunResult:
    """What one infer run did, in numbers."""

    run_id: str
    model_ref: str
    counts: StageCounts


# one loaded model per worker process, reused by every task that runs there
_SEGMENTERS: dict[tuple[str, str, str, str, tuple[str, ...], bool], Any] = {}
_SEGMENTERS_LOCK = threading.Lock()


def _models_dir(cfg: PipelineConfig) -> Path:
    from pipeline.infer.registry import default_models_dir

    return cfg.infer.models_dir or default_models_dir()


def _segmenter(
    cfg: PipelineConfig,
    entry: dict[str, Any],
    extract_dir: Path,
) -> Any:
    from pipeline.infer.bundle import BundleError, load_bundle
    from pipeline.infer.bundle_config import content_hash
    from pipeline.infer.engine import Segmenter

    mirror_axes = tuple(entry["test_time"]["mirror_axes"])
    transpose_xy = bool(entry["test_time"]["transpose_xy"])
    trust = entry.get("trust", {"mode": "allow-list", "digest": ""})
    overrides_key = json.dumps([entry.get("overrides", {}), entry.get("drop", [])], sort_keys=True)
    task = str(entry.get("task", "segmentation"))
    key = (
        str(entry["bundle"]) + ("" if task == "segmentation" else f"#{task}"),
        str(trust["mode"]),
        overrides_key,
        cfg.compute.device,
        mirror_axes,
        transpose_xy,
    )
    with _SEGMENTERS_LOCK:
        seg = _SEGMENTERS.get(key)
        if seg is None:
            if (
                trust["mode"] == "trusted"
                and content_hash(Path(entry["bundle"])) != trust["digest"]
            ):
                raise BundleError(  # changed between the driver's decision and this worker
                    "the bundle changed after it was approved: its code does not run"
                )
            bundle = load_bundle(
                entry["bundle"],
                models_dir=_models_dir(cfg),
                mode=trust["mode"],
                extract_dir=extract_dir,
                overrides=entry.get("overrides"),
                drop=tuple(entry.get("drop", ())),
            )
            if task == "classification":
                from pipeline.infer.classify import Classifier

                seg = Classifier(bundle, device=cfg.compute.device, batch_size=cfg.infer.batch_size)
                _SEGMENTERS[key] = seg
                return seg
            seg = _detector(cfg, bundle, entry) or Segmenter(
                bundle,
                device=cfg.compute.device,
                batch_size=cfg.infer.batch_size,
                amp=cfg.infer.amp,
                prefetch=cfg.infer.prefetch,
                mirror_axes=mirror_axes,
                transpose_xy=transpose_xy,
            )
            _SEGMENTERS[key] = seg
    return seg


def _detector(cfg: PipelineConfig, bundle: Any, entry: dict[str, Any]) -> Any:
    """A :class:`~pipeline.infer.detect.Detector` for a detection bundle (boxes), else None."""
    from pipeline.infer.detect import Detector, is_detection

    if not is_detection(bundle):
        return None
    spec = entry.get("detection") or {}
    return Detector(
        bundle,
        device=cfg.compute.device,
        score_threshold=float(spec.get("score_threshold", 0.5)),
        max_boxes=int(spec.get("max_boxes", 20)),
    )


def load_entry_bundle(cfg: PipelineConfig, entry: Any, extract_dir: Path) -> tuple[Any, Any]:
    """Load a registry entry's bundle in the mode its pin decides; returns the bundle and the
    :class:`~pipeline.infer.trust.TrustDecision` (logged)."""
    from pipeline.infer.bundle import _extract_zip, load_bundle, resolve_bundle_path
    from pipeline.infer.trust import TrustStore, decide

    path = resolve_bundle_path(entry.bundle, _models_dir(cfg))
    if path.is_file() and path.suffix == ".zip":
        path = _extract_zip(path, extract_dir)
    decision = decide(path, entry.bundle_sha256, TrustStore(cfg.infer.trust_store))
    logger.info("model %s: %s mode (%s)", entry.name, decision.mode, decision.reason)
    bundle = load_bundle(
        path,
        models_dir=_models_dir(cfg),
        mode=decision.mode,
        extract_dir=extract_dir,
        overrides=entry.overrides,
        drop=tuple(entry.drop),
    )
    return bundle, decision


def uncoded_labels(entry: Any, names: list[str], registry_path: Path | None) -> list[str]:
    """The labels ``names`` of a model (and of the entry's candidates) that neither the
    registry entry nor its code tables code: write-back gives them a local ``99PACSFLOW``
    code."""
    names = [*names, *(f"{c}_1" for c in entry.candidates)]
    codes = entry.label_codes(names, registry_path)
    return [name for name, c in codes.items() if c.local]


def measure(
    labels: npt.NDArray[np.uint8],
    values: npt.NDArray[Any],
    spacing: tuple[float, float, float],
    label_values: list[int],
    hounsfield: bool,
) -> dict[int, dict[str, Any]]:
    """Per label value: voxel count, volume (mL), mean value, bounding box and centroid.

    ``labels`` and ``values`` share the tensor's shape (slices, rows, cols); ``spacing`` is in
    mm in the same axis order. ``mean_hu`` is set when ``hounsfield`` (a rescaled CT tensor).
    """
    flat = labels.ravel()
    top = max([*label_values, int(flat.max()) if flat.size else 0]) + 1
    counts = np.bincount(flat, minlength=top)
    sums = np.bincount(flat, weights=values.ravel().astype(np.float64, copy=False), minlength=top)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    # bounding boxes from per-axis projections: one pass per label over a slice-level summary
    out: dict[int, dict[str, Any]] = {}
    for v in label_values:
        n = int(counts[v])
        entry: dict[str, Any] = {
            "voxel_count": n,
            "volume_ml": n * voxel_ml,
            "mean_hu": float(sums[v] / n) if n and hounsfield else None,
            "mean_value": float(sums[v] / n) if n else None,
            "bbox": None,
            "centroid": None,  # (slice, row, column) voxel position of the label's centre
        }
        if n:
            mask = labels == v
            ks = np.flatnonzero(mask.any(axis=(1, 2)))
            js = np.flatnonzero(mask.any(axis=(0, 2)))
            is_ = np.flatnonzero(mask.any(axis=(0, 1)))
            entry["bbox"] = [int(ks[0]), int(js[0]), int(is_[0]), int(ks[-1]), int(js[-1]),
                             int(is_[-1])]  # fmt: skip
            entry["centroid"] = _centroid(mask, (int(ks[0]), int(js[0]), int(is_[0])),
                                          (int(ks[-1]), int(js[-1]), int(is_[-1])), n)  # fmt: skip
        out[v] = entry
    return out


def _centroid(
    mask: npt.NDArray[np.bool_], lo: tuple[int, int, int], hi: tuple[int, int, int], n: int
) -> list[float]:
    """The mean (slice, row, column) of the ``n`` voxels of ``mask`` inside its box ``lo``..
    ``hi`` (inclusive), counted on the box only (a nodule's box is a few voxels)."""
    crop = mask[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    plane = np.count_nonzero(crop, axis=0)  # (rows, columns)
    per_k = np.count_nonzero(crop.reshape(crop.shape[0], -1), axis=1)
    per_j, per_i = plane.sum(axis=1), plane.sum(axis=0)
    return [
        start + float(np.dot(np.arange(c.size), c)) / n
        for start, c in zip(lo, (per_k, per_j, per_i), strict=True)
    ]


def infer_batch(
    cfg: PipelineConfig,
    tensors: list[dict[str, Any]],
    *,
    lake: LakePaths,
    run_id: str,
    part: str,
    entry: dict[str, Any],
) -> dict[str, Any]:
    """Segment a batch of stored volumes; write their masks and findings rows."""
    seg = _segmenter(cfg, entry, lake.restricted / "cache" / "bundles")
    if hasattr(seg, "detect"):  # a detection model: boxes, not label maps
        from pipeline.infer.detect import detect_batch

        return detect_batch(seg, tensors, lake=lake, run_id=run_id, part=part, entry=entry)
    bundle = seg.bundle
    model_ref = bundle.ref
    device = seg.device + (f"+{str(seg.autocast_dtype).removeprefix('torch.')}"
                           if seg.autocast_dtype is not None else "")  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    label_specs = entry.get("labels", {})
    rows: list[dict[str, Any]] = []
    volumes: dict[str, Volume] = {}
    if entry.get("task") == "classification":
        from pipeline.infer.classify import findings_rows

        stats_before = seg.stats.as_dict()
        rows = findings_rows(seg, tensors, research=lake.research, run_id=run_id, now=now,
                             entry_name=entry.get("name"))  # fmt: skip
        if rows:
            write_partition(lake, "findings", rows, part=part)
        after = seg.stats.as_dict()
        return {
            "volumes": len(tensors),
            "findings": len(rows),
            "stats": {k: after[k] - stats_before[k] for k in after if k != "wait_fraction"},
        }
    # a label map's values and names: the registry's where the bundle's postprocessing writes
    # other values than its channels (BraTS' lambda), else the bundle's channel_def
    label_names = {int(k): v for k, v in (entry.get("output_labels") or {}).items()}
    label_names = label_names or dict(bundle.labels)

    def loader(row: dict[str, Any]) -> Callable[[], Any]:
        if row.get("channels"):  # a multi-sequence input: the study's series stacked
            from pipeline.infer.inputs import stacked_loader

            return stacked_loader(lake, row, lambda v: volumes.__setitem__(row["tensor_key"], v))

        def load() -> Volume:
            array = np.load(lake.research / row["path"], allow_pickle=False)
            volume = Volume.from_tensor_row(row, array)
            volumes[row["tensor_key"]] = volume
            return volume

        return load

    stats_before = seg.stats.as_dict()
    by_key = {row["tensor_key"]: row for row in tensors}
    first_free = max(label_names) + 1
    for key, labels in seg.segment((row["tensor_key"], loader(row)) for row in tensors):
        row = by_key[key]
        volume = volumes.pop(key)
        values, spacing = volume.array, volume.spacing
        hounsfield = bool(row.get("rescaled")) and row.get("Modality") == "CT"
        measured = measure(labels, values, spacing, sorted(label_names), hounsfield)
        found: list[tuple[str, int | None, int, dict[str, Any], dict[str, Any]]] = [
            (name, None, value, label_specs.get(name) or {}, measured[value])
            for value, name in sorted(label_names.items())
        ]
        if entry.get("candidates"):
            labels = np.array(labels, copy=True)  # candidates are written into the label map
            found += _candidates(labels, values, spacing, hounsfield, entry, first_free)
        inputs = {}
        if row.get("channels"):  # which series fed which channel
            inputs = {
                "input_series": [c["SeriesInstanceUID"] for c in row["channels"]],
                "input_channels": list(row["channel_names"]),
            }
        rel = f"masks/{key}/{model_ref}.npy"
        mask_checksum = write_npy(lake.research / rel, labels)
        for name, instance, value, _spec, m in found:
            extra = m.get("extra", {})
            centre, size = extent_mm(m.get("centroid"), m["bbox"], volume.affine)
            rows.append(
                {
                    "finding_key": f"{key}/{model_ref}/{finding_name(name, instance)}",
                    "SeriesInstanceUID": row["SeriesInstanceUID"],
                    "tensor_key": key,
                    "tensor_checksum": row["checksum"],
                    "volume_index": row.get("volume_index"),
                    "model": bundle.name,
                    "model_version": bundle.version,
                    "weights_sha256": bundle.weights_sha256,
                    "label": name,
                    "label_value": value,
                    # codes are applied at write-back (pipeline.codes), never frozen here
                    "category_code": None,
                    "type_code": None,
                    "score": None,
                    "voxel_count": m["voxel_count"],
                    "volume_ml": m["volume_ml"],
                    "mean_hu": m["mean_hu"],
                    "bbox": m["bbox"],
                    "measurements": json.dumps(
                        {
                            "volume_ml": {"value": m["volume_ml"], "unit": "ml"},
                            "mean_hu": {"value": m["mean_hu"], "unit": "[hnsf'U]"},
                            "mean_value": {"value": m["mean_value"], "unit": "stored"},
                            "voxel_count": {"value": m["voxel_count"], "unit": "voxels"},
                            "voxel_spacing_mm": list(spacing),
                            **inputs,
                            **extra,
                        },
                        sort_keys=True,
                    ),
                    "mask_path": rel,
                    "mask_checksum": mask_checksum,
                    "device": device,
                    "run_id": run_id,
                    "inferred_at": now,
                    "task": "segmentation",
                    "predicted": None,
                    "model_entry": entry.get("name"),
                    # issue #24: cohort keys, the label's instance, typed measurements
                    **cohort_columns(row),
                    "instance": instance,
                    "centre_mm": centre,
                    "size_mm": size,
                    "mean_value": m["mean_value"],
                    "diameter_mm": _value(extra.get("diameter_mm")),
                    "elongation": _value(extra.get("elongation")),
                }
            )
    if rows:
        sync_filesystem(lake.research)  # the masks, before the rows that point to them
        write_partition(lake, "findings", rows, part=part)
    after = seg.stats.as_dict()
    return {
        "volumes": len(tensors),
        "findings": len(rows),
        "stats": {k: after[k] - stats_before[k] for k in after if k != "wait_fraction"},
    }


def _value(measurement: Any) -> float | None:
    """The number of a ``{"value": ..., "unit": ...}`` measurement (None when absent)."""
    if isinstance(measurement, dict) and measurement.get("value") is not None:
        return float(measurement["value"])
    return None


def _candidates(
    labels: npt.NDArray[np.uint8],
    values: npt.NDArray[Any],
    spacing: tuple[float, float, float],
    hounsfield: bool,
    entry: dict[str, Any],
    first_free: int,
) -> list[tuple[str, int | None, int, dict[str, Any], dict[str, Any]]]:
    """Find the registry's lesion candidates; give each its own value in ``labels`` (in place).

    Returns (the class ``<name>``, the instance ``n``, value, codes, measurements) per
    candidate; the finding's unique name is ``<name>_<n>``.
    """
    from pipeline.infer.candidates import find_candidates

    out: list[tuple[str, int | None, int, dict[str, Any], dict[str, Any]]] = []
    voxel_ml = float(np.prod(spacing)) / 1000.0
    value = first_free
    for name, spec in sorted(entry["candidates"].items()):
        found = find_candidates(
            labels,
            int(spec["within_value"]),
            spacing,
            values=values if hounsfield else None,
            min_value=spec["min_hu"] if hounsfield else None,
            min_diameter_mm=spec["min_diameter_mm"],
            max_diameter_mm=spec["max_diameter_mm"],
            max_elongation=spec["max_elongation"],
            min_fill=spec["min_fill"],
            max_count=spec["max_count"],
        )
        for n, cand in enumerate(found, start=1):
            if value > np.iinfo(labels.dtype).max:
                logger.warning("too many candidates: %s_%d and later ones left out", name, n)
                return out
            labels[cand.box][cand.mask] = value
            mean = float(values[cand.box][cand.mask].astype(np.float64).mean())
            box = [s.start for s in cand.box] + [s.stop - 1 for s in cand.box]
            inside = np.nonzero(cand.mask)
            centroid = [float(ax.mean()) + s.start for ax, s in zip(inside, cand.box, strict=True)]
            measured = {
                "voxel_count": cand.voxel_count,
                "volume_ml": cand.voxel_count * voxel_ml,
                "mean_hu": mean if hounsfield else None,
                "mean_value": mean,
                "bbox": [int(b) for b in box],
                "centroid": centroid,
                "extra": {
                    "diameter_mm": {"value": round(cand.diameter_mm, 3), "unit": "mm"},
                    "elongation": {"value": round(cand.elongation, 3), "unit": "1"},
                },
            }
            out.append((name, n, value, spec, measured))
            value += 1
    return out


def tasks_of(per_task: int, total: int, workers: int) -> int:
    """Volumes per task: at most ``per_task``, and few enough that ``total`` volumes make a
    task for each of the ``workers`` (a model load per task is cheap beside an idle core:
    the demo's 7 volumes in one task of 8 ran on one of its 2 workers, 256 s; in 4 + 3, 169 s).
    """
    return max(1, min(per_task, -(-total // max(1, workers))))


def _todo(
    con: Any,
    lake: LakePaths,
    cfg: PipelineConfig,
    entry: Any,
    bundle: Any,
    per_task: int,
    progress: Progress | None = None,
    workers: int = 1,
    kinds: tuple[str, ...] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """The volumes without findings of this model, in tasks of at most ``per_task`` volumes,
    and fewer where that keeps every one of the ``workers`` busy (7 volumes on 2 workers: 4
    and 3, not one task of 7 on one worker beside an idle one)."""
    q = infer_todo(
        lake,
        entry=entry.name,
        model=bundle.name,
        applies_to=entry.applies_to,
        preprocessing_hash=cfg.tensors.preprocessing_hash(),
        version=bundle.version,
        weights_sha256=bundle.weights_sha256,
        tensor_kinds=kinds or ("volume",),
    )
    batch: list[dict[str, Any]] = []
    try:
        total = int(con.execute(q.total().sql, dict(q.params)).fetchall()[0][0])
        set_total(progress, total)
        per_task = tasks_of(per_task, total, workers)
        for rb in arrow_reader(con, q.sql, q.params, 256):
            for row in rb.to_pylist():
                batch.append(row)
                if len(batch) >= per_task:
                    yield batch
                    batch = []
    except Exception as exc:
        if type(exc).__module__.startswith("duckdb"):
            raise ConfigError(
                f"model {entry.name!r}: applies_to {entry.applies_to!r} does not run over the "
                f"series table ({str(exc).splitlines()[0]})"
            ) from None
        raise
    if batch:
        yield batch


def _class_names(bundle: Any) -> list[str]:
    from pipeline.infer.classify import class_names

    return list(class_names(bundle.metadata).values())


def _group_todo(
    con: Any,
    lake: LakePaths,
    cfg: PipelineConfig,
    entry: Any,
    bundle: Any,
    progress: Progress | None,
    refused: dict[str, str],
) -> Iterator[list[dict[str, Any]]]:
    """A multi-sequence model's studies (:mod:`pipeline.infer.inputs`), one per task; the
    refused ones (a channel missing or ambiguous) are put into ``refused`` with the reason."""
    from pipeline.infer.inputs import check_channels, match_inputs

    check_channels([c.name for c in entry.inputs], bundle.metadata, entry.name)
    groups = match_inputs(
        con,
        lake,
        applies_to=entry.applies_to,
        channels=[(c.name, c.where) for c in entry.inputs],
        preprocessing_hash=cfg.tensors.preprocessing_hash(),
        model=bundle.name,
        version=bundle.version,
        weights_sha256=bundle.weights_sha256,
    )
    refused.update(groups.refused)
    set_total(progress, len(groups.todo))
    for group in groups.todo:
        yield [group]


def _gpu_resources(cfg: PipelineConfig, client: Any) -> dict[str, float] | None:
    """Dask resources the tasks ask for: the GPU resource when the device is cuda on a
    cluster (``compute.scheduler``); on one machine inference runs in-process instead."""
    if client is None or cfg.compute.device != "cuda" or not cfg.compute.scheduler:
        return None
    name = cfg.infer.gpu_resource
    workers = client.scheduler_info().get("workers", {})
    if not any(w.get("resources", {}).get(name) for w in workers.values()):
        raise ModelError(
            f"compute.device is cuda but no Dask worker declares the resource {name!r}: start "
            f"GPU workers with `dask worker ... --resources {name}=1`"
        )
    return {name: 1}


def run(
    cfg: PipelineConfig,
    lake: LakePaths,
    *,
    run_id: str,
    client: Any = None,
    progress: Progress | None = None,
    model: str | None = None,
) -> InferRunResult:
    """Run ``model`` (default ``infer.model``) over the volumes it applies to."""
    from pipeline.infer.engine import augmentation_views
    from pipeline.infer.registry import TestTime, load_registry

    t0 = time.perf_counter()
    if not any(lake.table("tensors").rglob("*.parquet")):
        raise ModelError(
            f"no tensors in {lake.root}: run `pacsflow tensors --lake {lake.root}` first"
        )
    if cfg.compute.device == "cuda" and not cfg.compute.scheduler:
        from pipeline.infer.engine import cuda_problem

        problem = cuda_problem()  # this machine's GPU: checked here, before any work
        if problem:
            raise ModelError(f"compute.device is cuda, but {problem}")
    registry = load_registry(cfg.infer.registry)
    entry = registry.entry(model or cfg.infer.model)
    bundle, decision = load_entry_bundle(cfg, entry, lake.restricted / "cache" / "bundles")
    from pipeline.infer.classify import task_of

    task = task_of(bundle.metadata, entry.task)
    test_time = entry.test_time if cfg.infer.test_time_augmentation else TestTime()
    # a clear error before any task
    augmentation_views(test_time.mirror_axes, test_time.transpose_xy, bundle.spatial_dims)
    from pipeline.infer.detect import detector_of

    names = (
        _class_names(bundle)
        if task == "classification"
        else list(entry.output_labels.values()) or list(bundle.labels.values())
    )
    if (detector := detector_of(bundle.inferer)) is not None:
        classes = int(getattr(detector, "num_classes", 1) or 1)
        names = [entry.detection.class_name(c) for c in range(classes)]
    uncoded = uncoded_labels(entry, names, registry.path)
    if uncoded:
        logger.warning(
            "model %s: no code for label(s) %s (not in the registry entry nor its code tables "
            "%s): written back with a local %s code; add codes to the registry entry to fix",
            entry.name,
            ", ".join(uncoded),
            list(entry.code_tables),
            "99PACSFLOW",
        )
    resources = _gpu_resources(cfg, client)
    by_name = {name: value for value, name in bundle.labels.items()}
    candidates = {}
    for name, spec in entry.candidates.items():
        if spec.within not in by_name:
            raise ConfigError(
                f"model {entry.name!r}: candidates {name!r} are looked for within label "
                f"{spec.within!r}, which the bundle does not have ({', '.join(by_name)})"
            )
        candidates[name] = {**spec.model_dump(), "within_value": by_name[spec.within]}
    payload = {
        "name": entry.name,
        "bundle": str(bundle.path),
        "labels": {k: v.model_dump() for k, v in entry.labels.items()},
        "candidates": candidates,
        "test_time": test_time.model_dump(),
        "trust": {"mode": decision.mode, "digest": decision.digest},
        "overrides": dict(entry.overrides),
        "drop": list(entry.drop),
        "detection": entry.detection.model_dump(),
        "task": task,
        "output_labels": {int(k): v for k, v in entry.output_labels.items()},
    }
    refused: dict[str, str] = {}
    con = connect()
    done = {"volumes": 0, "findings": 0}
    stats: dict[str, float] = {}

    def calls() -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        workers = len(client.scheduler_info().get("workers", {})) if client is not None else 1
        if entry.inputs:
            todo = _group_todo(con, lake, cfg, entry, bundle, progress, refused)
        else:
            kinds = ("planar",) if task == "classification" and bundle.spatial_dims == 2 else None
            todo = _todo(con, lake, cfg, entry, bundle, cfg.infer.volumes_per_task, progress,
                         workers, kinds)  # fmt: skip
        for i, batch in enumerate(todo):
            yield (
                (cfg, batch),
                {
                    "lake": lake,
                    "run_id": run_id,
                    "part": f"{run_id}-{i:05d}",
                    "entry": payload,
                },
            )

    try:
        for result in map_bounded(infer_batch, calls(), client=client, resources=resources):
            done["volumes"] += result["volumes"]
            done["findings"] += result["findings"]
            for k, v in result["stats"].items():
                stats[k] = stats.get(k, 0.0) + v
            if progress:
                progress(result["volumes"])
    finally:
        con.close()
    seconds = round(time.perf_counter() - t0, 3)
    counts = StageCounts(
        seen=done["volumes"],
        out=done["volumes"],
        quarantined=0,
        seconds=seconds,
        extra={
            "findings": done["findings"],
            "model": bundle.ref,
            "engine": {k: round(v, 3) for k, v in stats.items()},
            **({"refused_studies": len(refused)} if entry.inputs else {}),
            "uncoded_labels": uncoded,
        },
    )
    logger.info(
        "infer: %s over %d volumes, %d findings rows in %.1f s",
        bundle.ref,
        done["volumes"],
        done["findings"],
        seconds,
    )
    return InferRunResult(run_id, bundle.ref, counts)
