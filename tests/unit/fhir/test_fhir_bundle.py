"""The FHIR Bundle builder (pure) and the client's configuration checks: every resource valid,
ids deterministic, the patient only referred to, the report's status from the QA decisions."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import socket
from typing import Any

import pytest

from pipeline.errors import ConfigError, FhirError
from pipeline.fhir.bundle import (
    DEFAULT_MEASUREMENTS,
    FindingRecord,
    MeasurementRecord,
    ResultRecord,
    SeriesRecord,
    build_bundle,
    report_status,
    validate_resource,
)
from pipeline.fhir.client import FhirClient

SYSTEM = "urn:oid:1.2.3.4.5.6.7"


def _finding(label: str, decision: str | None = None, reviewable: bool = True) -> FindingRecord:
    measured = tuple(
        MeasurementRecord(name, value, *DEFAULT_MEASUREMENTS[name])
        for name, value in (("volume_ml", 0.52), ("mean_hu", 21.4), ("diameter_mm", 9.97))
    )
    return FindingRecord(
        finding_key=f"t/m/{label}",
        label=label,
        category=("49755003", "SCT", "Morphologically Altered Structure"),
        type=("27925004", "SCT", "Nodule"),
        decision=decision,
        reviewable=reviewable,
        measurements=measured,
    )


def _result(*findings: FindingRecord) -> ResultRecord:
    return ResultRecord(
        identity="m\x1f1.0\x1fabc\x1f2.25.2\x1f0",
        result_key="t/m@1.0+abc",
        patient_id="DEMO0001",
        study_uid="2.25.1",
        accession="DEMOACC1",
        series=(
            SeriesRecord("2.25.2", "CT", (("2.25.3", "1.2.840.10008.5.1.4.1.1.2", 1),)),
            SeriesRecord("2.25.4", "SR", (("2.25.5", "1.2.840.10008.5.1.4.1.1.88.34", 1),)),
        ),
        sr_uid="2.25.5",
        seg_uid=None,
        model="m",
        model_version="1.0",
        weights_sha256="ab" * 32,
        issued=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        findings=findings or (_finding("lung_nodule_1"),),
    )


def test_bundle_is_valid_deterministic_and_never_creates_a_patient() -> None:
    a = build_bundle(_result(), patient_system=SYSTEM)
    b = build_bundle(_result(), patient_system=SYSTEM)
    assert a.json_text == b.json_text
    assert a.sha256 == b.sha256
    assert a.bundle_id == b.bundle_id
    bundle = json.loads(a.json_text)
    validate_resource(bundle)
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert "Patient" not in types
    assert types.count("Observation") == 4  # one per measurement and one for the label
    for entry in bundle["entry"]:
        r = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
        validate_resource(r)
        if "subject" in r:
            assert r["subject"]["reference"] == f"Patient?identifier={SYSTEM}|DEMO0001"
    measured = [e["resource"] for e in bundle["entry"] if "valueQuantity" in e["resource"]]
    units = {o["code"]["coding"][0]["code"]: o["valueQuantity"]["code"] for o in measured}
    assert units == {"118565006": "mL", "112031": "[hnsf'U]", "81827009": "mm"}
    for o in measured:
        refs = [d["reference"].split("/")[0] for d in o["derivedFrom"]]
        assert refs == ["ImagingStudy", "DocumentReference"]
        assert o["device"]["reference"].startswith("Device/")
    doc = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DocumentReference"
    )
    assert doc["masterIdentifier"]["value"] == "urn:oid:2.25.5"  # the SR itself


def test_a_decision_changes_the_content_not_the_ids() -> None:
    before = build_bundle(_result(), patient_system=SYSTEM)
    after = build_bundle(_result(_finding("lung_nodule_1", "accept")), patient_system=SYSTEM)
    assert (before.report_status, after.report_status) == ("preliminary", "final")
    assert before.resources == after.resources
    assert before.bundle_id == after.bundle_id
    assert before.sha256 != after.sha256


@pytest.mark.parametrize(
    ("decisions", "expected"),
    [
        ([None], "preliminary"),
        (["accept"], "final"),
        (["accept", None], "preliminary"),
        (["accept", "uncertain"], "preliminary"),
        (["accept", "reject"], "final"),
        (["reject", "reject"], "cancelled"),
    ],
)
def test_report_status_from_the_review(decisions: list[str | None], expected: str) -> None:
    findings = [_finding(f"n{i}", d) for i, d in enumerate(decisions)]
    assert report_status(findings) == expected


def test_a_per_series_measurement_needs_no_decision() -> None:
    findings = [_finding("nodule", "accept"), _finding("lung", None, reviewable=False)]
    assert report_status(findings) == "final"


def test_conclusion_leaves_out_rejected_findings() -> None:
    result = _result(_finding("a", "accept"), _finding("b", "reject"))
    report = next(
        e["resource"]
        for e in json.loads(build_bundle(result, patient_system=SYSTEM).json_text)["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    )
    assert "a (Nodule): volume 0.52 mL, mean 21.4 HU, diameter 9.97 mm." in report["conclusion"]
    assert "Rejected on review: b." in report["conclusion"]
    assert "DEMO0001" not in report["conclusion"]


def test_an_invalid_resource_is_refused() -> None:
    bad = dataclasses.replace(_finding("x"), measurements=())
    built = build_bundle(_result(bad), patient_system=SYSTEM)  # no measurement: still valid
    assert json.loads(built.json_text)
    with pytest.raises(Exception, match="status"):
        validate_resource({"resourceType": "Observation", "code": {"text": "x"}})


@pytest.mark.parametrize(
    "url", ["http://ehr.example.org/fhir", "https://user:pw@ehr.example.org/fhir", "ftp://x/y"]
)
def test_client_refuses_unsafe_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        FhirClient(url)


def test_connection_refused_is_one_transient_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens
    with FhirClient(f"http://127.0.0.1:{port}", retries=0) as c, pytest.raises(FhirError) as info:
        c.read("Patient", "x")
    assert info.value.transient
    assert "connection refused" in str(info.value)
    assert "\n" not in str(info.value)


def test_the_registry_names_the_report_code_and_category(tmp_path: Any) -> None:
    from pipeline.codes import registry_entry
    from pipeline.fhir.export import _report_codes
    from pipeline.infer.registry import load_registry

    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n  m:\n    bundle: m\n    report:\n"
        "      code: ['18748-4', LN, Diagnostic imaging study]\n"
        "      category: [RAD, HL70074, Radiology]\n"
    )
    entry = load_registry(path).models["m"]  # the registry accepts the block
    assert entry.report.code is not None
    assert entry.report.code.value == "18748-4"
    code, category = _report_codes(registry_entry(path, entry="m", model="m"))
    assert code == ("18748-4", "LN", "Diagnostic imaging study")
    assert category == (("RAD", "HL70074", "Radiology"),)
    built = build_bundle(
        dataclasses.replace(_result(), report_code=code, report_category=category),
        patient_system=SYSTEM,
    )
    report = json.loads(built.json_text)["entry"][-1]["resource"]
    assert report["code"]["coding"][0]["system"] == "http://loinc.org"
    assert report["category"][0]["coding"][0]["system"].endswith("v2-0074")


def test_a_server_that_never_answers_is_one_timeout_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # the kernel accepts the connection; nobody ever answers
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        with FhirClient(url, retries=0, timeout_s=0.3) as c, pytest.raises(FhirError) as info:
            c.search("DiagnosticReport", {"identifier": "x"})
    assert info.value.transient
    assert str(info.value) == f"no answer from {url} within 0.3 s"


def test_a_next_link_off_the_base_url_is_not_followed() -> None:
    """The bearer token goes to the base URL only: a next page elsewhere is one error."""
    with FhirClient("http://127.0.0.1:1/fhir", token="t") as c:
        inside = {"link": [{"relation": "next", "url": "http://127.0.0.1:1/fhir/X?p=2"}]}
        assert c._next(inside) == "http://127.0.0.1:1/fhir/X?p=2"
        assert c._next({"link": [{"relation": "self", "url": "http://x/"}]}) is None
        for url in ("http://evil.example/fhir/X?p=2", "http://127.0.0.1:1/fhirx/X"):
            with pytest.raises(FhirError, match="outside its base URL"):
                c._next({"link": [{"relation": "next", "url": url}]})


def test_the_import_recognises_the_exported_study_identifiers() -> None:
    """Both directions share one notion of a study's identifiers (pipeline.fhir.systems): the
    ImagingStudy the export writes is matched by the import's accession and UID rules."""
    from pipeline.fhir.context import _identifiers
    from pipeline.fhir.systems import study_identifier

    entries = json.loads(build_bundle(_result(), patient_system=SYSTEM).json_text)["entry"]
    study = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "ImagingStudy")
    assert _identifiers(study) == ({"DEMOACC1"}, {"2.25.1"})
    system, value = study_identifier("2.25.1").split("|")
    assert {"system": system, "value": value} in study["identifier"]


