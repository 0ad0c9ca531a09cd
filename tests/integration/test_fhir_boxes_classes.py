"""FHIR export of detection and classification results (issue #25: "for each written-back
result, a Bundle"): one CT volume, the model zoo's lung nodule detector with a known-answer
network (one box) and a tiny 3D classifier (three classes), both inferred and written back
(box SR, classification SR), then exported to a folder and to the FHIR test server
(tests/fhir_server.py). Each result is a valid transaction Bundle: a box is an Observation
coded by its class with its probability, centre and extents as components; a classification
an Observation whose value is the predicted class, with every class's probability; a rerun
adds nothing; an accepted review turns the report final."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import detection_bundle, make_bundle

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.fhir.bundle import validate_resource
from pipeline.fhir.stage import run as fhir_run
from pipeline.infer.stage import run as infer_run
from pipeline.lake import LakePaths, read_table
from pipeline.lake.identity import open_lake
from pipeline.lake.keys import LakeKeys
from pipeline.tensors.stage import run as tensors_run
from pipeline.writeback.stage import run as writeback_run

pytestmark = pytest.mark.integration

KEY = b"b" * 32
SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1234.1"
SCT = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
#: (slices, rows, cols) and the LPS affine of the CT (test_detect.py's known-answer volume)
SHAPE = (16, 32, 32)
NODULE = {
    "category": ["49755003", "SCT", "Morphologically Altered Structure"],
    "type": ["27925004", "SCT", "Nodule"],
}
PATTERN = ["118247008", "SCT", "Radiologic finding"]
CLASSES = {
    "normal": ["17621005", "SCT", "Normal"],
    "emphysema": ["87433001", "SCT", "Pulmonary emphysema"],
    "fibrosis": ["51615001", "SCT", "Fibrosis of lung"],
}


def _volume() -> np.ndarray:
    """Air, and a 300 HU block where the known-answer detector puts one box."""
    arr = np.full(SHAPE, -1024, dtype=np.int16)
    arr[4:6, 12:16, 16:20] = 300
    return arr


def _archive(root: Path) -> Path:
    from dicom_factory import make_ct_stack

    volume = _volume()

    def phantom(points: np.ndarray) -> np.ndarray:  # HU + 1024 at these LPS points
        i = np.rint((points[..., 0] + 12.0) / 0.7).astype(int)
        j = np.rint((points[..., 1] - 30.5) / 0.7).astype(int)
        k = round((float(points[0, 0, 2]) + 80.0) / 1.25)
        return volume[k, j, i].astype(np.float64) + 1024

    archive = root / "archive"
    archive.mkdir()
    positions = [(-12.0, 30.5, -80.0 + 1.25 * k) for k in range(SHAPE[0])]
    for n, ds in enumerate(make_ct_stack(positions, phantom, pixel_spacing=(0.7, 0.7),
                                         rows=SHAPE[1], columns=SHAPE[2])):  # fmt: skip
        ds.RescaleIntercept = -1024
        ds.save_as(archive / f"{n:03d}.dcm", enforce_file_format=True)
    return archive


def _classifier_bundle(root: Path) -> Path:
    """A tiny 3D classifier (MONAI ResNet, 3 classes, softmax) in the model-zoo layout."""
    config = {
        "imports": ["$import torch"],
        "network_def": {
            "_target_": "ResNet",
            "block": "basic",
            "layers": [1, 1, 1, 1],
            "block_inplanes": [4, 4, 4, 4],
            "spatial_dims": 3,
            "n_input_channels": 1,
            "num_classes": 3,
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1024.0,
                    "a_max": 1024.0,
                    "b_min": -1.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "Resized", "keys": "image", "spatial_size": [32, 32, 16]},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        },
    }
    path = make_bundle(root / "lung_pattern", spatial=3, seed=7, channels=3, config=config)
    meta_path = path / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["outputs"]["pred"].update(
        format="probabilities",
        num_channels=3,
        channel_def={str(i): name for i, name in enumerate(CLASSES)},
    )
    meta_path.write_text(json.dumps(meta, indent=2))
    return path


def _cfg(root: Path, model: str, **fhir: Any) -> Any:
    return load_config(
        overrides={
            "compute": {"workers": 1, "device": "cpu"},
            "infer": {"registry": str(root / "models.yaml"), "model": model,
                      "trust_store": str(root / "trust.json")},
            "writeback": {"check_iod": False},
            "fhir": {"patient_identifier_system": SYSTEM, **fhir},
        },
        environ={},
    )  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LakePaths]:
    """A lake whose box (detector) and class vector (classifier) of one CT volume were
    written back to a folder PACS."""
    import yaml

    from pipeline.infer.bundle_config import content_hash
    from pipeline.infer.trust import TrustStore

    root = tmp_path_factory.mktemp("fhir-boxes")
    archive = _archive(root)
    detector = detection_bundle(root / "bundles", known_answer=True)
    digest = content_hash(detector)
    TrustStore(root / "trust.json").approve(digest, "nodules", detector)
    classifier = _classifier_bundle(root / "bundles")
    registry = {
        "nodules": {"bundle": str(detector), "bundle_sha256": digest,
                    "applies_to": "Modality = 'CT'",
                    "detection": {"classes": {0: "lung_nodule"}},
                    "labels": {"lung_nodule": NODULE}},
        "lung_pattern": {"bundle": str(classifier), "applies_to": "Modality = 'CT'",
                         "task": "classification",
                         "labels": {name: {"category": PATTERN, "type": code}
                                    for name, code in CLASSES.items()}},
    }  # fmt: skip
    (root / "models.yaml").write_text(yaml.safe_dump({"models": registry}))
    lake = LakePaths(root / "lake").with_keys(LakeKeys(KEY))
    open_lake(lake, LakeKeys(KEY), create=True, encrypted=True)
    cfg = _cfg(root, "nodules")
    crawl_run(cfg, lake, FolderSource(archive), run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    infer_run(cfg, lake, run_id="i1")
    infer_run(_cfg(root, "lung_pattern"), lake, run_id="i2")
    findings = read_table(lake, "findings").to_pylist()
    assert {r["task"] for r in findings} == {"detection", "classification"}
    result = writeback_run(cfg, lake, run_id="w", dest=str(root / "pacs"), key=KEY)
    assert result.counts.extra["confirmed"] == 2  # the box SR and the classification SR
    return root, lake


def _bundles(folder: Path) -> dict[str, dict[str, Any]]:
    """model name -> the Bundle of its result (the Device names the model)."""
    out = {}
    for p in sorted(folder.glob("*.json")):
        bundle = json.loads(p.read_text())
        validate_resource(bundle)
        for entry in bundle["entry"]:
            validate_resource(entry["resource"])
        [device] = _of(bundle, "Device")
        out[device["deviceName"][0]["name"]] = bundle
    return out


def _of(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def _quantities(obs: dict[str, Any]) -> dict[str, tuple[float, str]]:
    return {
        c["code"]["text"]: (c["valueQuantity"]["value"], c["valueQuantity"]["code"])
        for c in obs["component"]
    }


def test_boxes_and_classes_export_as_observations(
    built: tuple[Path, LakePaths], tmp_path: Path
) -> None:
    import shutil

    root, base = built
    shutil.copytree(base.root, tmp_path / "lake")
    lake = LakePaths(tmp_path / "lake").with_keys(base.keys)
    out = tmp_path / "bundles"
    r = fhir_run(_cfg(root, "nodules"), lake, run_id="f1", dest=str(out))
    assert r.counts.extra["unsupported"] == 0
    assert r.counts.extra["results"] == r.counts.extra["confirmed"] == 2
    bundles = _bundles(out)
    assert set(bundles) == {"lung_nodule_ct_detection", "lung_pattern"}
    findings = {
        r["finding_key"].rsplit("/", 1)[-1]: r for r in read_table(lake, "findings").to_pylist()
    }

    # the box: coded by its class, its probability, centre and extents as components
    boxes = bundles["lung_nodule_ct_detection"]
    [study] = _of(boxes, "ImagingStudy")
    [doc] = _of(boxes, "DocumentReference")
    [device] = _of(boxes, "Device")
    [obs] = _of(boxes, "Observation")
    assert obs["code"]["coding"][0] == {"system": SCT, "code": "27925004", "display": "Nodule"}
    assert obs["code"]["text"] == "lung_nodule_1"  # finding_name(label, instance)
    assert obs["status"] == "preliminary"
    row = findings["lung_nodule_1"]
    got = _quantities(obs)
    assert got["probability"] == (pytest.approx(row["score"], abs=1e-6), "1")
    for axis, n in zip("xyz", range(3), strict=True):
        assert got[f"centre_{axis}_mm"] == (pytest.approx(row["centre_mm"][n], abs=1e-5), "mm")
        assert got[f"size_{axis}_mm"] == (pytest.approx(row["size_mm"][n], abs=1e-5), "mm")
    assert {c["valueQuantity"]["system"] for c in obs["component"]} == {UCUM}
    assert [d["reference"] for d in obs["derivedFrom"]] == [
        f"ImagingStudy/{study['id']}",
        f"DocumentReference/{doc['id']}",
    ]
    assert obs["device"]["reference"] == f"Device/{device['id']}"
    assert {s["modality"]["code"] for s in study["series"]} == {"CT", "SR"}
    [report] = _of(boxes, "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert report["result"] == [{"reference": f"Observation/{obs['id']}"}]
    assert "lung_nodule_1 (Nodule): probability" in report["conclusion"]

    # the classification: its value the predicted class, every class's probability
    classes = bundles["lung_pattern"]
    [cls] = _of(classes, "Observation")
    rows = sorted((r for r in findings.values() if r["task"] == "classification"),
                  key=lambda r: r["label_value"])  # fmt: skip
    [top] = [r for r in rows if r["predicted"]]
    assert cls["code"]["coding"][0]["code"] == PATTERN[0]
    assert cls["code"]["text"] == top["label"]
    assert cls["valueCodeableConcept"]["coding"][0] == {
        "system": SCT, "code": CLASSES[top["label"]][0], "display": CLASSES[top["label"]][2]
    }  # fmt: skip
    got = _quantities(cls)
    assert got["probability"] == (pytest.approx(top["score"], abs=1e-6), "1")
    assert [c["code"]["coding"][0]["code"] for c in cls["component"][1:]] == [
        CLASSES[r["label"]][0] for r in rows
    ]
    for r in rows:
        assert got[f"probability_{r['label']}"] == (pytest.approx(r["score"], abs=1e-6), "1")
    [report] = _of(classes, "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert f"Radiologic finding: {CLASSES[top['label']][2]}" in report["conclusion"]

    # same results, same ids: a rerun adds nothing
    files = {p.name: p.read_bytes() for p in out.glob("*.json")}
    again = fhir_run(_cfg(root, "nodules"), lake, run_id="f2", dest=str(out))
    assert again.counts.extra["skipped"] == 2
    assert again.counts.extra["sent"] == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.json")} == files

    # the reviewer accepts the box and the predicted class: both reports turn final, in
    # the same files (same Bundle ids), with the same resource ids
    from pipeline.review.store import record_decision

    record_decision(lake, row, reviewer="qa", decision="accept")
    record_decision(lake, top, reviewer="qa", decision="accept")
    third = fhir_run(_cfg(root, "nodules"), lake, run_id="f3", dest=str(out))
    assert third.counts.extra["final_reports"] == 2
    assert sorted(p.name for p in out.glob("*.json")) == sorted(files)
    after = _bundles(out)
    for model, bundle in after.items():
        [report] = _of(bundle, "DiagnosticReport")
        assert report["status"] == "final"
        assert [o["status"] for o in _of(bundle, "Observation")] == ["final"]
        ids = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"]]
        before = [(e["resource"]["resourceType"], e["resource"]["id"])
                  for e in bundles[model]["entry"]]  # fmt: skip
        assert ids == before


def test_boxes_and_classes_at_the_test_server(
    built: tuple[Path, LakePaths], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FHIR test server (every resource validated) takes both Bundles; the Observations
    are found by the patient's identifier; a rerun sends nothing."""
    import shutil

    import fhir_server

    from pipeline.fhir.client import FhirClient

    root, base = built
    shutil.copytree(base.root, tmp_path / "lake")
    lake = LakePaths(tmp_path / "lake").with_keys(base.keys)
    [pid] = {r["PatientID"] for r in read_table(lake, "vault").to_pylist()}
    srv = fhir_server.FhirTestServer(tmp_path / "fhir-data", token="t")
    srv.start()
    try:
        with FhirClient(srv.url, token="t", retries=0) as c:
            c.transaction(
                {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [
                        {
                            "resource": {
                                "resourceType": "Patient",
                                "id": "p0",
                                "identifier": [{"system": SYSTEM, "value": pid}],
                            },
                            "request": {"method": "PUT", "url": "Patient/p0"},
                        }
                    ],
                }
            )
        monkeypatch.setenv("PACSFLOW_TEST_FHIR_TOKEN", "t")
        cfg = _cfg(root, "nodules", token_env="PACSFLOW_TEST_FHIR_TOKEN")
        r = fhir_run(cfg, lake, run_id="s1", dest=srv.url)
        assert r.counts.extra["confirmed"] == 2
        assert srv.count("Observation") == 2
        with FhirClient(srv.url, token="t", retries=0) as c:
            found = c.search("Observation", {"patient:identifier": f"{SYSTEM}|{pid}"})
        assert len(found) == 2
        assert sum("valueCodeableConcept" in o for o in found) == 1  # the classification
        assert all(o["subject"]["reference"] == "Patient/p0" for o in found)
        again = fhir_run(cfg, lake, run_id="s2", dest=srv.url)
        assert again.counts.extra["skipped"] == 2
        assert again.counts.extra["sent"] == 0
        assert srv.count("Observation") == 2
    finally:
        srv.stop()
