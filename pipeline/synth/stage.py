"""Write a synthetic archive: series files (in worker processes), bad objects, ground truth.

:func:`synthesize` plans the archive (:mod:`pipeline.synth.plan`), writes each series in one
task (in this process, or in a process pool of ``workers``), then the bad objects, and last
``ground_truth.json`` (atomically, so its presence means the archive is complete).

A series task is a pure function of its :class:`~pipeline.synth.core.SeriesPlan`, so the
files are byte-identical whatever the number of workers and the order tasks finish in.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian

from pipeline.compute import set_total
from pipeline.dicom.atomic import atomic_write_text
from pipeline.synth._codecs import available_syntaxes, encode_frame, is_encapsulated
from pipeline.synth._part10 import InstanceEncoder
from pipeline.synth.core import (
    CT_NOISE_BOUND,
    CT_TISSUES,
    GENERATOR_VERSION,
    INSTANCE_TAGS,
    MR_NOISE_BOUND,
    MR_TISSUES,
    SCHEMA_VERSION,
    Geometry,
    SeriesKind,
    SeriesPlan,
    file_meta,
    instance_elements,
    lesion_volumes,
    render_series,
    series_header,
    voxel_volume_ml,
)
from pipeline.synth.plan import SMALL_MATRIX, ArchivePlan, BadObject, mr_matrix, plan_archive

logger = logging.getLogger(__name__)

__all__ = ["GROUND_TRUTH_NAME", "SynthResult", "synthesize", "write_series"]

#: File name of the ground truth, at the archive root.
GROUND_TRUTH_NAME = "ground_truth.json"

_MAX_MATRIX = 4096

_CONVENTIONS = {
    "coordinates": "DICOM patient coordinates (LPS), millimetres",
    "shape": "[instances, rows, columns]; instances in InstanceNumber order, as listed in files",
    "affine": (
        "4x4 row-major; maps (column i, row j, instance k, 1) to LPS mm; k indexes files; "
        "null when the instances do not form a volume (localizers: see frames)"
    ),
    "spacing_mm": "[|slice step|, row spacing, column spacing]",
    "values": (
        "modality values: HU for CT (stored * RescaleSlope + RescaleIntercept), stored values "
        "for MR; each voxel's label maps to one value plus noise of at most noise_bound"
    ),
    "value_bands": (
        "half-open [low, high) value intervals (null = open) that separate the labels exactly: "
        "counting decoded voxels per band gives the tissue and lesion voxel counts"
    ),
    "volumes": "volume_ml = voxels * voxel_volume_ml; lesions also give the analytic sphere volume",
    "lesions": "centre_mm in LPS; a lesion replaces lung only; lesion bands hold no other tissue",
    "padding": (
        "axial CT outside the reconstruction circle holds padding_value (stored), which falls "
        "in the air band"
    ),
}


@dataclass(frozen=True)
class SynthResult:
    """What :func:`synthesize` wrote.

    Attributes
    ----------
    out:
        The archive root.
    ground_truth:
        Path of ``ground_truth.json``.
    n_instances:
        Valid DICOM instances written (bad objects not included).
    n_series, n_studies, n_patients:
        Valid series, studies and patients.
    n_bad:
        Deliberately bad objects (listed under ``bad_objects`` in the ground truth).
    bytes_written:
        Total size of every file written, ground truth included.
    seconds:
        Wall-clock time of the call.
    """

    out: Path
    ground_truth: Path
    n_instances: int
    n_series: int
    n_studies: int
    n_patients: int
    n_bad: int
    bytes_written: int
    seconds: float


# --------------------------------------------------------------------------------------------
# series
# --------------------------------------------------------------------------------------------


def _private_tag(plan: SeriesPlan) -> str:
    vendor = plan.study.vendor
    return f"{vendor.private_group:04X}{0x1000 | vendor.private_phi_element:04X}"


def _series_record(
    plan: SeriesPlan, counts: np.ndarray, n_bytes: int, sop_uids: list[str]
) -> dict[str, Any]:
    geometry = plan.geometry
    study = plan.study
    volume = geometry.slice_step is not None
    voxel_ml = voxel_volume_ml(geometry)
    tissues_by_label = CT_TISSUES if plan.modality == "CT" else MR_TISSUES
    record: dict[str, Any] = {
        "SeriesInstanceUID": plan.series_uid,
        "StudyInstanceUID": study.study_uid,
        "PatientID": study.patient.identity.patient_id,
        "FrameOfReferenceUID": study.frame_of_reference_uid,
        "Modality": plan.modality,
        "SeriesNumber": plan.number,
        "SeriesDescription": plan.description,
        "kind": str(plan.kind),
        "path": plan.folder,
        "TransferSyntaxUID": plan.transfer_syntax,
        "transfer_syntax": UID(plan.transfer_syntax).name,
        "part10": plan.part10,
        "n_instances": len(geometry.frames),
        "bytes": n_bytes,
        "files": [f"{plan.folder}/{name}" for name in plan.file_names],
        "sop_instance_uids": sop_uids,
        "shape": list(geometry.shape),
        "pixel_spacing": list(geometry.pixel_spacing),
        "slice_thickness": geometry.slice_thickness,
        "spacing_mm": (
            [abs(geometry.slice_step), *geometry.pixel_spacing]
            if geometry.slice_step is not None
            else None
        ),
        "affine": geometry.affine(),
        "frames": None
        if volume
        else [
            {
                "ImagePositionPatient": list(f.position),
                "ImageOrientationPatient": list(f.orientation),
            }
            for f in geometry.frames
        ],
        "bits_stored": plan.bits_stored,
        "pixel_representation": int(plan.signed),
        "rescale_slope": 1,
        "rescale_intercept": plan.rescale_intercept,
        "padding_value": plan.padding_value,
        "noise_bound": CT_NOISE_BOUND if plan.modality == "CT" else MR_NOISE_BOUND,
        "value_bands": [{"name": b.name, "low": b.low, "high": b.high} for b in plan.bands],
        "voxel_volume_ml": voxel_ml,
        "tissues": {
            name: {
                "label": int(label),
                "voxels": int(counts[label]),
                "volume_ml": int(counts[label]) * voxel_ml,
            }
            for label, name in tissues_by_label.items()
        }
        if volume
        else None,
        "lesions": lesion_volumes(plan, counts) if plan.kind is SeriesKind.CT_AXIAL else [],
        "private_phi": [{"tag": _private_tag(plan), "creator": plan.study.vendor.private_creator}],
    }
    return record


_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file (cheaper than ``open()`` for many small files)."""
    fd = os.open(path, _WRITE_FLAGS, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_series(root: Path, plan: SeriesPlan) -> dict[str, Any]:
    """Write every instance of one series and return its ground-truth record.

    Parameters
    ----------
    root:
        The archive root; files go to ``root / plan.folder``.
    plan:
        The series.

    Returns
    -------
    dict
        The series' ground-truth record (see :data:`_CONVENTIONS` for the units).
    """
    folder = root / plan.folder
    folder.mkdir(parents=True, exist_ok=True)
    encoder = InstanceEncoder(
        series_header(plan),
        INSTANCE_TAGS,
        plan.transfer_syntax,
        meta=file_meta(plan) if plan.part10 else None,
        encapsulated=is_encapsulated(plan.transfer_syntax),
    )
    totals = np.zeros(len(plan.values), dtype=np.int64)
    n_bytes = 0
    sop_uids: list[str] = []
    for k, (stored, counts) in enumerate(render_series(plan)):
        totals += counts[: len(totals)]
        pixels = encode_frame(
            plan.transfer_syntax, stored, bits_stored=plan.bits_stored, signed=plan.signed
        )
        values = instance_elements(plan, k)
        sop_uids.append(values[0][2])
        data = encoder.encode(values, pixels)
        _write_file(folder / plan.file_names[k], data)
        n_bytes += len(data)
    logger.debug("synth: wrote %s (%d instances)", plan.folder, len(plan.file_names))
    return _series_record(plan, totals, n_bytes, sop_uids)


def _write_series_task(root: str, plan: SeriesPlan) -> dict[str, Any]:
    return write_series(Path(root), plan)


# --------------------------------------------------------------------------------------------
# bad objects
# --------------------------------------------------------------------------------------------

_PNG_HEADER = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x00\x00\x00\x00"
)


