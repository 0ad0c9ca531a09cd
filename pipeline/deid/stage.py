"""The deid stage: restricted index -> de-identified research tables (+ the restricted vault).

1. DuckDB streams the current index rows (state ``indexed``) whose header fingerprint the
   vault has not de-identified yet (incremental; bounded memory);
2. workers read each object's header through the connector that crawled it (never pixels),
   de-identify it (:class:`~pipeline.deid.core.Deidentifier`), and write a part file of
   ``research/tables/instances`` and of ``restricted/vault`` (the way back, and the state);
   objects that may carry burned-in PHI (BurnedInAnnotation YES, or ultrasound, secondary
   capture, other and document classes) are quarantined, fail closed;
3. ``series``, ``studies`` and ``patients`` are rebuilt from ``instances``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline._version import __version__
from pipeline.compute import map_bounded
from pipeline.config import PipelineConfig
from pipeline.connectors import Source, open_source
from pipeline.deid.core import Deidentifier
from pipeline.deid.keys import Pseudonymizer
from pipeline.enums import QuarantineReason, Stage
from pipeline.errors import InputError, SourceError, UnreadableDicom
from pipeline.lake import LakePaths, StageCounts, write_partition
from pipeline.lake.duck import arrow_reader, arrow_table, connect, latest_sql, scan_sql

logger = logging.getLogger(__name__)

__all__ = ["DEID_VERSION", "DeidRunResult", "deid_batch", "run"]

DEID_VERSION = f"pacsflow-{__version__}+ps3.15-2026d"
Progress = Callable[[int], None]

#: Classes whose pixels often carry burned-in text: quarantined unless cleared (fail closed).
_HIGH_RISK_MODALITIES = frozenset({"US", "SC", "OT", "DOC", "XC", "GM", "SM", "ES"})
_HIGH_RISK_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture family
    "1.2.840.10008.5.1.4.1.1.104",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # video photographic
    "1.2.840.10008.5.1.4.1.1.3.1",  # ultrasound multi-frame
    "1.2.840.10008.5.1.4.1.1.6",  # ultrasound
)


@dataclass(frozen=True)
class DeidRunResult:
    """What one deid run did, in numbers."""

    run_id: str
    counts: StageCounts


def _burned_in_risk(ds: Any) -> str | None:
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "BurnedInAnnotation is YES"
    if str(ds.get("Modality", "")).upper() in _HIGH_RISK_MODALITIES:
        return f"modality {ds.get('Modality')} often carries burned-in text"
    sop = str(ds.get("SOPClassUID", ""))
    if sop.startswith(_HIGH_RISK_CLASS_PREFIXES):
        return "this SOP class often carries burned-in text"
    return None


def _floats(value: Any) -> list[float] | None:
    if value is None or value == "":
        return None
    try:
        return [float(v) for v in (value if hasattr(value, "__len__") else [value])]
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    vals = _floats(value)
    return vals[0] if vals else None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _date(value: Any) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value)[:8], "%Y%m%d").date() if value else None
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _source_for(cfg: PipelineConfig, lake: LakePaths, source_id: str) -> Source:
    """Reopen the connector that crawled an object: a source id is a valid source URI."""
    return open_source(source_id, cfg.source, cache_dir=lake.restricted / "cache")


def _export(ds: Any, folder: Any) -> None:
    """Write a de-identified dataset as a Part 10 file, atomically, named by pseudonyms."""
    import io
    from pathlib import Path

    from pipeline.lake import atomic_write_bytes

    path = Path(folder) / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue())


def _quarantine_row(
    row: dict[str, Any],
    reason: QuarantineReason,
    error_class: str,
    message: str,
    run_id: str,
    now: dt.datetime,
) -> dict[str, Any]:
    return {
        "object_key": row["object_key"],
        "source": row["source"],
        "location": row["location"],
        "unit_key": row["unit_key"],
        "stage": Stage.DEID.value,
        "reason": reason.value,
        "error_class": error_class,
        "message": message,
        "size_bytes": row["size_bytes"],
        "mtime_ns": row["mtime_ns"],
        "run_id": run_id,
        "quarantined_at": now,
    }


def deid_batch(
    cfg: PipelineConfig,
    rows: list[dict[str, Any]],
    *,
    secret_key: bytes,
    lake: LakePaths,
    run_id: str,
    part: str,
) -> dict[str, int]:
    """De-identify a batch of index rows; write instances, vault and quarantine part files."""
    import pydicom

    now = dt.datetime.now(dt.UTC)
    pseudo = Pseudonymizer(secret_key)
    deid = Deidentifier(pseudo, cfg.deid.options)
    sources: dict[str, Source] = {}
    instances, vault, quarantine = [], [], []
    for row in rows:
        try:
            source = sources.get(row["source"]) or _source_for(cfg, lake, row["source"])
            sources[row["source"]] = source
            export = cfg.deid.export_dicom
            with source.open(row["location"]) as fp:
                ds = pydicom.dcmread(fp, stop_before_pixels=export is None, force=True)
            risk = _burned_in_risk(ds)
            if risk:
                raise InputError(
                    f"may carry burned-in PHI ({risk}); quarantined until a rule clears it",
                    reason=QuarantineReason.BURNED_IN_PHI,
                )
            out = deid.deidentify(ds).dataset
            if export is not None:
                _export(out, export)
        except (InputError, SourceError, OSError) as exc:
            if cfg.deid.on_invalid == "raise":
                raise
            reason = exc.reason if isinstance(exc, InputError) else QuarantineReason.UNREADABLE
            message = str(exc) if isinstance(exc, InputError) else type(exc).__name__
            quarantine.append(
                _quarantine_row(row, reason, type(exc).__name__, message, run_id, now)
            )
            continue
        except Exception as exc:  # pydicom on a corrupt header
            err = UnreadableDicom(f"header cannot be de-identified ({type(exc).__name__})")
            if cfg.deid.on_invalid == "raise":
                raise err from exc
            quarantine.append(
                _quarantine_row(row, err.reason, type(err).__name__, str(err), run_id, now)
            )
            continue
        token = str(out.get("PatientID", "")) or pseudo.token(row.get("PatientID") or "")
        instances.append(
            {
                "SOPInstanceUID": str(out.SOPInstanceUID),
                "SeriesInstanceUID": str(out.SeriesInstanceUID),
                "StudyInstanceUID": str(out.StudyInstanceUID),
                "patient_token": token,
                "SOPClassUID": _text(out.get("SOPClassUID")),
                "Modality": _text(out.get("Modality")),
                "InstanceNumber": _int(out.get("InstanceNumber")),
                "ImagePositionPatient": _floats(out.get("ImagePositionPatient")),
                "ImageOrientationPatient": _floats(out.get("ImageOrientationPatient")),
                "PixelSpacing": _floats(out.get("PixelSpacing")),
                "SliceThickness": _float(out.get("SliceThickness")),
                "Rows": _int(out.get("Rows")),
                "Columns": _int(out.get("Columns")),
                "NumberOfFrames": _int(out.get("NumberOfFrames")),
                "Manufacturer": _text(out.get("Manufacturer")),
                "ManufacturerModelName": _text(out.get("ManufacturerModelName")),
                "ContentDate": _date(out.get("ContentDate") or out.get("StudyDate")),
                "PatientAge": _text(out.get("PatientAge")),
                "PatientSex": _text(out.get("PatientSex")),
                "header_json": out.to_json(
                    bulk_data_threshold=1024, bulk_data_element_handler=lambda _e: ""
                ),
                "deid_version": DEID_VERSION,
            }
        )
        vault.append(
            {
                "object_key": row["object_key"],
                "fingerprint": row["fingerprint"],
                "PatientID": _text(ds.get("PatientID")),
                "PatientName": _text(ds.get("PatientName")),
                "PatientBirthDate": _text(ds.get("PatientBirthDate")),
                "AccessionNumber": _text(ds.get("AccessionNumber")),
                "StudyInstanceUID": str(ds.StudyInstanceUID),
                "SeriesInstanceUID": str(ds.SeriesInstanceUID),
                "SOPInstanceUID": str(ds.SOPInstanceUID),
                "patient_token": token,
                "study_pseudonym": str(out.StudyInstanceUID),
                "series_pseudonym": str(out.SeriesInstanceUID),
                "sop_pseudonym": str(out.SOPInstanceUID),
                "deid_version": DEID_VERSION,
                "run_id": run_id,
                "deidentified_at": now,
            }
        )
    if instances:
        write_partition(lake, "instances", instances, part=part)
    if quarantine:
        write_partition(lake, "quarantine", quarantine, part=f"deid-{part}")
    if vault:  # last: it commits the batch (a rerun skips what the vault holds)
        write_partition(lake, "vault", vault, part=part)
    return {"out": len(instances), "quarantined": len(quarantine)}


def _todo(con: Any, lake: LakePaths, batch: int) -> Iterator[list[dict[str, Any]]]:
    index_latest = latest_sql(lake, "index", "object_key", "crawled_at")
    q_deid = f"(SELECT object_key FROM {scan_sql(lake, 'quarantine')} WHERE stage = 'deid')"
    sql = f"""
        SELECT i.object_key, i.source, i.location, i.unit_key, i.PatientID, i.fingerprint,
               i.size_bytes, i.mtime_ns
        FROM {index_latest} i
        LEFT JOIN {scan_sql(lake, "vault")} v
          ON v.object_key = i.object_key AND v.fingerprint IS NOT DISTINCT FROM i.fingerprint
        WHERE i.state = 'indexed' AND v.object_key IS NULL
          AND i.object_key NOT IN {q_deid}
        ORDER BY i.object_key
    """
    rows: list[dict[str, Any]] = []
    for rb in arrow_reader(con, sql, None, 10_000):
        rows.extend(rb.to_pylist())
        while len(rows) >= batch:
            yield rows[:batch]
            rows = rows[batch:]
    if rows:
        yield rows


def _series_geometry(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Volume geometry summary of one series: can it become a volume, and if not, why."""
    n = len(rows)
    sizes = {(r["Rows"], r["Columns"]) for r in rows}
    orients = {
        tuple(np.round(r["ImageOrientationPatient"], 4))
        for r in rows
        if r["ImageOrientationPatient"]
    }
    out: dict[str, Any] = {
        "n_instances": n,
        "Rows": rows[0]["Rows"],
        "Columns": rows[0]["Columns"],
        "orientation": list(next(iter(orients))) if len(orients) == 1 else None,
        "PixelSpacing": rows[0]["PixelSpacing"],
        "slice_spacing": None,
        "slice_spacing_uniform": None,
        "volume_shape": None,
        "volume_ok": False,
        "volume_reason": None,
    }
    multiframe = [r for r in rows if (r["NumberOfFrames"] or 1) > 1]
    if multiframe:
        out["volume_reason"] = "multi-frame objects: per-frame geometry (issue #5)"
        return out
    if n < 2:
        out["volume_reason"] = "fewer than 2 slices"
        return out
    if len(sizes) != 1:
        out["volume_reason"] = "more than one frame size"
        return out
    if len(orients) != 1 or any(not r["ImagePositionPatient"] for r in rows):
        out["volume_reason"] = "mixed or missing orientation/position"
        return out
    o = np.array(next(iter(orients)), dtype=float)
    normal = np.cross(o[:3], o[3:])
    positions = sorted(float(np.dot(normal, r["ImagePositionPatient"])) for r in rows)
    steps = np.diff(positions)
    if np.any(np.isclose(steps, 0.0, atol=1e-3)):
        out["volume_reason"] = "duplicate slice positions"
        return out
    spacing = float(np.median(steps))
    uniform = bool(np.allclose(steps, spacing, rtol=0.01, atol=0.01))
    out.update(
        slice_spacing=spacing,
        slice_spacing_uniform=uniform,
        volume_shape=[n, rows[0]["Rows"], rows[0]["Columns"]],
        volume_ok=uniform,
        volume_reason=None if uniform else "non-uniform slice spacing (gaps or variable)",
    )
    return out


