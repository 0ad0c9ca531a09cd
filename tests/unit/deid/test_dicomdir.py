"""DICOMDIR records: every record de-identified with its own patient's tokens and date shift,
file IDs pseudonymised, references still resolving, offsets rewritten so the tree still reads."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from dicom_factory import make_ct
from pydicom import Dataset
from pydicom.fileset import FileSet

from pipeline.deid.core import Deidentifier
from pipeline.deid.dicomdir import write_dicomdir
from pipeline.deid.keys import Pseudonymizer

PSEUDO = Pseudonymizer(b"d" * 32)
OPTIONS = ("retain_long_modified_dates",)


def _tree(ds: Dataset) -> list[tuple[int, str]]:
    """Walk the record tree by its offsets: (depth, record type) in order."""
    by_pos = {int(r.seq_item_tell): r for r in ds.DirectoryRecordSequence}
    out: list[tuple[int, str]] = []

    def walk(pos: int, depth: int) -> None:
        while pos:
            rec = by_pos[pos]  # KeyError: an offset that points at no record
            out.append((depth, str(rec.DirectoryRecordType)))
            walk(int(rec.OffsetOfReferencedLowerLevelDirectoryEntity), depth + 1)
            pos = int(rec.OffsetOfTheNextDirectoryRecord)

    walk(int(ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity), 0)
    return out


def _media(tmp_path: Path) -> Path:
    """A real DICOMDIR written by pydicom's FileSet over two patients' CT images."""
    fs = FileSet()
    for i, (pid, name) in enumerate((("PID-0001", "DOE^JANE"), ("PID-0002", "ROE^RICHARD"))):
        ds = make_ct(number=1, series_uid=f"1.2.826.0.1.3680043.8.498.77.{i}")
        ds.PatientID, ds.PatientName = pid, name
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.78.{i}"
        ds.StudyDate = "20250310" if i == 0 else "20240101"
        ds.AccessionNumber = f"ACC{i}77"
        ds.StudyID = "1"
        fs.add(ds)
    fs.write(tmp_path / "media")
    fs._stage["t"].cleanup()  # FileSet stages in a temporary folder it leaves to the GC
    return tmp_path / "media" / "DICOMDIR"


def test_records_are_deidentified_per_patient_and_the_tree_still_reads(tmp_path: Path) -> None:
    path = _media(tmp_path)
    original = pydicom.dcmread(path)
    out = Deidentifier(PSEUDO, OPTIONS).deidentify(original).dataset
    data = write_dicomdir(original, out)
    for phi in (b"DOE", b"ROE", b"PID-000", b"ACC077", b"ACC177", b"1.2.826.0.1.3680043.8.498.7"):
        assert phi not in data
    back = pydicom.dcmread(io.BytesIO(data))
    assert _tree(back) == _tree(original)  # the same hierarchy, through the new offsets
    patients = [r for r in back.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"]
    assert [str(p.PatientID) for p in patients] == [
        PSEUDO.token("PID-0001"),
        PSEUDO.token("PID-0002"),
    ]
    studies = [r for r in back.DirectoryRecordSequence if r.DirectoryRecordType == "STUDY"]
    # each study shifted by its own patient's offset (independent patients)
    import datetime as dt

    for study, pid, date in zip(
        studies, ("PID-0001", "PID-0002"), ("20250310", "20240101"), strict=True
    ):
        shifted = dt.datetime.strptime(str(study.StudyDate), "%Y%m%d").date()
        want = dt.datetime.strptime(date, "%Y%m%d").date()
        assert (shifted - want).days == PSEUDO.date_offset_days(pid)
        assert str(study.AccessionNumber) == PSEUDO.token(
            f"ACC{studies.index(study)}77", domain="accession"
        )
    images = [r for r in back.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    for image in images:
        assert str(image.ReferencedSOPInstanceUIDInFile).startswith("2.25.")
        for part in image.ReferencedFileID:
            assert len(part) <= 8
            assert part.isalnum()
            assert part.isupper()
    assert str(back.file_meta.MediaStorageSOPInstanceUID).startswith("2.25.")


def test_an_instance_and_its_record_map_to_the_same_uid(tmp_path: Path) -> None:
    path = _media(tmp_path)
    original = pydicom.dcmread(path)
    out = Deidentifier(PSEUDO, OPTIONS).deidentify(original).dataset
    image = next(r for r in out.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE")
    source = next(r for r in original.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE")
    instance = pydicom.dcmread(path.parent.joinpath(*source.ReferencedFileID))
    deid_instance = Deidentifier(PSEUDO, OPTIONS).deidentify(instance).dataset
    assert image.ReferencedSOPInstanceUIDInFile == deid_instance.SOPInstanceUID


@pytest.mark.shared_data
def test_real_dicomdirs_come_out_clean_and_readable(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "pydicom" / "pydicom" / "data" / "test_files" / "dicomdirtests"
    paths = [folder / "DICOMDIR", folder / "DICOMDIR-implicit", folder / "TINY_ALPHA" / "DICOMDIR"]
    checked = 0
    for path in paths:
        if not path.exists():
            continue
        original = pydicom.dcmread(path)
        names = {
            str(r.get(k, ""))
            for r in original.DirectoryRecordSequence
            for k in ("PatientName", "PatientID")
        } - {""}
        parts = {p for r in original.DirectoryRecordSequence for p in r.get("ReferencedFileID", [])}
        out = Deidentifier(PSEUDO, OPTIONS).deidentify(original).dataset
        data = write_dicomdir(original, out)
        back = pydicom.dcmread(io.BytesIO(data))
        assert _tree(back) == _tree(original)
        for value in names | {p for p in parts if len(p) >= 5}:
            assert value.encode() not in data, path.name
        checked += 1
    assert checked >= 2
