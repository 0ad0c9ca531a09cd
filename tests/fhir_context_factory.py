"""Builders of the FHIR context tests (issue #25): a two-patient archive and a synthetic FHIR
Bulk Data export of its orders and reports, full of real-looking PHI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dicom_factory import make_ct, write

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


def make_archive(root: Path) -> Path:
    for study, mrn, name, acc, date, n in (
        (STUDY_1, MRN_1, "KOWALSKI^ANNA", ACC_1, "20260102", 1),
        (STUDY_2, MRN_2, "OKAFOR^CHIDI", ACC_2, "20250315", 2),
    ):
        ds = make_ct(number=n, study_uid=study, series_uid=f"{study}.1")
        ds.PatientID, ds.PatientName, ds.AccessionNumber, ds.StudyDate = mrn, name, acc, date
        write(ds, root / f"im{n}.dcm")
    return root


def write_ndjson(path: Path, resources: list[dict[str, Any] | str]) -> None:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in resources),
        encoding="utf-8",
    )


def report_1(version: str, status: str, updated: str) -> dict[str, Any]:
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


def make_export(folder: Path, study_2: str = STUDY_2) -> Path:
    folder.mkdir(parents=True)
    write_ndjson(
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
    write_ndjson(
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
    write_ndjson(
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
    write_ndjson(
        folder / "DiagnosticReport.ndjson",
        [
            report_1("1", "preliminary", "2026-01-02T11:00:00Z"),
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


def invoke(*args: str) -> str:
    """Run ``pacsflow ARGS`` in-process; its output (exit 0 asserted)."""
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def make_lake(tmp_path: Path) -> Path:
    """The archive of :func:`make_archive` crawled and de-identified into a new lake (of the
    session key, encrypted at rest) through the CLI."""
    archive = make_archive(tmp_path / "archive")
    lake = tmp_path / "lake"
    invoke("crawl", "--source", str(archive), "--lake", str(lake), "--workers", "1")
    invoke("deid", "--lake", str(lake), "--workers", "1")
    return lake


def lake_paths(lake: Path) -> Any:
    """The lake's ``LakePaths`` carrying the session key (``PACSFLOW_KEY_FILE``)."""
    from pipeline.lake import LakePaths
    from pipeline.lake.keys import LakeKeys, load_key

    return LakePaths(lake, keys=LakeKeys(load_key()))