def _rebuild_aggregates(con: Any, lake: LakePaths) -> None:
    inst = scan_sql(lake, "instances")
    cols = (
        "SeriesInstanceUID, StudyInstanceUID, patient_token, Modality, Manufacturer, "
        "ContentDate, Rows, Columns, ImageOrientationPatient, ImagePositionPatient, "
        "PixelSpacing, NumberOfFrames, header_json"
    )
    series_rows: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []

    def flush() -> None:
        if not current:
            return
        first = current[0]
        import json

        header = json.loads(first["header_json"])
        body = header.get("00180015", {}).get("Value", [None])[0]
        series_rows.append(
            {
                "SeriesInstanceUID": first["SeriesInstanceUID"],
                "StudyInstanceUID": first["StudyInstanceUID"],
                "patient_token": first["patient_token"],
                "Modality": first["Modality"],
                "BodyPartExamined": body,
                "Manufacturer": first["Manufacturer"],
                "SeriesDate": min(
                    (r["ContentDate"] for r in current if r["ContentDate"]), default=None
                ),
                **_series_geometry(current),
            }
        )
        current.clear()

    sql = f"SELECT {cols} FROM {inst} ORDER BY SeriesInstanceUID, SOPInstanceUID"
    for rb in arrow_reader(con, sql, None, 10_000):
        for row in rb.to_pylist():
            if current and row["SeriesInstanceUID"] != current[0]["SeriesInstanceUID"]:
                flush()
            current.append(row)
    flush()
    write_partition(lake, "series", series_rows, part="all")
    studies = arrow_table(
        con,
        f"""SELECT StudyInstanceUID, any_value(patient_token) AS patient_token,
                   min(ContentDate) AS StudyDate, any_value(PatientAge) AS PatientAge,
                   list_sort(list_distinct(list(Modality))) AS ModalitiesInStudy,
                   count(DISTINCT SeriesInstanceUID) AS n_series, count(*) AS n_instances
            FROM {inst} GROUP BY StudyInstanceUID ORDER BY StudyInstanceUID""",
    )
    write_partition(lake, "studies", studies, part="all")
    patients = arrow_table(
        con,
        f"""SELECT patient_token, any_value(PatientSex) AS PatientSex,
                   count(DISTINCT StudyInstanceUID) AS n_studies,
                   count(DISTINCT SeriesInstanceUID) AS n_series, count(*) AS n_instances
            FROM {inst} GROUP BY patient_token ORDER BY patient_token""",
    )
    write_partition(lake, "patients", patients, part="all")


