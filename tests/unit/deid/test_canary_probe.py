"""A canary probe of the default de-identification (issue #20 §3).

Unique canary values (``CNRY0001X``, ...) are planted throughout one CT image and one
Comprehensive SR: every attribute of Table E.1-1 that holds text or bytes (except those the
default options keep by design: patient age, sex, size, weight and the like), a sample of
public free-text attributes outside the table, nested sequences, coded items (Code Meaning),
a private block (creator, values, a private sequence), an SR content tree (text, person names,
codes, dates, UIDs at several depths) and the file meta. Every UID planted is an original one
(no Standard UID) and every date the same original day. Each object goes through the stage's
export path (``read_object`` -> :meth:`Deidentifier.from_config` of the default configuration
-> ``_export``) and into its research ``instances`` row (``header_json`` included): no canary,
no original UID and no original date may remain in the exported bytes or the row.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from dicom_factory import make_ct
from pydicom import Dataset
from pydicom.datadict import DicomDictionary, dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

from pipeline.config import load_config
from pipeline.deid import _profile
from pipeline.deid.core import _TECHNICAL_TEXT, Deidentifier
from pipeline.deid.keys import Pseudonymizer
from pipeline.deid.profile import rule_for
from pipeline.deid.stage import _export, _instance_row, read_object

KEY = b"c" * 32
DATE, DATETIME = "20310115", "20310115101010"
_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "CS", "AE"})
_BINARY_VRS = frozenset({"OB", "OW", "UN"})


class Canaries:
    """Hands out unique canary strings and original UIDs, and remembers them."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self.uids: list[str] = []

    def __call__(self) -> str:
        value = f"CNRY{len(self.values) + 1:04d}X"
        self.values.append(value)
        return value

    def uid(self) -> str:
        value = f"1.2.826.0.1.3680043.8.498.9{len(self.uids) + 1:05d}"
        self.uids.append(value)
        return value

    def name(self) -> str:
        return f"{self()}^{self()}"

    def code(self, value: str = "", scheme: str = "99PROBE") -> Dataset:
        item = Dataset()
        item.CodeValue = value or f"P{len(self.values):05d}"
        item.CodingSchemeDesignator = scheme
        item.CodeMeaning = f"free text {self()}"
        return item


def _value(vr: str, canary: Canaries) -> object:
    if vr == "PN":
        return canary.name()
    if vr in _BINARY_VRS:
        return canary().encode() + b"\x00"
    if vr == "UR":
        return f"http://example.org/{canary()}"
    return canary()


def _default_engine() -> Deidentifier:
    return Deidentifier.from_config(Pseudonymizer(KEY), load_config(environ={}).deid)


#: special-category data the default keeps nonetheless would be a finding: ethnic group
_ETHNIC_GROUP = frozenset({0x00102160, 0x00102161, 0x00102162})


def _kept_by_design(tag: int, vr: str) -> bool:
    """Kept as it is by the table under the default options (age, sex, size, weight, ...):
    no canary there. Sequences are planted anyway (their items are cleaned), and so is
    Ethnic Group (issue #20 §3: the default must not keep it)."""
    rule = rule_for(tag)
    options = load_config(environ={}).deid.options
    kept = rule is not None and rule.action(options) == "K"
    return kept and vr != "SQ" and tag not in _ETHNIC_GROUP


def _table_tags() -> Iterator[tuple[int, str]]:
    for tag in sorted(_profile.ATTRIBUTES):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if tag >> 16 not in (0x0000, 0x0002):
            yield tag, vr


def _outside_table_text(every: int = 25) -> Iterator[tuple[int, str]]:
    """Every ``every``-th public free-text attribute the table does not list."""
    tags = [
        tag
        for tag, entry in sorted(DicomDictionary.items())
        if entry[0] in ("LO", "LT", "SH", "ST", "UT", "UC", "PN")
        and entry[3] == ""  # not retired
        and tag >> 16 not in (0x0000, 0x0002, 0x0004)
        and rule_for(tag) is None
        and tag not in _TECHNICAL_TEXT
    ]
    for tag in tags[::every]:
        yield tag, DicomDictionary[tag][0]


def _nested(canary: Canaries, depth: int) -> Dataset:
    item = Dataset()
    item.PersonName = canary.name()
    item.add_new(0x00080104, "LO", canary())  # a Code Meaning with no code around it
    item.ReferencedSOPInstanceUID = canary.uid()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    if depth:
        item.ReferencedSeriesSequence = Sequence([_nested(canary, depth - 1)])
    return item


def _private(ds: Dataset, canary: Canaries) -> None:
    block = ds.private_block(0x0009, canary(), create=True)
    block.add_new(0x10, "LO", canary())
    block.add_new(0x11, "PN", canary.name())
    block.add_new(0x12, "DA", DATE)
    block.add_new(0x13, "UI", canary.uid())
    inner = Dataset()
    inner.PatientName = canary.name()
    inner.add_new(0x00291010, "LO", canary())  # a private element inside a private item
    block.add_new(0x14, "SQ", Sequence([inner]))


def _file_meta(ds: Dataset, canary: Canaries) -> None:
    meta = ds.file_meta
    meta.SourceApplicationEntityTitle = canary()
    meta.SendingApplicationEntityTitle = canary()
    meta.ReceivingApplicationEntityTitle = canary()
    meta.ImplementationVersionName = canary()
    meta.PrivateInformationCreatorUID = canary.uid()
    meta.PrivateInformation = canary().encode() + b"\x00"