def _one_slice(source: SeriesPlan, series_uid: str, number: int, description: str) -> SeriesPlan:
    g = source.geometry
    geometry = Geometry(
        g.rows, g.columns, g.pixel_spacing, g.slice_thickness, g.frames[:1], g.slice_step
    )
    return replace(
        source,
        series_uid=series_uid or source.series_uid,
        number=number,
        description=description,
        geometry=geometry,
        transfer_syntax=str(ExplicitVRLittleEndian),
        part10=True,
        file_names=("IM00001",),
    )


def _bad_dataset(bad: BadObject) -> tuple[Dataset, SeriesPlan]:
    assert bad.source is not None
    number = {"truncated": 99, "missing_attribute": 98}.get(bad.kind, 97)
    plan = _one_slice(bad.source, bad.series_uid, number, f"{bad.source.description} (export)")
    stored, _ = next(render_series(plan))
    ds = series_header(plan)
    for tag, vr, value in instance_elements(plan, 0):
        ds.add_new(tag, vr, value)
    if bad.sop_uid:
        ds.SOPInstanceUID = bad.sop_uid
    ds.add_new(0x7FE00010, "OW", stored.tobytes())
    meta = file_meta(plan)
    if "SOPInstanceUID" not in bad.missing:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in bad.missing:
        delattr(ds, keyword)
    ds.file_meta = meta
    return ds, plan


