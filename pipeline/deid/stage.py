"""The deid stage: restricted index -> de-identified research tables (+ the restricted vault).

1. DuckDB streams the current index rows (state ``indexed``) whose header fingerprint the
   vault has not de-identified yet (incremental; bounded memory);
2. workers read each object's header through the connector that crawled it (never pixels),
   de-identify it (:class:`~pipeline.deid.core.Deidentifier`), and write a part file of
   ``research/tables/instances`` and of ``restricted/vault`` (the way back, and the state);
   objects that may carry burned-in PHI (BurnedInAnnotation YES, or ultrasound, secondary
   capture, other and document classes) are quarantined, fail closed, unless
   ``deid.clean_pixels`` removes their burned-in text (:mod:`pipeline.deid.pixels`);
3. ``series``, ``studies`` and ``patients`` are rebuilt from ``instances``.

The research tables are Delta tables: a batch's instances are one commit, and an object that
comes again (a corrected header, the same instance stored twice) replaces its row in that
commit; each aggregate rebuild is one commit that names the ``instances`` version it was built
from.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydicom.multival import MultiValue

from pipeline._version import __version__
from pipeline.compute import map_bounded, set_total
from pipeline.config import LimitsConfig, PipelineConfig
from pipeline.connectors import Source, open_source
from pipeline.deid.core import Deidentifier
from pipeline.deid.encode import encode_part10, pixel_tail, tail_encoding, write_with_tail
from pipeline.deid.pixels import clean_pixels
from pipeline.deid.vault import ORIGINAL_COLUMNS, VaultCipher
from pipeline.dicom.header import read_part10_header
from pipeline.dicom.limits import check_inflated_size, check_pixels, deflated_header, read_capped
from pipeline.dicom.sopclass import is_volume_candidate_class
from pipeline.enums import QuarantineReason, Stage
from pipeline.errors import (
    InputError,
    MalformedValue,
    MissingAttribute,
    SourceError,
    UnreadableDicom,
)
from pipeline.lake import (
    LakePaths,
    StageCounts,
    delta,
    read_table,
    sync_filesystem,
    table_exists,
    write_partition,
)
from pipeline.lake.duck import (
    arrow_reader,
    arrow_table,
    connect,
    volume_verdicts,
)
from pipeline.lake.io import commit_rows, conform, partition_value
from pipeline.lake.keys import LakeKeys
from pipeline.lake.queries import (
    OWN_UIDS,
    deid_export_todo,
    deid_new_objects,
    deid_own_results,
    deid_patients,
    deid_series_instances,
    deid_studies,
)
from pipeline.lake.schemas import INSTANCES, schema_for
from pipeline.lake.space import no_space_in

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


def _burned_in_risk(ds: Any, allowed: frozenset[str] = frozenset()) -> str | None:
    """Why the pixels may carry burned-in PHI, or None (fail closed).

    ``allowed`` holds modalities or SOP Class UIDs the site has cleared (config
    ``deid.allow_burned_in``); BurnedInAnnotation YES is never cleared by it.
    """
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "BurnedInAnnotation is YES"
    modality = str(ds.get("Modality", "")).upper()
    sop = str(ds.get("SOPClassUID", ""))
    if modality in allowed or sop in allowed:
        return None
    if modality in _HIGH_RISK_MODALITIES:
        return f"modality {modality} often carries burned-in text"
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
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    if number is not None and not -(2**63) <= number < 2**63:
        return None  # beyond the column's int64: as malformed as a non-number
    return number


def _date(value: Any) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value)[:8], "%Y%m%d").date() if value else None
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


#: the original UIDs without which an object cannot be de-identified (nor found again)
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def _originals(ds: Any) -> dict[str, str | None]:
    """The vault's original identifiers of ``ds`` (:data:`ORIGINAL_COLUMNS`): several values
    joined by backslashes; Other Patient IDs with the Patient IDs of Other Patient IDs
    Sequence (what `pacsflow verify` searches the research zone for)."""
    out: dict[str, str | None] = {}
    for key in ORIGINAL_COLUMNS:
        if key not in _MULTI_VALUED:
            out[key] = _text(ds.get(key))
            continue
        values = _values(ds.get(key))
        if key == "OtherPatientIDs":
            for item in ds.get("OtherPatientIDsSequence") or ():
                values += _values(item.get("PatientID"))
        out[key] = "\\".join(v for v in values if v.strip()) or None
    return out


_MULTI_VALUED = frozenset({"OtherPatientIDs", "OtherPatientNames", "PatientTelephoneNumbers"})


def _values(value: Any) -> list[str]:
    """The values of a text element (VM 1-n) as strings."""
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _texts(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return [str(value)]
    return [str(v) for v in value]


def _converter(field: pa.Field) -> Callable[[Any], Any]:
    t = field.type
    if pa.types.is_list(t):
        return _floats if pa.types.is_floating(t.value_type) else _texts
    if pa.types.is_integer(t):
        return _int
    if pa.types.is_floating(t):
        return _float
    if pa.types.is_date(t):
        return _date
    return _text


#: instances columns filled from the de-identified header by keyword, with their converters
_TYPED = {
    f.name: _converter(f)
    for f in INSTANCES
    if f.name not in {"patient_token", "header_json", "deid_version", "TransferSyntaxUID"}
}


def _instance_row(out: Any, token: str) -> dict[str, Any]:
    """The research ``instances`` row of a de-identified dataset."""
    row: dict[str, Any] = {}
    for name, convert in _TYPED.items():
        try:
            row[name] = convert(out.get(name))
        except Exception:  # a malformed value (wrong VM, bad number) becomes null
            row[name] = None
    if row["ContentDate"] is None:
        row["ContentDate"] = row["StudyDate"]
    meta = getattr(out, "file_meta", None)
    row.update(
        patient_token=token,
        TransferSyntaxUID=_text(meta.get("TransferSyntaxUID")) if meta is not None else None,
        header_json=out.to_json(bulk_data_threshold=1024, bulk_data_element_handler=lambda _e: ""),
        deid_version=DEID_VERSION,
    )
    return row


def _bad_value(ds: Any, depth: int = 0) -> MalformedValue | None:
    """The first element of ``ds`` (at any sequence depth) whose value pydicom cannot convert
    as its VR says, as an error naming the attribute (never the value); None when every
    value converts (or there is no dataset)."""
    if ds is None or depth > 32:
        return None
    try:
        tags = list(ds.keys())
    except Exception:
        return None
    for tag in tags:
        try:
            elem = ds[tag]
            value = elem.value
            if elem.VR == "SQ":
                for item in value:
                    found = _bad_value(item, depth + 1)
                    if found is not None:
                        return found
                continue
            # what building header_json does with it (numbers are converted only there)
            elem.to_json_dict(bulk_data_element_handler=lambda _e: "", bulk_data_threshold=1024)
        except Exception:
            from pydicom.datadict import keyword_for_tag

            name = keyword_for_tag(tag) or "a private attribute"
            return MalformedValue(
                f"{name} ({tag >> 16:04X},{tag & 0xFFFF:04X}) holds a value its VR does not "
                "allow; fix it at the source to de-identify the object"
            )
    return None


def _source_for(cfg: PipelineConfig, lake: LakePaths, source_id: str) -> Source:
    """Reopen the connector that crawled an object: a source id is a valid source URI."""
    return open_source(
        source_id, cfg.source, cache_dir=lake.restricted / "cache", limits=cfg.limits
    )


def read_object(
    fp: Any, export: bool, *, fast: bool = True, limits: LimitsConfig | None = None
) -> tuple[Any, Any, tuple[int, int] | None]:
    """Read an object for de-identification: (dataset, file, pixel tail).

    The header only; for an export, where the Pixel Data element ends the file its offset and
    size (``tail``) so that :func:`_export` copies it as bytes, else the whole object. The
    header is read by :func:`pipeline.dicom.header.read_part10_header` (the same dataset as
    pydicom's, about 1.7x faster) and by ``pydicom.dcmread`` where it declines (or with
    ``fast=False``, the reference the tests compare against).

    Declared sizes are bounded by ``limits`` before anything is allocated or inflated: a
    deflated object's header is inflated only as far as its pixel data
    (:func:`pipeline.dicom.limits.deflated_header`), declared pixel data beyond the limits is
    refused, and an object read whole for the export may hold (or inflate to) no more than a
    header and pixel data within them.

    Raises
    ------
    TooLarge
        A declared size is beyond ``limits``.
    """
    import pydicom

    limits = limits or LimitsConfig()
    if not fp.seekable():  # a stream: read it (within the bound) to go back
        fp = io.BytesIO(read_capped(fp, limits))
    ds = read_part10_header(fp) if fast else None
    deflated = None
    if ds is None:
        fp.seek(0)
        deflated = deflated_header(fp, limits)
        ds = pydicom.dcmread(
            fp if deflated is None else deflated.stream, stop_before_pixels=True, force=True
        )
    check_pixels(ds, limits)
    tail = None
    if export:
        enc = tail_encoding(ds) if deflated is None else None
        tail = pixel_tail(fp, *enc) if enc is not None else None
        if tail is None:  # pixel data not last, or re-encoded: read it all
            fp.seek(0)
            data = read_capped(fp, limits)
            if deflated is not None:
                check_inflated_size(memoryview(data)[deflated.dataset_offset :], limits)
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    return ds, fp, tail


def _read_whole(fp: Any, limits: LimitsConfig) -> tuple[Any, Any]:
    """Read the whole object at ``fp`` (pixels included, within ``limits``) to clean its
    pixels: (dataset, a seekable file of its bytes)."""
    import pydicom

    fp.seek(0)
    data = io.BytesIO(read_capped(fp, limits))
    ds = pydicom.dcmread(data, force=True)
    check_pixels(ds, limits)
    return ds, data


def _export(ds: Any, folder: Any, source: Any = None, tail: tuple[int, int] | None = None) -> Path:
    """Write a de-identified dataset as a Part 10 file, atomically, named by pseudonyms;
    return its path (``folder/<study>/<series>/<instance>.dcm``).

    With ``tail`` (offset and size of the Pixel Data element in ``source``, see
    :func:`pipeline.deid.encode.pixel_tail`) the header is encoded and the pixel data copied
    as bytes. Not fsynced file by file: :func:`deid_batch` flushes the export folder's
    filesystem once per batch (before the vault row commits the batch).
    """
    from pipeline.lake import atomic_write_bytes

    path = Path(folder) / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    if tail is not None:
        write_with_tail(path, encode_part10(ds), source, tail)
    else:
        atomic_write_bytes(path, encode_part10(ds), durable=False)
    return path


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
    export_only: bool = False,
    instances_only: bool = False,
) -> dict[str, int]:
    """De-identify a batch of index rows; write instances, vault and quarantine part files.

    With ``export_only`` the rows are objects the vault already holds whose de-identified DICOM
    export is missing: the same engine runs again (deterministic, so the same output) and only
    the export is written. With ``instances_only`` (``pacsflow repair``) only their
    ``instances`` rows are committed again: the vault holds them already.
    """

    now = dt.datetime.now(dt.UTC)
    pseudo = LakeKeys(secret_key).pseudonymizer()
    deid = Deidentifier.from_config(pseudo, cfg.deid)
    # a lake encrypted at rest always encrypts its vault
    sealed = cfg.deid.encrypt_vault or lake.encrypted_at_rest
    cipher = VaultCipher(secret_key) if sealed else None
    allowed = frozenset(v.upper() if "." not in v else v for v in cfg.deid.allow_burned_in)
    clean = cfg.deid.clean_pixels
    export = cfg.deid.export_dicom
    sources: dict[str, Source] = {}
    instances, vault, quarantine = [], [], []
    ds: Any = None
    exported = 0
    for row in rows:
        ds = None
        try:
            source = sources.get(row["source"]) or _source_for(cfg, lake, row["source"])
            sources[row["source"]] = source
            with source.open(row["location"]) as fp, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's warnings quote header values
                ds, fp, tail = read_object(fp, export is not None, limits=cfg.limits)
                risk = _burned_in_risk(ds, allowed)
                cleaned = None
                if risk and not clean.enabled:
                    raise InputError(
                        f"may carry burned-in PHI ({risk}); quarantined until a rule clears it",
                        reason=QuarantineReason.BURNED_IN_PHI,
                    )
                if risk:  # read it whole and remove the text, or quarantine (fail closed)
                    ds, fp = _read_whole(fp, cfg.limits)
                    tail = None
                    cleaned = clean_pixels(ds, clean)
                original = _originals(ds)
                missing = [k for k in _REQUIRED_UIDS if not original[k]]
                if missing:
                    raise MissingAttribute(f"no {', '.join(missing)}: cannot be de-identified")
                out = deid.deidentify(  # ds is ours: no copy
                    ds, in_place=True, clean_pixels=cleaned is not None
                ).dataset
                token = str(out.get("PatientID", "")) or pseudo.token(row.get("PatientID") or "")
                # before the export: an object whose header cannot be written is neither
                instance = _instance_row(out, token)
                if export is not None and not instances_only:
                    _export(out, export, fp, tail)
                    exported += 1
        except (InputError, SourceError, OSError) as exc:
            if no_space_in(exc) is not None:  # a full disk is not the object's fault
                raise
            if cfg.deid.on_invalid == "raise":
                raise
            reason = exc.reason if isinstance(exc, InputError) else QuarantineReason.UNREADABLE
            message = str(exc) if isinstance(exc, InputError) else type(exc).__name__
            quarantine.append(
                _quarantine_row(row, reason, type(exc).__name__, message, run_id, now)
            )
            continue
        except Exception as exc:  # pydicom on a corrupt header, or a value it cannot convert
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's warnings quote header values
                bad = _bad_value(ds)
            err = bad or UnreadableDicom(f"header cannot be de-identified ({type(exc).__name__})")
            if cfg.deid.on_invalid == "raise":
                raise err from exc
            quarantine.append(
                _quarantine_row(row, err.reason, type(err).__name__, str(err), run_id, now)
            )
            continue
        if export_only:
            continue
        instances.append(instance)
        entry = {
            "object_key": row["object_key"],
            "fingerprint": row["fingerprint"],
            **original,
            "patient_token": token,
            "study_pseudonym": str(out.StudyInstanceUID),
            "series_pseudonym": str(out.SeriesInstanceUID),
            "sop_pseudonym": str(out.SOPInstanceUID),
            "deid_version": DEID_VERSION,
            "run_id": run_id,
            "deidentified_at": now,
            "pixel_redactions": (
                json.dumps([list(b) for b in cleaned.boxes]) if cleaned is not None else None
            ),
        }
        vault.append(cipher.encrypt_row(entry) if cipher else entry)
    if export is not None and exported:
        sync_filesystem(Path(export))  # one flush for the batch (before the vault commits it)
    if export_only:  # a failure here is not a quarantine: the object is de-identified
        return {
            "out": 0,
            "quarantined": 0,
            "exported": exported,
            "export_failed": len(quarantine),
            "superseded": 0,
        }
    superseded = 0
    if instances:  # one commit; rows of objects the table holds are replaced in it
        superseded = commit_rows(lake, "instances", instances).replaced
    if instances_only:
        return {
            "out": len(instances),
            "quarantined": len(quarantine),
            "exported": 0,
            "export_failed": 0,
            "superseded": superseded,
        }
    if quarantine:
        write_partition(lake, "quarantine", quarantine, part=f"deid-{part}")
    if vault:  # last: it commits the batch (a rerun skips what the vault holds)
        write_partition(lake, "vault", vault, part=part)
    return {
        "out": len(instances),
        "quarantined": len(quarantine),
        "exported": exported,
        "export_failed": 0,
        "superseded": superseded,
    }


def _register_own_uids(con: Any, lake: LakePaths) -> None:
    """Register :data:`~pipeline.lake.queries.OWN_UIDS` on ``con``: the SOP Instance UIDs
    write-back gave pacsflow's own results, in the form the index holds UIDs (sealed in a lake
    encrypted at rest). A crawl of the PACS they were stored into finds them again; they are
    never research data."""
    import pyarrow as pa

    uids = read_table(lake, "outbox", columns=["result_uid"]).column("result_uid").to_pylist()
    sealer = lake.sealer()
    if sealer is not None:
        uids = [sealer.seal("uid", u) for u in uids]
    con.register(OWN_UIDS, pa.table({"uid": pa.array(sorted(set(uids)), pa.string())}))


def _own_results(con: Any, lake: LakePaths) -> int:
    """How many new indexed objects are pacsflow's own results (skipped)."""
    _register_own_uids(con, lake)
    rows = con.execute(deid_own_results(lake).sql).fetchall()
    return int(rows[0][0])


