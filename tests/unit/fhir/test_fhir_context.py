"""Radiology context from a FHIR Bulk Data export into ``orders`` and ``reports`` (issue #25).

A small archive of two patients is crawled and de-identified through the CLI (a lake
encrypted at rest, so the vault's accession numbers are read with the key); a synthetic
export with real-looking PHI is imported with ``pacsflow fhir-import``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from dicom_factory import make_ct, write
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.lake import LakePaths, read_table
from pipeline.lake.delta import current_version
from pipeline.lake.keys import LakeKeys, load_key

runner = CliRunner()

STUDY_1 = "1.2.826.0.1.3680043.8.498.77001"
STUDY_2 = "1.2.826.0.1.3680043.8.498.77002"
MRN_1, MRN_2 = "MRN-448812", "MRN-993311"
ACC_1, ACC_2 = "ACC20260001", "ACC20250315"
#: values of the input that must never reach the research tables or the logs
PHI = [
    MRN_1,
    MRN_2,
    ACC_1,
    ACC_2,
    "ACC99999999",
    "KOWALSKI",
    "Kowalski",
    "Okafor",
    "Gregory",
    "House",
    "555-0142",
    "555-0199",
    "PLC-77812",
    "1961-04-23",
    "2026-01-02",
    "sr-1",
    "dr-1",
    "is-2",
    STUDY_1,
    STUDY_2,
]
_ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


def _archive(root: Path) -> Path:
    for study, mrn, name, acc, date, n in (
        (STUDY_1, MRN_1, "KOWALSKI^ANNA", ACC_1, "20260102", 1),
        (STUDY_2, MRN_2, "OKAFOR^CHIDI", ACC_2, "20250315", 2),
    ):
        ds = make_ct(number=n, study_uid=study, series_uid=f"{study}.1")
        ds.PatientID, ds.PatientName, ds.AccessionNumber, ds.StudyDate = mrn, name, acc, date
        write(ds, root / f"im{n}.dcm")
    return root


def _ndjson(path: Path, resources: list[dict[str, Any] | str]) -> None:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in resources),
        encoding="utf-8",
    )


def _report_1(version: str, status: str, updated: str) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "id": "dr-1",
        "meta": {"versionId": version, "lastUpdated": updated},
        "status": status,
        "basedOn": [{"reference": "ServiceRequest/sr-1"}],
        "subject": {"reference": "Patient/pt-1", "display": "Anna Kowalski"},
        "category": [
            {
                "coding": [
                    {"system": "http://loinc.org", "code": "LP29684-5", "display": "Radiology"}
                ]
            }
        ],
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest Report"}
            ],
            "text": "CT chest for Anna Kowalski",
        },
        "effectiveDateTime": "2026-01-02T10:15:00+00:00",
        "issued": "2026-01-02T12:00:00Z",
        "performer": [{"reference": "Practitioner/dr-house", "display": "Gregory House"}],
        "result": [{"reference": "Observation/o1"}],
        "conclusion": "Nodule in the right lung; Dr. Gregory House told Anna Kowalski 555-0142",
        "conclusionCode": [
            {
                "coding": [
                    {"system": "http://snomed.info/sct", "code": "39607008", "display": "lung"},
                    {
                        "system": "http://hospital.example/codes",
                        "code": "NOD-1",
                        "display": "nodule seen by Gregory House",
                    },
                ]
            }
        ],
        "presentedForm": [{"contentType": "text/plain", "data": "S293YWxza2k="}],
    }


def _export(folder: Path, study_2: str = STUDY_2) -> Path:
    folder.mkdir(parents=True)
    _ndjson(
        folder / "Patient.ndjson",
        [
            {
                "resourceType": "Patient",
                "id": "pt-1",
                "identifier": [{"system": "urn:mrn", "value": MRN_1}],
                "name": [{"family": "Kowalski", "given": ["Anna"]}],
                "birthDate": "1961-04-23",
                "telecom": [{"system": "phone", "value": "555-0142"}],
            },
            {
                "resourceType": "Patient",
                "id": "pt-2",
                "identifier": [{"system": "urn:mrn", "value": MRN_2}],
                "name": [{"family": "Okafor", "given": ["Chidi"]}],
            },
        ],
    )
    _ndjson(
        folder / "ServiceRequest.ndjson",
        [
            {
                "resourceType": "ServiceRequest",
                "id": "sr-1",
                "meta": {"versionId": "1", "lastUpdated": "2026-01-01T08:31:00+01:00"},
                "identifier": [
                    {"type": _ACSN, "value": ACC_1},
                    {"system": "urn:placer", "value": "PLC-77812"},
                ],
                "status": "active",
                "intent": "order",
                "priority": "urgent",
                "subject": {"reference": "Patient/pt-1", "display": "Anna Kowalski"},
                "code": {
                    "coding": [{"system": "http://loinc.org", "code": "24627-2"}],
                    "text": "CT chest, Kowalski",
                },
                "reasonCode": [
                    {
                        "coding": [
                            {
                                "system": "http://snomed.info/sct",
                                "code": "29857009",
                                "display": "Chest pain (Kowalski)",
                            }
                        ],
                        "text": "Chest pain after a fall at home, Anna Kowalski 555-0142",
                    }
                ],
                "authoredOn": "2026-01-01T08:30:00+01:00",
                "requester": {"reference": "Practitioner/dr-house", "display": "Gregory House"},
                "note": [{"text": "Call Dr. Gregory House at 555-0199"}],
            },
            {
                "resourceType": "ServiceRequest",
                "id": "sr-2",
                "status": "completed",
                "intent": "order",
                "priority": "Kowalski",  # not a priority: free text where a code belongs
                "subject": {"reference": "Patient/pt-2"},
                "reasonCode": [
                    {
                        "coding": [
                            {
                                "system": "http://hl7.org/fhir/sid/icd-10",
                                "code": "R91.8",
                                "display": "abnormal lung finding (per Okafor family)",
                            }
                        ]
                    }
                ],
                "authoredOn": "2025-03-14",
            },
            {
                "resourceType": "ServiceRequest",
                "id": "sr-9",
                "identifier": [{"type": _ACSN, "value": "ACC99999999"}],
                "status": "active",
                "intent": "order",
                "subject": {"reference": "Patient/pt-1"},
            },
            # invalid: a date that is none, and a line that is no JSON
            '{"resourceType": "ServiceRequest", "id": "sr-bad", "status": "active", '
            '"intent": "order", "subject": {"reference": "Patient/pt-1"}, '
            '"authoredOn": "yesterday KOWALSKI"}',
            '{"resourceType": "ServiceRequest", "id": "KOWALSKI',
        ],
    )
    _ndjson(
        folder / "ImagingStudy.ndjson",
        [
            {
                "resourceType": "ImagingStudy",
                "id": "is-2",
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_2}"}],
                "status": "available",
                "subject": {"reference": "Patient/pt-2"},
                "basedOn": [{"reference": "ServiceRequest/sr-2"}],
            }
        ],
    )
    _ndjson(
        folder / "DiagnosticReport.ndjson",
        [
            _report_1("1", "preliminary", "2026-01-02T11:00:00Z"),
            {
                "resourceType": "DiagnosticReport",
                "id": "dr-2",
                "status": "final",
                "subject": {"reference": "Patient/pt-2"},
                "imagingStudy": [{"reference": "ImagingStudy/is-2"}],
                "performer": [{"type": "GregoryHouse"}, {"reference": "Organization/o/_history/2"}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2"}]},
                "effectiveDateTime": "2025-03-15",
                "conclusionCode": [
                    {"coding": [{"system": "http://snomed.info/sct", "code": "39607008"}]}
                ],
            },
        ],
    )
    manifest = {
        "transactionTime": "2026-01-03T00:00:00Z",
        "request": "https://ehr.example/fhir/$export",
        "requiresAccessToken": True,
        "output": [
            {"type": t, "url": f"https://ehr.example/files/{t}.ndjson"}
            for t in ("Patient", "ServiceRequest", "ImagingStudy", "DiagnosticReport")
        ],
        "error": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    archive = _archive(tmp_path / "archive")
    lake = tmp_path / "lake"
    _invoke("crawl", "--source", str(archive), "--lake", str(lake), "--workers", "1")
    _invoke("deid", "--lake", str(lake), "--workers", "1")
    return lake


def _paths(lake: Path) -> LakePaths:
    return LakePaths(lake, keys=LakeKeys(load_key()))


def _studies(lake: Path) -> dict[str, dict[str, Any]]:
    """Research ``studies`` rows by their original Study Instance UID (through the vault)."""
    paths = _paths(lake)
    vault = read_table(paths, "vault", columns=["StudyInstanceUID", "study_pseudonym"])
    pseudonyms = dict(zip(*[vault.column(c).to_pylist() for c in vault.column_names], strict=True))
    rows = {r["StudyInstanceUID"]: r for r in read_table(paths, "studies").to_pylist()}
    return {uid: rows[p] for uid, p in pseudonyms.items()}


def test_orders_and_reports_are_matched_deidentified_and_queryable(
    lake: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the tables exist, empty, before any import
    assert "0" in _invoke("sql", "--lake", str(lake), "SELECT count(*) AS n FROM orders")
    export = _export(tmp_path / "export")
    with caplog.at_level(logging.DEBUG):
        out = _invoke("fhir-import", str(export), "--lake", str(lake))
    assert (
        "fhir import: 10 resources: orders +2, reports +2, superseded 0, unchanged 0, stale 0, "
        "unmatched 1, ambiguous 0, quarantined 2, other 3"
    ) in out

    paths = _paths(lake)
    studies = _studies(lake)
    orders = {r["StudyInstanceUID"]: r for r in read_table(paths, "orders").to_pylist()}
    reports = {r["StudyInstanceUID"]: r for r in read_table(paths, "reports").to_pylist()}
    s1, s2 = studies[STUDY_1], studies[STUDY_2]
    assert set(orders) == set(reports) == {s1["StudyInstanceUID"], s2["StudyInstanceUID"]}

    # matched by accession number (sr-1, dr-1 through basedOn) and through the ImagingStudy's
    # Study Instance UID (sr-2, dr-2); the same pseudonyms as the DICOM research tables
    o1, r1 = orders[s1["StudyInstanceUID"]], reports[s1["StudyInstanceUID"]]
    o2, r2 = orders[s2["StudyInstanceUID"]], reports[s2["StudyInstanceUID"]]
    assert o1["patient_token"] == r1["patient_token"] == s1["patient_token"]
    assert o2["patient_token"] == r2["patient_token"] == s2["patient_token"]
    assert r1["order_key"] == o1["order_key"]
    assert r2["order_key"] is None
    instances = read_table(paths, "instances").to_pylist()
    header = json.loads(
        next(i for i in instances if i["StudyInstanceUID"] == s1["StudyInstanceUID"])["header_json"]
    )
    assert o1["accession_token"] == header["00080050"]["Value"][0]

    # dates shifted by the patient's offset: the offset of the DICOM StudyDate
    offset_1 = s1["StudyDate"] - dt.date(2026, 1, 2)
    offset_2 = s2["StudyDate"] - dt.date(2025, 3, 15)
    assert offset_1.days < 0
    assert offset_2.days < 0
    assert r1["effective"].date() == s1["StudyDate"]
    assert r1["effective"] == dt.datetime(2026, 1, 2, 10, 15, tzinfo=dt.UTC) + offset_1
    assert r1["issued"] == dt.datetime(2026, 1, 2, 12, 0, tzinfo=dt.UTC) + offset_1
    assert o1["authored_on"] == dt.datetime(2026, 1, 1, 7, 30, tzinfo=dt.UTC) + offset_1
    assert r2["effective"].date() == s2["StudyDate"]
    assert o2["authored_on"].date() == dt.date(2025, 3, 14) + offset_2

    # codes kept, displays by the Code Meaning rule, free text removed (the default profile)
    assert o1["reason_codes"] == ["29857009"]
    assert o2["reason_codes"] == ["R91.8"]
    assert o1["reason_code"][0]["display"] == "Chest Pain"  # the canonical meaning
    assert r1["code"][0]["display"] == "CT Chest Report"  # a meaning the dictionary gives
    assert o2["reason_code"][0]["display"] is None  # no dictionary vouches for it
    assert o1["reason_text"] is None
    assert o1["note"] is None
    assert (o1["status"], o1["intent"], o1["priority"]) == ("active", "order", "urgent")
    assert o1["requester_kind"] == "Practitioner"
    assert r1["conclusion"] is None
    assert r1["conclusion_codes"] == ["39607008", "NOD-1"]
    assert [c["display"] for c in r1["conclusion_code"]] == ["lung", None]
    assert r1["code"][0]["display"] == "CT Chest Report"
    assert (r1["status"], r1["performer_kind"], r1["n_results"]) == (
        "preliminary",
        ["Practitioner"],
        1,
    )
    assert r1["has_presented_form"] is True
    # a coded element holding free text, a reference type that is none: not copied
    assert o2["priority"] is None
    assert r2["performer_kind"] == ["Organization"]

    # no PHI of the input in the research tables, the logs or the quarantine messages
    dumped = json.dumps(
        [read_table(paths, t).to_pylist() for t in ("orders", "reports")], default=str
    )
    quarantine = read_table(paths, "quarantine").to_pylist()
    fhir_rows = [q for q in quarantine if q["stage"] == "fhir"]
    messages = " ".join(q["message"] for q in fhir_rows)
    for needle in PHI:
        assert needle not in dumped, needle
        assert needle not in caplog.text, needle
        assert needle not in out, needle
        assert needle not in messages, needle
    assert "verify: no identifying value" in _invoke("verify", "--lake", str(lake))

    # the invalid lines are quarantined, with the reason and where they are
    assert sorted((q["location"], q["reason"]) for q in fhir_rows) == [
        ("ServiceRequest.ndjson:4", "invalid"),
        ("ServiceRequest.ndjson:5", "unreadable"),
    ]
    assert "authoredOn" in messages

    # a cohort by indication and by the report's coded findings, through `pacsflow sql`
    cohort = _invoke(
        "sql",
        "--lake",
        str(lake),
        "SELECT s.patient_token, r.status FROM studies s "
        "JOIN orders o USING (StudyInstanceUID) JOIN reports r USING (StudyInstanceUID) "
        "WHERE list_contains(o.reason_codes, '29857009') "
        "AND list_contains(r.conclusion_codes, '39607008')",
    )
    assert s1["patient_token"] in cohort
    assert s2["patient_token"] not in cohort
    structs = _invoke(
        "sql",
        "--lake",
        str(lake),
        "SELECT count(*) AS n FROM orders, unnest(reason_code) AS u(c) "
        "WHERE c.system = 'http://hl7.org/fhir/sid/icd-10'",
    )
    assert structs.split()[-1] == "1"
    # and in the Python API a training cohort is filtered alike (no volumes here: none stored)
    from pipeline.tensors.dataset import cohort

    volumes = cohort(
        paths,
        sql="SELECT se.SeriesInstanceUID FROM series se JOIN orders o USING (StudyInstanceUID) "
        "WHERE list_contains(o.reason_codes, '29857009')",
    )
    assert volumes.empty


def test_reimport_adds_nothing_and_a_final_report_supersedes(lake: Path, tmp_path: Path) -> None:
    export = _export(tmp_path / "export")
    _invoke("fhir-import", str(export), "--lake", str(lake))
    paths = _paths(lake)
    versions = {t: current_version(paths, t) for t in ("orders", "reports")}

    again = _invoke("fhir-import", str(export), "--lake", str(lake))
    assert "orders +0, reports +0, superseded 0, unchanged 4, stale 0" in again
    assert {t: current_version(paths, t) for t in ("orders", "reports")} == versions
    assert read_table(paths, "orders").num_rows == 2
    assert read_table(paths, "reports").num_rows == 2
    # nor a second quarantine row for the same bad line
    fhir_rows = [q for q in read_table(paths, "quarantine").to_pylist() if q["stage"] == "fhir"]
    assert len(fhir_rows) == 2
    status = json.loads(_invoke("status", "--lake", str(lake), "--json"))["lake"]
    assert status["quarantine_by_reason"] == {"invalid": 1, "unreadable": 1}

    # the EHR finalises the report: a newer version supersedes the preliminary one
    later = tmp_path / "export2"
    later.mkdir()
    _ndjson(later / "DiagnosticReport.ndjson", [_report_1("2", "final", "2026-01-03T09:00:00Z")])
    out = _invoke("fhir-import", str(later), "--lake", str(lake))
    assert "reports +0, superseded 1" in out
    rows = read_table(paths, "reports").to_pylist()
    assert len(rows) == 2
    assert sorted(r["status"] for r in rows) == ["final", "final"]

    # the older export again: the preliminary version does not come back
    stale = _invoke("fhir-import", str(export), "--lake", str(lake))
    assert "superseded 0, unchanged 3, stale 1" in stale
    assert sorted(r["status"] for r in read_table(paths, "reports").to_pylist()) == [
        "final",
        "final",
    ]


def test_a_manifest_naming_a_missing_file_is_a_one_line_error(lake: Path, tmp_path: Path) -> None:
    export = _export(tmp_path / "export")
    (export / "ImagingStudy.ndjson").unlink()
    result = runner.invoke(app, ["fhir-import", str(export), "--lake", str(lake)])
    assert result.exit_code == 2, result.output
    assert "lists ImagingStudy.ndjson, which the folder lacks" in result.output
    assert "unexpected" not in result.output