def _plant_header(ds: Dataset, canary: Canaries) -> None:
    ds.PatientID = canary()
    ds.PatientName = canary.name()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = canary.uid(), canary.uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = canary.uid()
    for tag, vr in [*_table_tags(), *_outside_table_text()]:
        if tag in (0x00100020, 0x00100010, 0x0020000D, 0x0020000E, 0x00080018, 0x00080016):
            continue
        if _kept_by_design(tag, vr):
            continue
        if vr == "SQ":
            ds.add_new(tag, "SQ", Sequence([_nested(canary, 1), canary.code()]))
        elif vr == "UI":
            ds.add_new(tag, vr, canary.uid())
        elif vr == "DA":
            ds.add_new(tag, vr, DATE)
        elif vr == "DT":
            ds.add_new(tag, vr, DATETIME)
        elif vr in _TEXT_VRS or vr in _BINARY_VRS or vr == "UR":
            ds.add_new(tag, vr, _value(vr, canary))
    ds.StudyDate = ds.SeriesDate = DATE
    # kept coded sequences: known codes with free text typed into their meanings
    ds.ProcedureCodeSequence = Sequence(
        [canary.code("77477000", "SCT"), canary.code("CTABD"), canary.code("T-D4000", "SRT")]
    )
    ds.AnatomicRegionSequence = Sequence([canary.code("818981001", "SCT")])
    ds.ReferencedSeriesSequence = Sequence([_nested(canary, 5)])
    _private(ds, canary)
    _file_meta(ds, canary)


def _content_item(canary: Canaries, value_type: str, depth: int) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = value_type
    item.ConceptNameCodeSequence = Sequence([canary.code()])
    if value_type == "TEXT":
        item.TextValue = f"seen by {canary()}"
    elif value_type == "PNAME":
        item.PersonName = canary.name()
    elif value_type == "DATE":
        item.Date = DATE
    elif value_type == "DATETIME":
        item.DateTime = DATETIME
    elif value_type == "UIDREF":
        item.UID = canary.uid()
    elif value_type == "CODE":
        item.ConceptCodeSequence = Sequence([canary.code("121071", "DCM")])
    elif value_type == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
        if depth:
            kinds = ("TEXT", "PNAME", "DATE", "DATETIME", "UIDREF", "CODE", "CONTAINER")
            item.ContentSequence = Sequence([_content_item(canary, k, depth - 1) for k in kinds])
    return item


def _sr(canary: Canaries) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality = ComprehensiveSRStorage, "SR"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = canary.uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = canary.uid(), canary.uid()
    ds.PatientID, ds.PatientName = canary(), canary.name()
    ds.PatientBirthDate = ds.StudyDate = ds.ContentDate = DATE
    ds.StudyTime = ds.ContentTime = "101010"
    ds.InstanceNumber = ds.SeriesNumber = 1
    ds.ReferringPhysicianName, ds.AccessionNumber, ds.StudyID = canary.name(), canary(), canary()
    ds.Manufacturer = "PROBE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = canary.name()
    observer.VerifyingOrganization = canary()
    observer.VerificationDateTime = DATETIME
    observer.VerifyingObserverIdentificationCodeSequence = Sequence([canary.code()])
    ds.VerifyingObserverSequence = Sequence([observer])
    root = _content_item(canary, "CONTAINER", 3)
    del root.RelationshipType
    for keyword in (
        "ValueType",
        "ConceptNameCodeSequence",
        "ContinuityOfContent",
        "ContentSequence",
    ):
        setattr(ds, keyword, root.get(keyword))
    ds.ConceptNameCodeSequence[0].CodeValue = "126000"  # a known DCM code, typed-over meaning
    ds.ConceptNameCodeSequence[0].CodingSchemeDesignator = "DCM"
    _private(ds, canary)
    _file_meta(ds, canary)
    return ds


def _probe(ds: Dataset, tmp_path: Path) -> str:
    """The exported bytes and the research row of ``ds``, as one searchable text."""
    source = tmp_path / "in.dcm"
    ds.save_as(source, enforce_file_format=True)
    engine = _default_engine()
    out_dir = tmp_path / "out"
    with source.open("rb") as fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read, fp2, tail = read_object(fp, True)
        out = engine.deidentify(read, in_place=True).dataset
        _export(out, out_dir, fp2, tail)
        row = _instance_row(out, str(out.PatientID))
    (exported,) = out_dir.rglob("*.dcm")
    return exported.read_bytes().decode("latin-1") + json.dumps(row, default=str)


@pytest.mark.parametrize("kind", ["ct", "sr"])
def test_no_canary_original_uid_or_date_survives_the_default_profile(
    kind: str, tmp_path: Path
) -> None:
    canary = Canaries()
    if kind == "ct":
        ds = make_ct(number=1)
        _plant_header(ds, canary)
    else:
        ds = _sr(canary)
    source = io.BytesIO()
    ds.save_as(source, enforce_file_format=True)
    planted = source.getvalue().decode("latin-1")
    missing = [c for c in canary.values if c not in planted]
    assert not missing, f"canaries not planted: {missing[:5]}"
    text = _probe(ds, tmp_path)
    left = [c for c in canary.values if c in text]
    uids = [u for u in canary.uids if u in text]
    print(f"{kind}: {len(canary.values)} canaries planted, {len(canary.values) - len(left)} gone")
    assert not left, f"{len(left)} of {len(canary.values)} canaries remain: {left[:10]}"
    assert not uids, f"{len(uids)} of {len(canary.uids)} original UIDs remain"
    assert DATE not in text
    assert DATETIME[:8] not in text
    assert len(canary.values) >= (500 if kind == "ct" else 50)
