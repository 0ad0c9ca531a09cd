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
from fhir_context_factory import (
    PHI,
    STUDY_1,
    STUDY_2,
    invoke,
    lake_paths,
    make_export,
    make_lake,
    report_1,
    write_ndjson,
)
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.lake import read_table
from pipeline.lake.delta import current_version

runner = CliRunner()


_invoke = invoke
_paths = lake_paths


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    return make_lake(tmp_path)


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
    export = make_export(tmp_path / "export")
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
    export = make_export(tmp_path / "export")
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
    write_ndjson(
        later / "DiagnosticReport.ndjson", [report_1("2", "final", "2026-01-03T09:00:00Z")]
    )
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
    export = make_export(tmp_path / "export")
    (export / "ImagingStudy.ndjson").unlink()
    result = runner.invoke(app, ["fhir-import", str(export), "--lake", str(lake)])
    assert result.exit_code == 2, result.output
    assert "lists ImagingStudy.ndjson, which the folder lacks" in result.output
    assert "unexpected" not in result.output