def _todo(
    con: Any, lake: LakePaths, batch: int, progress: Progress | None = None
) -> Iterator[list[dict[str, Any]]]:
    _register_own_uids(con, lake)
    q = deid_new_objects(lake)
    if progress is not None:
        n = con.execute(q.total().sql, dict(q.params)).fetchall()[0][0]
        set_total(progress, int(n))
    rows: list[dict[str, Any]] = []
    opened = lake.opener("index")
    for rb in arrow_reader(con, q.sql, q.params, 10_000):
        rows.extend(opened(r) for r in rb.to_pylist())
        while len(rows) >= batch:
            yield rows[:batch]
            rows = rows[batch:]
    if rows:
        yield rows


def _export_todo(
    con: Any, lake: LakePaths, batch: int, folder: Path
) -> Iterator[list[dict[str, Any]]]:
    """Objects de-identified in earlier runs whose export file is missing under ``folder``."""
    q = deid_export_todo(lake)
    opened = lake.opener("index")
    rows: list[dict[str, Any]] = []
    for rb in arrow_reader(con, q.sql, q.params, 10_000):
        for r in rb.to_pylist():
            r = opened(r)
            path = (
                folder / r["study_pseudonym"] / r["series_pseudonym"] / f"{r['sop_pseudonym']}.dcm"
            )
            if not path.exists():
                rows.append(r)
        while len(rows) >= batch:
            yield rows[:batch]
            rows = rows[batch:]
    if rows:
        yield rows