def test_a_box_and_a_classification_are_one_observation_each() -> None:
    """A detected box: coded by its class's finding type, with its body site and its
    probability, centre and extents as components; a classification: coded by what is
    classified, its value the predicted class, the probabilities as components. Both in a
    report that turns final when the reviewer accepts them."""
    from pipeline.fhir.bundle import BOX_CENTRE, BOX_SIZE, MILLIMETRE, PROBABILITY, UNIT_ONE

    box = FindingRecord(
        finding_key="t/m/lung_nodule_1",
        label="lung_nodule_1",
        category=("49755003", "SCT", "Morphologically Altered Structure"),
        type=("27925004", "SCT", "Nodule"),
        region=("39607008", "SCT", "Lung"),
        kind="detection",
        measurements=(
            MeasurementRecord("probability", 0.91, PROBABILITY, UNIT_ONE),
            *(
                MeasurementRecord(f"centre_{a}_mm", v, c, MILLIMETRE)
                for a, v, c in zip("xyz", (1.5, -2.0, 30.25), BOX_CENTRE, strict=True)
            ),
            *(
                MeasurementRecord(f"size_{a}_mm", v, c, MILLIMETRE)
                for a, v, c in zip("xyz", (4.2, 5.6, 5.0), BOX_SIZE, strict=True)
            ),
        ),
    )
    density = ("129715009", "SCT", "Breast composition")
    fatty = ("129716005", "SCT", "Almost entirely fatty breast")
    dense = ("129718006", "SCT", "Heterogeneously dense breast")
    cls = FindingRecord(
        finding_key="t/m/A",
        label="A",
        category=density,
        type=density,
        value=fatty,
        kind="classification",
        measurements=(
            MeasurementRecord("probability", 0.8, PROBABILITY, UNIT_ONE),
            MeasurementRecord("probability_A", 0.8, fatty, UNIT_ONE),
            MeasurementRecord("probability_C", 0.2, dense, UNIT_ONE),
        ),
    )
    for finding in (box, cls):
        built = build_bundle(_result(finding), patient_system=SYSTEM)
        assert built.report_status == "preliminary"
        bundle = json.loads(built.json_text)
        validate_resource(bundle)
        entries = [e["resource"] for e in bundle["entry"]]
        [obs] = [r for r in entries if r["resourceType"] == "Observation"]
        validate_resource(obs)
        assert obs["code"]["coding"][0]["code"] == finding.type[0]
        assert [c["code"]["coding"][0]["code"] for c in obs["component"]] == [
            m.concept[0] for m in finding.measurements
        ]
        assert obs["component"][0]["valueQuantity"]["code"] == "1"
        assert [d["reference"].split("/")[0] for d in obs["derivedFrom"]] == [
            "ImagingStudy",
            "DocumentReference",
        ]
        accepted = build_bundle(
            _result(dataclasses.replace(finding, decision="accept")), patient_system=SYSTEM
        )
        assert accepted.report_status == "final"
        assert accepted.resources == built.resources  # same ids: the rerun updates
        report = json.loads(built.json_text)["entry"][-1]["resource"]
        if finding is box:
            assert obs["bodySite"]["coding"][0]["code"] == "39607008"
            assert {c["valueQuantity"]["code"] for c in obs["component"][1:]} == {"mm"}
            assert "valueCodeableConcept" not in obs
            assert "lung_nodule_1 (Nodule): probability 0.91, width 4.20 mm" in report["conclusion"]
        else:
            assert obs["valueCodeableConcept"]["coding"][0]["code"] == fatty[0]
            assert (
                "Breast composition: Almost entirely fatty breast (A, probability 0.80)."
                in (report["conclusion"])
            )
