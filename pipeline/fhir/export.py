"""Written-back results of a lake, re-identified, as :class:`~pipeline.fhir.bundle.ResultRecord`.

What counts as a *written-back result*: a (volume, model identity) whose SR (and SEG, when it
has one) the write-back outbox holds as ``confirmed`` at some destination. The FHIR export
therefore follows write-back: the ImagingStudy can list the SEG and SR instances, and the
DocumentReference name the SR, because the PACS holds them.

Everything identifying comes from the restricted zone: the outbox (original study and
source series UIDs, the SEG/SR UIDs), the vault (original PatientID, accession number and
SOP Instance UIDs, decrypted with the lake's key) and the index (SOP classes, instance
numbers). The research tables supply the measurements (``findings``) and the QA decisions
(``reviews``); the model registry the codes (:mod:`pipeline.codes`).

Every task write-back writes is exported: a segmentation's labels (volume measurements), a
detector's boxes (probability, centre, extents) and a classifier's predicted class (with every
class's probability). Findings of another task are counted as ``unsupported``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from pipeline.codes import default_registry_path, registry_codes, registry_entry, triple
from pipeline.codes.outputs import OutputRoles, output_kind
from pipeline.errors import ConfigError
from pipeline.fhir.bundle import (
    BOX_CENTRE,
    BOX_SIZE,
    DEFAULT_MEASUREMENTS,
    DEFAULT_REPORT_CATEGORY,
    DEFAULT_REPORT_CODE,
    MILLIMETRE,
    PROBABILITY,
    SOP_CLASS_COMPREHENSIVE_3D_SR,
    SOP_CLASS_SEG,
    UNIT_ONE,
    FindingRecord,
    MeasurementRecord,
    ResultRecord,
    SeriesRecord,
)
from pipeline.lake import LakePaths, read_table
from pipeline.lake.queries import finding_name, latest_decisions

logger = logging.getLogger(__name__)

__all__ = ["Results", "written_back_results"]

#: measurement names exported, in the order of a label's Observations
MEASURED = ("volume_ml", "mean_hu", "diameter_mm")
#: the tasks whose written-back results are exported
TASKS = frozenset({"segmentation", "detection", "classification"})


@dataclass
class Results:
    """The written-back results of a lake and what was left out, with why (counts)."""

    records: list[ResultRecord] = field(default_factory=list)
    unsupported: int = 0  # results of a task write-back does not write (none today)
    incomplete: int = 0  # no vault rows (deid rebuilt?) or no findings rows
    reidentified: int = 0  # vault rows read back to originals


def _latest(rows: list[dict[str, Any]], key: tuple[str, ...], order: str) -> list[dict[str, Any]]:
    best: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        k = tuple(row[c] for c in key)
        if k not in best or row[order] > best[k][order]:
            best[k] = row
    return list(best.values())


def _in(column: str, values: set[str]) -> Any:
    import pyarrow as pa

    return pc.field(column).isin(pa.array(sorted(values), pa.string()))


def _latest_decisions(lake: LakePaths, keys: set[str]) -> dict[str, dict[str, Any]]:
    """finding key -> its latest review row, by the review app's own rule."""
    rows = read_table(lake, "reviews", filter=_in("finding_key", keys)).to_pylist() if keys else []
    return latest_decisions(rows)


def _measurement_specs(body: Mapping[str, Any] | None) -> dict[str, tuple[Any, Any, Any]]:
    specs = dict(DEFAULT_MEASUREMENTS)
    for name, spec in ((body or {}).get("measurements") or {}).items():
        where = f"measurements.{name}"
        derivation = spec.get("derivation")
        specs[str(name)] = (
            triple(spec.get("concept"), f"{where}.concept"),
            triple(spec.get("unit"), f"{where}.unit"),
            triple(derivation, f"{where}.derivation") if derivation is not None else None,
        )
    # UCUM's "ml" and "mL" are the same unit; FHIR (and UCUM's print form) write "mL"
    return {
        k: (c, ("mL", u[1], u[2]) if u[0] == "ml" and u[1] == "UCUM" else u, d)
        for k, (c, u, d) in specs.items()
    }