def _series_geometry(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Volume geometry summary of one series: can it become a volume, and if not, why.

    Only its volume candidates count (objects with an image matrix, not of a non-image SOP
    class: :func:`~pipeline.dicom.sopclass.is_volume_candidate_class`); a series without any
    is no candidate at all (``volume_ok`` null, issue #21) rather than a refused volume.
    """
    n = len(rows)
    candidates = [
        r for r in rows if is_volume_candidate_class(r.get("SOPClassUID"), r["Rows"] is not None)
    ]
    if not candidates:
        return {
            "n_instances": n,
            "Rows": None,
            "Columns": None,
            "orientation": None,
            "PixelSpacing": None,
            "slice_spacing": None,
            "slice_spacing_uniform": None,
            "volume_shape": None,
            "volume_ok": None,
            "volume_reason": "no volume candidate: no image objects (e.g. SR, PR, KO, SEG, RT)",
        }
    rows = candidates
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
    if len(rows) < 2:
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
        volume_shape=[len(rows), rows[0]["Rows"], rows[0]["Columns"]],
        volume_ok=uniform,
        volume_reason=None if uniform else "non-uniform slice spacing (gaps or variable)",
    )
    return out


#: commit metadata naming the ``instances`` version an aggregate was built from
BUILT_FROM = "pacsflow.instances_version"


def _aggregates_stale(lake: LakePaths) -> bool:
    """True when an aggregate table is missing or was not built from the latest ``instances``
    version (a run killed between the two commits)."""
    current = str(delta.current_version(lake, "instances"))
    return any(
        delta.last_commit_metadata(lake, name).get(BUILT_FROM) != current
        for name in ("series", "studies", "patients")
    )


#: series rows held before a part file is written (memory bounded by this, not the archive)
_SERIES_CHUNK = 20_000


def _rebuild_aggregates(con: Any, lake: LakePaths) -> None:
    """Rebuild ``series``, ``studies`` and ``patients`` from ``instances`` (streaming): each
    one Delta commit that replaces the table and names the ``instances`` version read."""
    version = delta.current_version(lake, "instances")
    built_from = {BUILT_FROM: str(version)}
    series_rows: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    verdicts = volume_verdicts(con, lake)  # taken on the pixels: outranks the header's

    def first(key: str) -> Any:
        return next((r[key] for r in current if r[key] is not None), None)

    def flush() -> None:
        if not current:
            return
        dates = [r["SeriesDate"] or r["ContentDate"] for r in current]
        series_rows.append(
            {
                "SeriesInstanceUID": current[0]["SeriesInstanceUID"],
                "StudyInstanceUID": current[0]["StudyInstanceUID"],
                "patient_token": current[0]["patient_token"],
                **{
                    k: first(k)
                    for k in (
                        "Modality",
                        "BodyPartExamined",
                        "Manufacturer",
                        "ManufacturerModelName",
                        "SeriesNumber",
                        "SliceThickness",
                        "KVP",
                        "MagneticFieldStrength",
                    )
                },
                "SeriesDate": min((d for d in dates if d), default=None),
                **_series_geometry(current),
            }
        )
        verdict = verdicts.get(current[0]["SeriesInstanceUID"])
        if verdict is not None:
            series_rows[-1]["volume_ok"], series_rows[-1]["volume_reason"] = verdict
        current.clear()

    def chunk() -> pa.RecordBatch | None:
        for r in series_rows:
            r["Modality"] = partition_value(r["Modality"])
        table = conform(series_rows, "series")
        series_rows.clear()
        return table.combine_chunks().to_batches()[0] if table.num_rows else None

    # listed here, not in the generator: delta-rs drives the generator from its own runtime,
    # which cannot start another (listing a version's files is a delta-rs call)
    q = deid_series_instances(lake, version)

    def series_batches() -> Iterator[pa.RecordBatch]:
        for rb in arrow_reader(con, q.sql, q.params, 10_000):
            for row in rb.to_pylist():
                if current and row["SeriesInstanceUID"] != current[0]["SeriesInstanceUID"]:
                    flush()
                current.append(row)
            if len(series_rows) >= _SERIES_CHUNK:
                batch = chunk()
                if batch is not None:
                    yield batch
        flush()
        batch = chunk()
        if batch is not None:
            yield batch

    schema = schema_for("series")
    reader = pa.RecordBatchReader.from_batches(schema, series_batches())
    delta.commit(lake, "series", reader, mode="overwrite", metadata=built_from)
    studies = arrow_table(con, deid_studies(lake, version).sql)
    delta.commit(
        lake, "studies", conform(studies, "studies"), mode="overwrite", metadata=built_from
    )
    patients = arrow_table(con, deid_patients(lake, version).sql)
    delta.commit(
        lake, "patients", conform(patients, "patients"), mode="overwrite", metadata=built_from
    )


@dataclass(frozen=True)
class RebuildResult:
    """What :func:`rebuild_instances` did."""

    rows_kept: int  # rows of the files that were intact
    rebuilt: int  # objects de-identified again from the restricted zone
    failed: int  # objects that could not be (their source is gone or unreadable)


def rebuild_instances(
    cfg: PipelineConfig, lake: LakePaths, *, key: bytes, run_id: str, damaged: list[Path]
) -> RebuildResult:
    """Rebuild ``instances`` without the ``damaged`` files of its current version: one
    overwrite commit of the rows of the other files, then every object the vault holds that
    has no row is de-identified again from its source (deterministic: the same row), and the
    aggregates are rebuilt. The vault is not touched."""
    import duckdb

    gone = {str(p) for p in damaged}
    files = [f for f in delta.data_files(lake, "instances") if f not in gone]
    schema = schema_for("instances")
    if files:
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con = duckdb.connect()
        try:
            kept = arrow_table(
                con,
                f"SELECT * FROM read_parquet([{listed}], union_by_name = true, "
                "hive_partitioning = true, hive_types_autocast = false)",
            )
        finally:
            con.close()
        kept = pa.Table.from_arrays(
            [kept.column(f.name).cast(f.type) if f.name in kept.column_names
             else pa.nulls(kept.num_rows, f.type) for f in schema],
            schema=schema,
        )  # fmt: skip
    else:
        kept = schema.empty_table()
    delta.commit(lake, "instances", kept, mode="overwrite")
    held = set(kept.column("SOPInstanceUID").to_pylist())
    con = connect()
    q = deid_export_todo(lake)
    opened = lake.opener("index")
    todo = [
        opened(r)
        for rb in arrow_reader(con, q.sql, q.params, 10_000)
        for r in rb.to_pylist()
        if r["sop_pseudonym"] not in held
    ]
    done = {"out": 0, "quarantined": 0}
    size = cfg.compute.partition_size
    for i in range(0, len(todo), size):
        result = deid_batch(
            cfg,
            todo[i : i + size],
            secret_key=key,
            lake=lake,
            run_id=run_id,
            part=f"{run_id}-r{i // size:05d}",
            instances_only=True,
        )
        done["out"] += result["out"]
        done["quarantined"] += result["quarantined"]
    _rebuild_aggregates(con, lake)
    con.close()
    return RebuildResult(kept.num_rows, done["out"], done["quarantined"])


def rebuild_aggregates(lake: LakePaths) -> None:
    """Rebuild ``series``, ``studies`` and ``patients`` from ``instances`` (``repair``)."""
    con = connect()
    try:
        _rebuild_aggregates(con, lake)
    finally:
        con.close()


def run(
    cfg: PipelineConfig,
    lake: LakePaths,
    *,
    key: bytes,
    run_id: str,
    client: Any = None,
    progress: Progress | None = None,
) -> DeidRunResult:
    """De-identify the new objects of the restricted index into the research tables.

    With ``deid.export_dicom`` set, objects de-identified in earlier runs whose export file is
    missing are exported as well (counted in ``extra['exported']``, not in ``seen``). pacsflow's
    own write-back results, crawled again from the PACS they went to, are skipped (counted in
    ``skipped`` and ``extra['own_results']``).
    """
    t0 = time.perf_counter()
    con = connect()
    done = {"out": 0, "quarantined": 0, "exported": 0, "export_failed": 0, "superseded": 0}
    counted: list[int] = []
    export = cfg.deid.export_dicom
    batch = cfg.compute.partition_size

    def calls() -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        common = {"secret_key": key, "lake": lake, "run_id": run_id}
        if export is not None:  # first what earlier runs de-identified but did not export
            for i, rows in enumerate(_export_todo(con, lake, batch, Path(export))):
                yield (cfg, rows), {**common, "part": f"x{i:05d}", "export_only": True}
        for i, rows in enumerate(_todo(con, lake, batch, None if export else progress)):
            counted.append(len(rows))
            yield (cfg, rows), {**common, "part": f"{run_id}-{i:05d}"}

    own = _own_results(con, lake)
    for result in map_bounded(deid_batch, calls(), client=client):
        for k in done:
            done[k] += result[k]
        if progress:
            progress(result["out"] + result["quarantined"] + result["exported"])
    seen = sum(counted)
    # rows that concurrent batches both added (one object in two batches at once)
    dropped = done["superseded"] + (delta.dedupe(lake, "instances") if seen else 0)
    if table_exists(lake, "instances") and (seen or _aggregates_stale(lake)):
        _rebuild_aggregates(con, lake)
    con.close()
    extra = {k: v for k, v in (("exported", done["exported"]), ("superseded", dropped)) if v}
    if own:
        extra["own_results"] = own
    if done["export_failed"]:
        extra["export_failed"] = done["export_failed"]
    counts = StageCounts(
        seen=seen + own,
        out=done["out"],
        quarantined=done["quarantined"],
        skipped=own,
        seconds=round(time.perf_counter() - t0, 3),
        extra=extra,
    )
    logger.info(
        "deid: %d objects, %d de-identified, %d quarantined in %.1f s",
        seen,
        counts.out,
        counts.quarantined,
        counts.seconds,
    )
    if export is not None:
        logger.info(
            "deid: %d de-identified DICOM file(s) exported (%d failed)",
            done["exported"],
            done["export_failed"],
        )
    return DeidRunResult(run_id, counts)