def _bad_bytes(bad: BadObject) -> tuple[bytes, dict[str, Any]]:
    extra: dict[str, Any] = {}
    if bad.kind == "empty":
        return b"", extra
    if bad.kind == "not_dicom":
        if bad.path.endswith(".png"):
            return _PNG_HEADER + bytes(range(256)) * 4, extra
        return (
            b"export started\nstudies queued: see PACS console\nexport finished with warnings\n"
        ), extra
    ds, plan = _bad_dataset(bad)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(b"\x00" * 128 + b"DICM")
    ds.file_meta.FileMetaInformationGroupLength = 0  # computed on writing
    write_file_meta_info(fp, ds.file_meta, enforce_standard=False)
    write_dataset(fp, ds)
    data = fp.getvalue()
    if "SOPInstanceUID" in ds:
        extra["sop_uid"] = str(ds.SOPInstanceUID)
    if "SeriesInstanceUID" in ds:
        extra["series_uid"] = str(ds.SeriesInstanceUID)
    if bad.kind == "truncated":
        pixel_bytes = plan.geometry.rows * plan.geometry.columns * 2
        data = data[: len(data) - pixel_bytes // 2 - 1]
    return data, extra


def _write_bad(root: Path, bad: BadObject) -> tuple[int, dict[str, Any]]:
    data, extra = _bad_bytes(bad)
    path = root / bad.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    record: dict[str, Any] = {
        "path": bad.path,
        "kind": bad.kind,
        "expected_reason": bad.expected_reason,
        "detail": bad.detail,
        "bytes": len(data),
    }
    if bad.missing:
        record["missing"] = list(bad.missing)
    record.update(extra)
    return len(data), record


# --------------------------------------------------------------------------------------------
# the archive
# --------------------------------------------------------------------------------------------


def _check_arguments(
    out: Path, patients: int, seed: int, ct_slices: int, rows: int, columns: int, workers: int
) -> None:
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if ct_slices < 2:
        raise ValueError(f"ct_slices must be >= 2, got {ct_slices}")
    for name, value in (("rows", rows), ("columns", columns)):
        if not 8 <= value <= _MAX_MATRIX:
            raise ValueError(f"{name} must be in [8, {_MAX_MATRIX}], got {value}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{out} exists and is not an empty folder: choose a new folder or remove it"
        )


def _image_sizes(
    rows: int, columns: int, small: bool, include_mr: bool
) -> tuple[tuple[int, int], ...]:
    if small:
        return ((SMALL_MATRIX, SMALL_MATRIX),)
    sizes = [(rows, columns)]
    if include_mr:
        m = mr_matrix(rows, columns, small=False)
        sizes.append((m, m))
    return tuple(sizes)


def _ground_truth(
    plan: ArchivePlan,
    series: list[dict[str, Any]],
    bad: list[dict[str, Any]],
    parameters: dict[str, Any],
    unavailable: dict[str, str],
) -> dict[str, Any]:
    used = sorted({s["TransferSyntaxUID"] for s in series})
    series_by_study: dict[str, list[str]] = {}
    for s in series:
        series_by_study.setdefault(s["StudyInstanceUID"], []).append(s["SeriesInstanceUID"])
    studies_by_patient: dict[int, list[str]] = {}
    for st in plan.studies:
        studies_by_patient.setdefault(st.patient.index, []).append(st.study_uid)
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": {"name": "pacsflow.synth", "version": GENERATOR_VERSION},
        "seed": parameters["seed"],
        "parameters": parameters,
        "conventions": _CONVENTIONS,
        "codecs": {
            "used": [{"uid": uid, "name": UID(uid).name} for uid in used],
            "cycle": list(plan.transfer_syntaxes),
            "unavailable": [
                {"uid": uid, "name": UID(uid).name, "reason": reason}
                for uid, reason in sorted(unavailable.items())
            ],
        },
        "counts": {
            "patients": len(plan.patients),
            "studies": len(plan.studies),
            "series": len(series),
            "instances": sum(s["n_instances"] for s in series),
            "bad_objects": len(bad),
        },
        "patients": [
            {
                "folder": p.folder,
                "PatientID": p.identity.patient_id,
                "PatientName": p.identity.dicom_name,
                "PatientBirthDate": p.identity.birth_date,
                "PatientSex": p.identity.sex,
                "OtherPatientIDs": list(p.identity.other_ids),
                "PatientAddress": p.identity.address,
                "PatientTelephoneNumbers": p.identity.phone,
                "studies": studies_by_patient.get(p.index, []),
            }
            for p in plan.patients
        ],
        "studies": [
            {
                "StudyInstanceUID": st.study_uid,
                "PatientID": st.patient.identity.patient_id,
                "folder": st.folder,
                "kind": st.kind,
                "StudyDate": st.date,
                "AccessionNumber": st.accession,
                "StudyDescription": st.description,
                "Manufacturer": st.vendor.manufacturer,
                "InstitutionName": st.institution.name,
                "SpecificCharacterSet": st.character_set,
                "series": series_by_study.get(st.study_uid, []),
            }
            for st in plan.studies
        ],
        "series": series,
        "bad_objects": bad,
        "oddities": [
            {
                "kind": "no_preamble",
                "path": s["path"],
                "series_uid": s["SeriesInstanceUID"],
                "detail": (
                    "every file of this series is a bare Implicit VR Little Endian dataset: no "
                    "128-byte preamble, no DICM prefix, no file meta (read with force=True)"
                ),
            }
            for s in series
            if not s["part10"]
        ],
    }


