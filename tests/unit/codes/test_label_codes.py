"""Codes follow the model (issue #22, §3): the registry, then the shipped TotalSegmentator
table by label name, then a clearly local code; resolved from the registry file as it is now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_factory import ZOO

from pipeline.codes import (
    LOCAL_SCHEME,
    ModelCodes,
    codes_digest,
    local_codes,
    registry_codes,
    resolve,
    table,
)
from pipeline.errors import ConfigError
from pipeline.infer.registry import load_registry


def test_shipped_table_codes_every_wholebody_label() -> None:
    meta = ZOO / "wholeBody_ct_segmentation" / "configs" / "metadata.json"
    if not meta.is_file():
        pytest.skip("../shared/bundles/model-zoo absent")
    channels = json.loads(meta.read_text())["network_data_format"]["outputs"]["pred"]
    names = [v for k, v in channels["channel_def"].items() if k != "0"]
    assert len(names) == 104
    codes = ModelCodes().resolve(names)
    assert {c.source for c in codes.values()} == {"totalsegmentator"}
    left = codes["adrenal_gland_left"]
    assert left.type == ("23451007", "SCT", "Adrenal gland")
    assert left.type_modifier == ("7771000", "SCT", "Left")
    assert codes["spleen"].category == ("123037004", "SCT", "Anatomical Structure")


def test_registry_wins_then_table_by_name_then_local() -> None:
    spec = {"category": ["85756007", "SCT", "Tissue"], "type": ["39607008", "SCT", "Lung"]}
    assert resolve("spleen", spec).source == "registry"
    assert resolve("Spleen").type == ("78961009", "SCT", "Spleen")  # case ignored
    assert resolve("kidney right").source == "totalsegmentator"  # spaces as underscores
    odd = resolve("Left Kideny")  # BTCV's own spelling: nothing codes it
    assert odd.local
    assert odd.type[1:] == (LOCAL_SCHEME, "Left Kideny")
    assert odd == local_codes("Left Kideny")  # stable
    assert len(odd.type[0]) <= 16  # fits a Code Value (SH)
    assert resolve("spleen", tables=()).local  # an entry may switch tables off
    with pytest.raises(ConfigError, match="no code table 'nope'; shipped tables: totalseg"):
        table("nope")
    with pytest.raises(ConfigError, match=r"labels.x.type: expected \[code value"):
        resolve("x", {"category": ["1", "SCT", "a"], "type": "Lung"})


def test_registry_file_is_read_as_it_is_now(tmp_path: Path) -> None:
    reg = tmp_path / "models.yaml"
    reg.write_text(
        "models:\n"
        "  spl:\n"
        "    bundle: /somewhere/spleen_ct_segmentation\n"
        "    candidates:\n"
        "      nodule: {within: spleen, category: ['49755003', SCT, Morphologically Altered"
        " Structure], type: ['27925004', SCT, Nodule]}\n"
    )
    by_entry = registry_codes(reg, entry="spl", model="whatever")
    by_folder = registry_codes(reg, entry=None, model="spleen_ct_segmentation")
    assert by_entry == by_folder
    codes = by_entry.resolve(["spleen", "nodule_3", "other"])
    assert codes["spleen"].source == "totalsegmentator"
    assert codes["nodule_3"].type == ("27925004", "SCT", "Nodule")
    assert codes["other"].local
    before = codes_digest(codes)
    # a corrected copy of the table, named by the entry: takes effect on the next read
    fixed = tmp_path / "fixed.csv"
    text = (Path(__file__).resolve().parents[3] / "pipeline/codes/data/"
            "totalsegmentator_snomed_mapping.csv").read_text()  # fmt: skip
    fixed.write_text(text.replace("78961009,Spleen", "99999999,Spleen corrected"))
    reg.write_text(reg.read_text() + "    code_table_paths: {totalsegmentator: fixed.csv}\n")
    again = registry_codes(reg, entry="spl", model="whatever").resolve(["spleen"])
    assert again["spleen"].type == ("99999999", "SCT", "Spleen corrected")
    assert codes_digest({**codes, **again}) != before
    # and the registry loader accepts what the codes module reads
    entry = load_registry(reg).entry("spl")
    assert entry.label_codes(["spleen"], reg)["spleen"].type[0] == "99999999"


def test_registry_refuses_an_unknown_code_table(tmp_path: Path) -> None:
    reg = tmp_path / "models.yaml"
    reg.write_text("models:\n  m:\n    bundle: x\n    code_tables: [snomed_all]\n")
    with pytest.raises(ConfigError, match="no table 'snomed_all'; shipped: totalsegmentator"):
        load_registry(reg)