def _report_codes(body: Mapping[str, Any] | None) -> tuple[Any, tuple[Any, ...]]:
    report = (body or {}).get("report") or {}
    code = triple(report["code"], "report.code") if report.get("code") else DEFAULT_REPORT_CODE
    raw = report.get("category")
    if not raw:
        return code, DEFAULT_REPORT_CATEGORY
    items = raw if isinstance(raw, list) and raw and isinstance(raw[0], list | dict) else [raw]
    return code, tuple(triple(c, "report.category") for c in items)


def _measurements(
    row: Mapping[str, Any], specs: Mapping[str, Any]
) -> tuple[MeasurementRecord, ...]:
    extra: dict[str, Any] = {}
    try:
        extra = json.loads(row.get("measurements") or "{}")
    except ValueError:
        extra = {}
    values = {
        "volume_ml": row.get("volume_ml"),
        "mean_hu": row.get("mean_hu"),
        "diameter_mm": (extra.get("diameter_mm") or {}).get("value"),
    }
    out = []
    for name in MEASURED:
        value = values[name]
        if value is None or name not in specs:
            continue
        concept, unit, derivation = specs[name]
        out.append(MeasurementRecord(name, float(value), concept, unit, derivation))
    return tuple(out)


def _task(row: Mapping[str, Any]) -> str:
    """The task of a findings row: ``detection`` for a box (rows before the column said
    nothing), the row's ``task`` otherwise (null: ``segmentation``)."""
    if row.get("box_mm"):
        return "detection"
    return str(row.get("task") or "segmentation")


def _coded_as(row: Mapping[str, Any]) -> str:
    """The label a row is coded by: a box by its class (as write-back codes it)."""
    return str(row.get("box_class") or row["label"])


def _box_measurements(row: Mapping[str, Any]) -> tuple[MeasurementRecord, ...]:
    """A box's probability (UCUM 1), then its centre and extents along x, y, z (LPS, mm);
    the extents from ``box_mm`` where ``size_mm`` is null, as the box SR has them."""
    out = []
    if row.get("score") is not None:
        out.append(MeasurementRecord("probability", float(row["score"]), PROBABILITY, UNIT_ONE))
    box = [float(v) for v in row.get("box_mm") or ()]
    centre = row.get("centre_mm") or (
        [(box[a] + box[a + 3]) / 2 for a in range(3)] if len(box) == 6 else None
    )
    size = row.get("size_mm") or (
        [box[a + 3] - box[a] for a in range(3)] if len(box) == 6 else None
    )
    for name, values, concepts in (("centre", centre, BOX_CENTRE), ("size", size, BOX_SIZE)):
        if values is None:
            continue
        for axis, value, concept in zip("xyz", values, concepts, strict=True):
            out.append(MeasurementRecord(f"{name}_{axis}_mm", float(value), concept, MILLIMETRE))
    return tuple(out)


def _class_probabilities(
    predicted: Mapping[str, Any], rows: list[dict[str, Any]], codes: Mapping[str, Any]
) -> tuple[MeasurementRecord, ...]:
    """The predicted class's probability, then every class's of the same image (coded by the
    class's type, as the classification SR's measurements are), in class order."""
    out = []
    if predicted.get("score") is not None:
        out.append(
            MeasurementRecord("probability", float(predicted["score"]), PROBABILITY, UNIT_ONE)
        )
    for r in sorted(rows, key=lambda r: (r.get("label_value") or 0, r["label"])):
        if r.get("score") is None:
            continue
        concept = codes[_coded_as(r)].type
        out.append(
            MeasurementRecord(f"probability_{r['label']}", float(r["score"]), concept, UNIT_ONE)
        )
    return tuple(out)