def synthesize(
    out: Path,
    *,
    patients: int,
    seed: int = 0,
    ct_slices: int = 120,
    rows: int = 512,
    columns: int = 512,
    small: bool = False,
    include_mr: bool = True,
    include_bad: bool = True,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> SynthResult:
    """Write a realistic, deterministic synthetic DICOM archive with its ground truth.

    The archive holds CT chest studies (localizer and axial series of an anatomical phantom in
    HU, with lung lesions) and MR brain studies, with full, PHI-laden headers, in a mix of
    transfer syntaxes, laid out as ``P0001/ST01/SE002/<file>``; plus, with ``include_bad``, a
    few broken objects and one series without preamble. ``ground_truth.json`` at the root
    lists everything, including tissue and lesion volumes from the phantom's voxel counts.
    The same arguments give byte-identical files, whatever ``workers``.

    Parameters
    ----------
    out:
        The archive folder; created, and must be absent or empty.
    patients:
        Number of patients (>= 1). In small mode it sets the instance count exactly:
        ``patients * (2 + ct_slices + 78 * include_mr)`` (200 per patient with the defaults,
        so ``patients=500`` gives 100,000).
    seed:
        Random seed (>= 0); everything, UIDs included, derives from it.
    ct_slices:
        Images per axial CT series (>= 2).
    rows, columns:
        CT matrix in [8, 4096]; MR series are 256 square (or the smaller CT size). Ignored in
        small mode.
    small:
        Tiny 16x16 images with full headers and fixed counts, for crawl benchmarks.
    include_mr:
        Whether to add MR brain studies.
    include_bad:
        Whether to add bad objects (truncated, missing attribute, not DICOM, empty) and one
        series written without preamble and file meta.
    workers:
        Processes writing series in parallel (``1``: this process).
    progress:
        Called with the number of files just written, after each series and bad object.

    Returns
    -------
    SynthResult
        Counts, bytes and time.

    Raises
    ------
    ValueError
        If an argument is out of range or ``out`` is a non-empty folder or a file.
    """
    started = time.perf_counter()
    out = Path(out)
    _check_arguments(out, patients, seed, ct_slices, rows, columns, workers)
    syntaxes, unavailable = available_syntaxes(_image_sizes(rows, columns, small, include_mr))
    plan = plan_archive(
        patients=patients,
        seed=seed,
        ct_slices=ct_slices,
        rows=rows,
        columns=columns,
        small=small,
        include_mr=include_mr,
        include_bad=include_bad,
        syntaxes=syntaxes,
    )
    out.mkdir(parents=True, exist_ok=True)
    set_total(progress, sum(len(s.file_names) for s in plan.series) + len(plan.bad))
    records: list[dict[str, Any] | None] = [None] * len(plan.series)
    if workers == 1 or len(plan.series) == 1:
        for i, series in enumerate(plan.series):
            records[i] = write_series(out, series)
            if progress is not None:
                progress(len(series.file_names))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {
                pool.submit(_write_series_task, str(out), series): i
                for i, series in enumerate(plan.series)
            }
            for future in as_completed(futures):
                i = futures[future]
                records[i] = future.result()
                if progress is not None:
                    progress(len(plan.series[i].file_names))
    series_records = [r for r in records if r is not None]
    bad_records: list[dict[str, Any]] = []
    bytes_written = sum(r["bytes"] for r in series_records)
    for bad in plan.bad:
        size, record = _write_bad(out, bad)
        bytes_written += size
        bad_records.append(record)
        if progress is not None:
            progress(1)
    parameters = {
        "patients": patients,
        "seed": seed,
        "ct_slices": ct_slices,
        "rows": rows,
        "columns": columns,
        "small": small,
        "include_mr": include_mr,
        "include_bad": include_bad,
    }
    truth = _ground_truth(plan, series_records, bad_records, parameters, unavailable)
    text = json.dumps(truth, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    gt_path = out / GROUND_TRUTH_NAME
    atomic_write_text(gt_path, text)
    bytes_written += gt_path.stat().st_size
    counts = truth["counts"]
    seconds = time.perf_counter() - started
    logger.info(
        "synth: %d patients, %d studies, %d series, %d instances, %d bad objects, "
        "%.1f MiB in %.1f s",
        counts["patients"],
        counts["studies"],
        counts["series"],
        counts["instances"],
        counts["bad_objects"],
        bytes_written / 2**20,
        seconds,
    )
    return SynthResult(
        out=out,
        ground_truth=gt_path,
        n_instances=counts["instances"],
        n_series=counts["series"],
        n_studies=counts["studies"],
        n_patients=counts["patients"],
        n_bad=counts["bad_objects"],
        bytes_written=bytes_written,
        seconds=seconds,
    )
