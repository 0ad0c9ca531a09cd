"""The de-identification engine on planted PHI: every depth, file meta, private tags, SR."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dicom_factory import make_ct
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence

from pipeline.deid.core import Deidentifier
from pipeline.deid.keys import Pseudonymizer
from pipeline.deid.profile import Option

PHI = ("DOE^JANE", "PAT-001", "SECRET-ACC", "19700101", "Main Street 1", "Dr^Who", "ACME HOSP")


def _planted() -> Dataset:
    ds = make_ct(number=1)
    ds.PatientBirthDate = "19700101"
    ds.PatientAddress = "Main Street 1"
    ds.AccessionNumber = "SECRET-ACC"
    ds.ReferringPhysicianName = "Dr^Who"
    ds.InstitutionName = "ACME HOSP"
    ds.StudyDate = "20260102"
    ds.SeriesDate = "20260105"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.77"
    ds.file_meta.SourceApplicationEntityTitle = "DOE^JANE"
    # six sequence levels deep, each level carrying a name and a reference
    inner = Dataset()
    inner.PatientName = "DOE^JANE"
    inner.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    for _ in range(5):
        outer = Dataset()
        outer.ReferencedSeriesSequence = Sequence([inner])
        outer.PersonName = "DOE^JANE"
        inner = outer
    ds.ReferencedSeriesSequence = Sequence([inner])  # not in E.1-1: kept, cleaned
    # a private block with PHI
    block = ds.private_block(0x0029, "ACME MEDICAL 1.0", create=True)
    block.add_new(0x20, "LO", "DOE^JANE")
    # SR-like content
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "patient DOE^JANE seen by Dr^Who"
    ds.ContentSequence = Sequence([item])
    return ds


def _values(ds: Dataset) -> str:
    return json.dumps(
        ds.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda e: "")
    )


@pytest.fixture
def deid() -> Deidentifier:
    return Deidentifier(Pseudonymizer(b"k" * 32))


def test_planted_phi_is_gone_everywhere(deid: Deidentifier) -> None:
    ds = _planted()
    out = deid.deidentify(ds).dataset
    text = _values(out) + json.dumps(out.file_meta.to_json_dict())
    for value in PHI:
        assert value not in text, value
    assert ds.PatientName == "DOE^JANE"  # the input is untouched
    assert out.PatientIdentityRemoved == "YES"
    assert "2026d" in out.DeidentificationMethod
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in out.file_meta


def test_references_still_resolve_and_uids_are_keyed(deid: Deidentifier) -> None:
    ds = _planted()
    out = deid.deidentify(ds).dataset
    assert out.SOPInstanceUID != ds.SOPInstanceUID
    assert out.SOPInstanceUID.startswith("2.25.")
    deepest = out.ReferencedSeriesSequence[0]
    for _ in range(5):
        deepest = deepest.ReferencedSeriesSequence[0]
    assert deepest.ReferencedSOPInstanceUID == out.SOPInstanceUID
    assert out.SOPClassUID == ds.SOPClassUID  # registered standard UIDs stay
    again = deid.deidentify(ds).dataset
    assert again.SOPInstanceUID == out.SOPInstanceUID  # deterministic
    other = Deidentifier(Pseudonymizer(b"x" * 32)).deidentify(ds).dataset
    assert other.SOPInstanceUID != out.SOPInstanceUID


def test_dates_shift_by_one_offset_per_patient(deid: Deidentifier) -> None:
    ds = _planted()
    basic = deid.deidentify(ds).dataset
    assert (
        "StudyDate" not in basic or basic.StudyDate in ("", None) or basic.StudyDate != "20260102"
    )
    shifted = Deidentifier(Pseudonymizer(b"k" * 32), [Option.RETAIN_LONG_MODIFIED_DATES])
    out = shifted.deidentify(ds).dataset
    import datetime as dt

    d0 = dt.date(2026, 1, 2)
    study = dt.datetime.strptime(out.StudyDate, "%Y%m%d").date()
    series = dt.datetime.strptime(out.SeriesDate, "%Y%m%d").date()
    assert study != d0
    assert (series - study).days == 3  # the interval within the patient is kept exactly
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    full = Deidentifier(Pseudonymizer(b"k" * 32), [Option.RETAIN_LONG_FULL_DATES])
    assert full.deidentify(ds).dataset.StudyDate == "20260102"


def test_patient_identifiers_become_tokens(deid: Deidentifier) -> None:
    ds = _planted()
    out = deid.deidentify(ds).dataset
    token = deid.pseudo.token("PAT-001")
    assert out.PatientID == token
    assert str(out.PatientName) == token
    assert out.AccessionNumber == deid.pseudo.token("SECRET-ACC", domain="accession")


def test_options_keep_what_they_name() -> None:
    ds = _planted()
    kept = (
        Deidentifier(
            Pseudonymizer(b"k" * 32), [Option.RETAIN_INSTITUTION_IDENTITY, Option.RETAIN_UIDS]
        )
        .deidentify(ds)
        .dataset
    )
    assert kept.InstitutionName == "ACME HOSP"
    assert kept.SOPInstanceUID == ds.SOPInstanceUID
    with pytest.raises(ValueError, match="exclude each other"):
        Deidentifier(
            Pseudonymizer(b"k" * 32),
            [Option.RETAIN_LONG_FULL_DATES, Option.RETAIN_LONG_MODIFIED_DATES],
        )


@pytest.mark.shared_data
def test_real_phi_files_come_out_clean(shared_data: Path, deid: Deidentifier) -> None:
    folder = shared_data / "dicom" / "deid-data"
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix in ("", ".dcm")]
    checked = 0
    for path in files:
        try:
            ds = dcmread(path)
        except Exception:
            continue
        names = [str(ds.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate")]
        out = deid.deidentify(ds).dataset
        text = _values(out)
        for value in names:
            if len(value) >= 4:
                assert value not in text, (path.name, value)
        checked += 1
    assert checked >= 5


def test_patient_characteristics_keep_age_sex_size_weight_but_not_ethnic_group() -> None:
    """Issue #20 §3: ethnic origin is special-category data (GDPR Art. 9); Retain Patient
    Characteristics keeps it only where the configuration names it."""
    ds = _planted()
    ds.PatientAge, ds.PatientSex, ds.PatientSize, ds.PatientWeight = "056Y", "F", 1.68, 61
    ds.EthnicGroup = "CANARY-ETHNIC"
    ds.add_new(0x00102162, "UC", "CANARY-ETHNICS")  # Ethnic Groups (2026d)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "CANARY1", "99LOCAL"
    code.CodeMeaning = "CANARY-ETHNIC-CODE"
    ds.add_new(0x00102161, "SQ", Sequence([code]))  # Ethnic Group Code Sequence
    options = [Option.RETAIN_PATIENT_CHARACTERISTICS, Option.RETAIN_LONG_MODIFIED_DATES]
    out = Deidentifier(Pseudonymizer(b"k" * 32), options).deidentify(ds).dataset
    assert (out.PatientAge, out.PatientSex, out.PatientSize, out.PatientWeight) == (
        "056Y",
        "F",
        1.68,
        61,
    )
    for tag in (0x00102160, 0x00102161, 0x00102162):
        assert tag not in out, hex(tag)
    assert "CANARY" not in _values(out)
    named = Deidentifier(Pseudonymizer(b"k" * 32), options, retain_ethnic_group=True)
    kept = named.deidentify(ds).dataset
    assert kept.EthnicGroup == "CANARY-ETHNIC"
    assert 0x00102162 in kept
    assert 0x00102161 in kept
    # without the option, naming it keeps nothing (it only narrows what the option keeps)
    basic = Deidentifier(Pseudonymizer(b"k" * 32), retain_ethnic_group=True).deidentify(ds)
    assert 0x00102160 not in basic.dataset
