"""FHIR values follow the configured de-identification profile, as the DICOM attribute of the
same meaning does (issue #25): dates kept, shifted or removed by the options, free text removed
under every shipped option, displays by the Code Meaning rule and ``keep_code_meanings``."""

from __future__ import annotations

import datetime as dt

import pytest
from fhir.resources.R4B.codeableconcept import CodeableConcept

from pipeline.config import load_config
from pipeline.deid.rules import ProfileRules
from pipeline.fhir.deid import codings, shift_datetime, text

WHEN = dt.datetime(2026, 1, 2, 10, 15, tzinfo=dt.timezone(dt.timedelta(hours=1)))


def _rules(**deid: object) -> ProfileRules:
    return ProfileRules.from_config(load_config(overrides={"deid": deid}, environ={}).deid)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        # the default: Retain Longitudinal Temporal Information with Modified Dates
        (["retain_long_modified_dates"], dt.datetime(2025, 12, 23, 9, 15, tzinfo=dt.UTC)),
        (["retain_long_full_dates"], dt.datetime(2026, 1, 2, 9, 15, tzinfo=dt.UTC)),
        ([], None),  # the Basic Profile removes Study Date (Z)
    ],
)
def test_dates_follow_the_study_date_rule(options: list[str], expected: object) -> None:
    rules = _rules(options=options)
    assert shift_datetime(WHEN, -10, rules, "DiagnosticReport.effective") == expected


def test_a_date_becomes_midnight_and_a_partial_date_is_removed() -> None:
    rules = _rules()
    got = shift_datetime(dt.date(2025, 3, 15), -1, rules, "ServiceRequest.authoredOn")
    assert got == dt.datetime(2025, 3, 14, tzinfo=dt.UTC)
    assert shift_datetime("2024", -1, rules, "ServiceRequest.authoredOn") is None


@pytest.mark.parametrize(
    "options",
    [
        ["retain_long_modified_dates", "retain_patient_characteristics"],
        ["clean_descriptors", "retain_long_full_dates"],
        [],
    ],
)
def test_free_text_is_removed_under_every_shipped_option(options: list[str]) -> None:
    rules = _rules(options=options)
    for element in (
        "ServiceRequest.reasonCode.text",
        "ServiceRequest.note",
        "DiagnosticReport.conclusion",
    ):
        assert text("Seen by Dr. Gregory House", rules, element) is None


def test_displays_follow_the_code_meaning_rule() -> None:
    concept = CodeableConcept.model_validate(
        {
            "coding": [
                {"system": "http://snomed.info/sct", "code": "39607008", "display": "RUL lung"},
                {"system": "urn:local", "code": "L1", "display": "local term"},
                {"system": "urn:local", "display": "a display without a code"},
            ],
            "text": "free text",
        }
    )
    assert codings(concept, _rules()) == [
        {"system": "http://snomed.info/sct", "code": "39607008", "display": "Lung"},
        {"system": "urn:local", "code": "L1", "display": None},
    ]
    kept = codings([concept], _rules(keep_code_meanings=["urn:local"]))
    assert kept[1]["display"] == "local term"