def written_back_results(lake: LakePaths, *, registry: Path | None) -> Results:
    """Every written-back result of ``lake``, re-identified (``lake`` must carry its keys when
    its restricted zone is encrypted at rest).

    Raises
    ------
    ConfigError
        The model registry is malformed.
    """
    out = Results()
    outbox = _latest(read_table(lake, "outbox").to_pylist(), ("result_uid", "dest"), "updated_at")
    confirmed: dict[str, dict[str, Any]] = {}  # result_uid -> its latest confirmed row
    for row in outbox:
        if row["status"] == "confirmed":
            have = confirmed.get(row["result_uid"])
            if have is None or row["updated_at"] > have["updated_at"]:
                confirmed[row["result_uid"]] = row
    groups: dict[tuple[str, str, str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in sorted(confirmed.values(), key=lambda r: r["updated_at"]):
        key = (row["tensor_key"], row["model"], row["model_version"], row["weights_sha256"])
        groups[key][row["kind"]] = row  # the latest object of each kind (codes corrected: new)
    groups = {k: v for k, v in groups.items() if "SR" in v}
    if not groups:
        return out
    tensor_keys = {k[0] for k in groups}
    findings = read_table(lake, "findings", filter=_in("tensor_key", tensor_keys)).to_pylist()
    by_group: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for f in findings:
        by_group[(f["tensor_key"], f["model"], f["model_version"], f["weights_sha256"])].append(f)
    decisions = _latest_decisions(lake, {f["finding_key"] for f in findings})
    pseudonyms = {o["source_series_pseudonym"] for objs in groups.values() for o in objs.values()}
    vault = _latest(
        read_table(lake, "vault", filter=_in("series_pseudonym", pseudonyms)).to_pylist(),
        ("object_key",),
        "deidentified_at",
    )
    out.reidentified = len(vault)
    index = {
        r["object_key"]: r
        for r in _latest(
            read_table(
                lake,
                "index",
                columns=["object_key", "SOPClassUID", "Modality", "InstanceNumber", "crawled_at"],
                filter=_in("object_key", {v["object_key"] for v in vault}),
            ).to_pylist(),
            ("object_key",),
            "crawled_at",
        )
    }
    by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for v in vault:
        by_series[v["series_pseudonym"]].append(v)
    # the study's series: every source series and SEG/SR series of its results
    study_series: dict[str, dict[str, SeriesRecord]] = defaultdict(dict)
    pending: list[tuple[tuple[str, str, str, str], dict[str, dict[str, Any]], list[Any]]] = []
    for key, objs in sorted(groups.items()):
        rows = by_group.get(key, [])
        sr = objs["SR"]
        slices = by_series.get(sr["source_series_pseudonym"], [])
        if not rows or not slices:
            out.incomplete += 1
            logger.warning("fhir: result %s has no findings or vault rows, left out", key[0])
            continue
        if any(_task(r) not in TASKS for r in rows):
            out.unsupported += 1
            continue
        study = sr["StudyInstanceUID"]
        mine = sorted(
            (s for s in slices if s["SeriesInstanceUID"] == sr["source_series_uid"]),
            key=lambda s: (index.get(s["object_key"], {}).get("InstanceNumber") or 0,
                           s["SOPInstanceUID"]),
        )  # fmt: skip
        first = index.get(mine[0]["object_key"], {}) if mine else {}
        study_series[study][sr["source_series_uid"]] = SeriesRecord(
            uid=sr["source_series_uid"],
            modality=str(first.get("Modality") or "OT"),
            instances=tuple(
                (
                    s["SOPInstanceUID"],
                    str(index.get(s["object_key"], {}).get("SOPClassUID") or ""),
                    index.get(s["object_key"], {}).get("InstanceNumber"),
                )
                for s in mine
            ),
        )
        for kind, cls in (("SEG", SOP_CLASS_SEG), ("SR", SOP_CLASS_COMPREHENSIVE_3D_SR)):
            if kind in objs:
                o = objs[kind]
                # a classification's SRs (one per image) may share a series: list them all
                listed = study_series[study].get(o["SeriesInstanceUID"])
                sops = {u: c for u, c, _ in listed.instances} if listed else {}
                sops[o["result_uid"]] = cls
                study_series[study][o["SeriesInstanceUID"]] = SeriesRecord(
                    uid=o["SeriesInstanceUID"],
                    modality=kind,
                    instances=(
                        ((o["result_uid"], cls, 1),)
                        if len(sops) == 1
                        else tuple((u, c, None) for u, c in sorted(sops.items()))
                    ),
                    description=f"{key[1]} {key[2]} {kind}",
                )
        pending.append((key, objs, mine))
    for key, objs, mine in pending:
        tensor_key, model, version, weights = key
        rows = sorted(
            by_group[key],
            key=lambda r: (r.get("label_value") or 0, r["label"], r.get("instance") or 0),
        )
        sr = objs["SR"]
        entry = rows[0].get("model_entry")
        body = registry_entry(registry or default_registry_path(), entry=entry, model=model)
        roles = OutputRoles.from_entry(body) if body is not None else OutputRoles()
        try:
            codes = registry_codes(registry, entry=entry, model=model).resolve(
                sorted({_coded_as(r) for r in rows})
            )
            specs = _measurement_specs(body)
            report_code, report_category = _report_codes(body)
        except (ConfigError, KeyError, TypeError) as exc:
            raise ConfigError(f"model registry, entry of {model}: {exc}") from None
        records = []
        when = [r["inferred_at"] for r in rows if r.get("inferred_at") is not None]
        classes = [r for r in rows if _task(r) == "classification"]
        for r in rows:
            task = _task(r)
            if task == "segmentation" and not r.get("voxel_count"):
                continue  # an empty label has no segment: nothing was written back
            if task == "detection" and not r.get("box_mm"):
                continue  # no box: nothing was written back
            if task == "classification" and not r.get("predicted"):
                continue  # a class score: a component of the predicted class's Observation
            c = codes[_coded_as(r)]
            decision = decisions.get(r["finding_key"])
            if decision is not None:
                when.append(decision["reviewed_at"])
            kind = output_kind(
                roles,
                r["label"],
                task=r.get("task"),
                box=task == "detection",
                predicted=r.get("predicted"),
            )
            if task == "classification":
                measured = _class_probabilities(r, classes, codes)
            elif task == "detection":
                measured = _box_measurements(r)
            else:
                measured = _measurements(r, specs)
            records.append(
                FindingRecord(
                    finding_key=r["finding_key"],
                    # the finding's unique name (lung_nodule_2): its Observations' ids
                    label=finding_name(r["label"], r.get("instance")),
                    category=c.category,
                    # a classification's Observation is coded by what is classified, its
                    # value the predicted class (as the SR's qualitative evaluation)
                    type=c.category if task == "classification" else c.type,
                    region=c.region,
                    decision=decision["decision"] if decision else None,
                    reviewable=kind == "finding",
                    measurements=measured,
                    kind=task,
                    value=c.type if task == "classification" else None,
                )
            )
        patients = {s["PatientID"] for s in mine if s.get("PatientID")}
        if len(patients) != 1 or not records:
            out.incomplete += 1
            logger.warning(
                "fhir: result %s has no single patient or no label, left out", tensor_key
            )
            continue
        accessions = sorted({s["AccessionNumber"] for s in mine if s.get("AccessionNumber")})
        volume = tensor_key.rsplit("-", 1)[-1]
        out.records.append(
            ResultRecord(
                identity="\x1f".join([model, version, weights, sr["source_series_uid"], volume]),
                result_key=f"{tensor_key}/{model}@{version}+{weights[:12]}",
                patient_id=patients.pop(),
                study_uid=sr["StudyInstanceUID"],
                accession=accessions[0] if accessions else None,
                series=tuple(s for _, s in sorted(study_series[sr["StudyInstanceUID"]].items())),
                sr_uid=sr["result_uid"],
                seg_uid=objs["SEG"]["result_uid"] if "SEG" in objs else None,
                model=model,
                model_version=version,
                weights_sha256=weights,
                issued=max(when) if when else dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
                findings=tuple(records),
                report_code=report_code,
                report_category=report_category,
            )
        )
    return out
