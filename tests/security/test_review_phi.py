"""Issue #18, section 3: a reviewer's comment that names the patient never reaches the research
zone or the shareable report.

Against the real app over HTTP: a comment (or corrected label) holding the patient's name,
MRN, accession number or birth date, in any of the forms people type them, is refused (400,
the form shown again with the reason, nothing stored in ``research/tables/reviews``, the
refusal audited without the identifier); a clean comment is stored. The report leaves out a
comment stored before the check existed.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from test_review_support import (
    WAIT_S,
    audit_records,
    csrf_token,
    finding_rows,
    logged_in,
    review_config,
    serve,
    shared_lake,
)

from pipeline.lake import LakePaths, read_table
from pipeline.review.phi import check_free_text, patient_identifiers
from pipeline.review.report import WITHHELD, build_report
from pipeline.review.store import record_decision

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, session_key_file: Path) -> LakePaths:
    return shared_lake(tmp_path_factory, session_key_file)


def _patient(lake: LakePaths, finding: dict[str, Any]) -> dict[str, Any]:
    """The vault's identifiers of a finding's patient (read here to build the test's
    comments; the app reads them through patient_identifiers)."""
    vault = read_table(lake, "vault").to_pylist()
    row = next(v for v in vault if v["series_pseudonym"] == finding["SeriesInstanceUID"])
    accessions = sorted(
        {v["AccessionNumber"] for v in vault if v["patient_token"] == row["patient_token"]}
    )
    return {**row, "accessions": accessions}


def _comments(p: dict[str, Any]) -> list[str]:
    """Comments that identify the patient, in the forms people type."""
    family, given = p["PatientName"].split("^")[:2]
    birth = dt.datetime.strptime(p["PatientBirthDate"], "%Y%m%d").date()
    mrn = p["PatientID"]
    return [
        f"{given} {family}, MRN {mrn}",  # the finding of the measured report
        f"pt {family.upper()}^{given.upper()}",
        f"see {given.lower()}'s previous scan",
        f"mrn {mrn[:3]}-{mrn[3:]}",
        f"acc no. {p['accessions'][-1]}",
        f"born {birth.isoformat()}",
        f"dob {birth.strftime('%d.%m.%Y')}",
        f"dob {birth.strftime('%m/%d/%Y')}",
        f"dob {birth.day} {birth.strftime('%b %Y')}",
    ]


def test_patient_identifiers_reads_the_finding_patient(lake: LakePaths) -> None:
    finding = finding_rows(lake)[0]
    p = _patient(lake, finding)
    ids = patient_identifiers(lake, finding["SeriesInstanceUID"])
    assert {p["PatientName"], p["PatientID"], p["PatientBirthDate"], *p["accessions"]} <= ids
    others = [v for v in read_table(lake, "vault").to_pylist() if v["PatientID"] != p["PatientID"]]
    assert others
    assert others[0]["PatientID"] not in ids  # one patient's identifiers only
    assert patient_identifiers(lake, "2.25.1") == set()


def test_check_free_text_forms() -> None:
    ids = {"SVOBODA^SIOBHÁN", "MRN-0042-7", "19420217", "SA54163838"}
    for text in (
        "Siobhan Svoboda",
        "svoboda",
        "SIOBHÁN",
        "00427",
        "mrn0042 7",
        "sa 5416 3838",
        "17.2.1942",
        "02/17/1942",
        "1942-02-17",
        "17 February 1942",
        "Feb 17, 1942",
        "17.02.42",
    ):
        ok, reason = check_free_text(text, ids)
        assert not ok, text
        assert reason.startswith("it holds"), text
        for value in ids:
            assert value.lower() not in reason.lower()
    for text in ("mask leaks into the liver", "slice 42 of 120", "lesion 17 mm, 1942 HU?", ""):
        assert check_free_text(text, ids) == (True, ""), text


def test_comments_naming_the_patient_are_refused(lake: LakePaths, session_key_file: Path) -> None:
    finding = finding_rows(lake)[1]
    key = finding["finding_key"]
    p = _patient(lake, finding)
    before_rows = read_table(lake, "reviews").num_rows
    before_audit = len(audit_records(lake))
    with serve(review_config(lake), lake, session_key_file) as base, logged_in(base, "rudi") as s:
        for field in ("comment", "corrected_label"):
            for text in _comments(p):
                page = s.get(base + "/finding", params={"key": key}, timeout=WAIT_S)
                r = s.post(
                    base + "/decide",
                    data={
                        "key": key,
                        "decision": "reject",
                        field: text,
                        "csrf": csrf_token(page.text),
                    },
                    timeout=WAIT_S,
                    allow_redirects=False,
                )
                assert r.status_code == 400, (field, text)
                assert "Not saved" in r.text
                assert "must not identify a patient" in r.text
                assert 'id="decide"' in r.text  # the form is shown again, to correct
        assert read_table(lake, "reviews").num_rows == before_rows  # nothing stored

        page = s.get(base + "/finding", params={"key": key}, timeout=WAIT_S)
        ok = s.post(
            base + "/decide",
            data={
                "key": key,
                "decision": "reject",
                "comment": "mask leaks into the liver",
                "csrf": csrf_token(page.text),
            },
            timeout=WAIT_S,
            allow_redirects=False,
        )
        assert ok.status_code == 303
    assert read_table(lake, "reviews").num_rows == before_rows + 1

    refused = [
        r for r in audit_records(lake)[before_audit:] if r["event"] == "review_comment_refused"
    ]
    assert len(refused) == 2 * len(_comments(p))
    assert {r["details"]["field"] for r in refused} == {"comment", "corrected_label"}
    assert all(r["details"]["reviewer"] == "rudi" for r in refused)
    audit_text = json.dumps(audit_records(lake)).lower()
    family, given = (part.lower() for part in p["PatientName"].split("^")[:2])
    for value in (family, given, p["PatientID"], p["PatientBirthDate"], *p["accessions"]):
        assert value.lower() not in audit_text


def test_report_withholds_a_comment_that_names_the_patient(lake: LakePaths, tmp_path: Path) -> None:
    """A decision stored before the check (written here straight to the table) does not
    carry the patient's name into the shareable report."""
    finding = finding_rows(lake)[2]
    p = _patient(lake, finding)
    family, given = p["PatientName"].split("^")[:2]
    record_decision(
        lake,
        finding,
        reviewer="rudi",
        decision="reject",
        comment=f"{given} {family} again",
        corrected_label="corrected-by-qa",
        now=dt.datetime.now(dt.UTC) + dt.timedelta(days=1),
    )
    html, _ = build_report(lake)
    assert family not in html
    assert given not in html
    assert WITHHELD in html
    assert "corrected-by-qa" in html  # a clean corrected label is kept


def test_reviewer_page_does_not_show_identifiers_on_refusal(
    lake: LakePaths, session_key_file: Path
) -> None:
    """The refusal names the kind of identifier, never one the reviewer did not type."""
    finding = finding_rows(lake)[3]
    p = _patient(lake, finding)
    with serve(review_config(lake), lake, session_key_file) as base, logged_in(base, "rudi") as s:
        page = s.get(base + "/finding", params={"key": finding["finding_key"]}, timeout=WAIT_S)
        r = s.post(
            base + "/decide",
            data={
                "key": finding["finding_key"],
                "decision": "accept",
                "comment": f"mrn {p['PatientID']}",
                "csrf": csrf_token(page.text),
            },
            timeout=WAIT_S,
        )
    assert r.status_code == 400
    assert "an ID or accession number" in r.text
    for value in (p["PatientBirthDate"], *p["accessions"], p["PatientName"].split("^")[0]):
        assert value not in r.text