def run(
    cfg: PipelineConfig,
    lake: LakePaths,
    *,
    key: bytes,
    run_id: str,
    client: Any = None,
    progress: Progress | None = None,
) -> DeidRunResult:
    """De-identify the new objects of the restricted index into the research tables."""
    t0 = time.perf_counter()
    con = connect()
    done = {"out": 0, "quarantined": 0}
    counted: list[int] = []

    def calls() -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        for i, rows in enumerate(_todo(con, lake, cfg.compute.partition_size)):
            counted.append(len(rows))
            kwargs = {
                "secret_key": key,
                "lake": lake,
                "run_id": run_id,
                "part": f"{run_id}-{i:05d}",
            }
            yield (cfg, rows), kwargs

    for result in map_bounded(deid_batch, calls(), client=client):
        for k in done:
            done[k] += result[k]
        if progress:
            progress(result["out"] + result["quarantined"])
    seen = sum(counted)
    has_instances = any(lake.table("instances").glob("*.parquet"))
    if has_instances and (seen or not any(lake.table("series").glob("*.parquet"))):
        _rebuild_aggregates(con, lake)
    con.close()
    counts = StageCounts(
        seen=seen,
        out=done["out"],
        quarantined=done["quarantined"],
        seconds=round(time.perf_counter() - t0, 3),
    )
    logger.info(
        "deid: %d objects, %d de-identified, %d quarantined in %.1f s",
        seen,
        counts.out,
        counts.quarantined,
        counts.seconds,
    )
    return DeidRunResult(run_id, counts)
