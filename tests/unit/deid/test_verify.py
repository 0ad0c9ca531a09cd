"""``pacsflow verify`` (issue #20 §3): whole tokens in their DICOM context, so a patient whose
family name is a word of the Standard's vocabulary ("Patient") does not fail a clean run, and
every identifier the vault holds (other patient IDs and names, address, telephone numbers) is
searched for, encrypted vault included."""

from __future__ import annotations

from pathlib import Path

from dicom_factory import make_ct, write
from pydicom import Dataset
from pydicom.sequence import Sequence

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.deid.vault import is_encrypted
from pipeline.deid.verify import verify
from pipeline.lake import LakePaths, read_table

KEY = b"v" * 32
OTHER_ID, OTHER_SEQ_ID = "MRN-778812", "INS-99017734"
ADDRESS = "42 Wallaby Way^Sydney"
PHONE = "+44 20 7946 0958"


def _lake(tmp_path: Path, **deid: object) -> LakePaths:
    ds = make_ct(number=1)
    ds.PatientName = "PATIENT^ANN"
    ds.OtherPatientIDs = OTHER_ID
    item = Dataset()
    item.PatientID, item.TypeOfPatientID = OTHER_SEQ_ID, "TEXT"
    ds.OtherPatientIDsSequence = Sequence([item])
    ds.OtherPatientNames = "SMYTHE-ROSS^ANNABEL"
    ds.PatientAddress = ADDRESS
    ds.PatientTelephoneNumbers = PHONE
    write(ds, tmp_path / "archive" / "ct.dcm")
    cfg = load_config(overrides={"deid": deid}, environ={})
    lake = LakePaths(tmp_path / "lake")
    crawl_run(cfg, lake, FolderSource(tmp_path / "archive"), run_id="c1")
    deid_run(cfg, lake, key=KEY, run_id="d1")
    return lake


def _plant(lake: LakePaths, text: str) -> list[str]:
    (lake.research / "notes.txt").write_text(text)
    return [leak.kind for leak in verify(lake, KEY)]


def test_a_family_name_inside_the_standards_words_is_no_leak(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    # the research tables say "Retain Patient Characteristics Option" (the method codes) and
    # "retain_patient_characteristics" (the method text): words of the Standard, not a name
    header = " ".join(r["header_json"] for r in read_table(lake, "instances").to_pylist())
    assert "Retain Patient Characteristics Option" in header
    assert verify(lake, KEY) == []
    # the name part standing on its own is still found, and so is the whole name
    assert _plant(lake, "seen: PATIENT, then discharged") == ["patient name"]
    assert _plant(lake, "Ann Patient was here") == ["patient name"]
    # whole tokens only: a longer word holding a name form is not the name
    assert _plant(lake, "JoAnn Patients; Patientia") == []


def test_every_identifier_the_vault_holds_is_searched(tmp_path: Path) -> None:
    lake = _lake(tmp_path)
    assert verify(lake, KEY) == []
    assert _plant(lake, f"other id {OTHER_ID}") == ["other patient ID"]
    assert _plant(lake, f"insurance {OTHER_SEQ_ID}") == ["other patient ID"]
    assert _plant(lake, "aka Annabel Smythe-Ross") == ["patient name"]
    assert _plant(lake, "lives at 42 Wallaby Way") == ["address"]
    assert _plant(lake, "call +44 20 7946 0958 or 442079460958") == ["telephone number"]
    assert _plant(lake, "Sydney, 42 degrees") == []  # a city alone, a number: no address


def test_the_new_vault_columns_are_encrypted_with_the_rest(tmp_path: Path) -> None:
    lake = _lake(tmp_path, encrypt_vault=True)
    row = read_table(lake, "vault").to_pylist()[0]
    for col in ("OtherPatientIDs", "OtherPatientNames", "PatientAddress"):
        assert is_encrypted(row[col]), col
    assert is_encrypted(row["PatientTelephoneNumbers"])
    raw = b"".join(p.read_bytes() for p in lake.table("vault").rglob("*.parquet"))
    for value in (OTHER_ID, OTHER_SEQ_ID, "Wallaby", "7946"):
        assert value.encode() not in raw
    assert _plant(lake, f"id {OTHER_SEQ_ID}") == ["other patient ID"]
