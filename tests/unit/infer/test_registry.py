"""pipeline.infer.registry: the shipped registry is valid; malformed entries are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.infer.registry import default_registry_path, load_registry


def test_shipped_registry_codes_every_label_of_the_default_model() -> None:
    import json

    registry = load_registry()
    assert registry.path == default_registry_path()
    entry = registry.entry("ct_body_composition")
    meta_path = Path(__file__).resolve().parents[3] / "models" / entry.bundle / "configs"
    meta = json.loads((meta_path / "metadata.json").read_text())
    names = set(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values())
    assert set(entry.labels) == names - {"background"}
    lung = entry.labels["lung"]
    assert lung.type is not None
    assert (lung.type.value, lung.type.scheme, lung.type.meaning) == ("39607008", "SCT", "Lung")
    assert entry.measurements["volume_ml"].unit.value == "ml"
    assert "Modality = 'CT'" in entry.applies_to
    # the 8 views the model's README metrics were measured with
    assert entry.test_time.mirror_axes == ("x", "y")
    assert entry.test_time.transpose_xy
    assert entry.test_time.views == 8


def test_by_bundle_name_and_by_path(tmp_path: Path) -> None:
    registry = load_registry()
    assert registry.entry("ct_body_composition").name == "ct_body_composition"
    adhoc = registry.entry(str(tmp_path))
    assert adhoc.bundle == str(tmp_path)
    assert adhoc.applies_to == "volume_ok"
    assert adhoc.labels == {}
    assert adhoc.test_time.views == 1  # a bundle the registry does not name: one view
    with pytest.raises(ConfigError, match=r"no model 'nope'.*ct_body_composition"):
        registry.entry("nope")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("models: [1, 2]", "expected a mapping"),
        ("models:\n  m:\n    applies_to: x\n", r"model 'm'.*bundle"),
        ("models:\n  m:\n    bundle: b\n    labels:\n      l:\n        type: [1, 2]\n", "'m'"),
        ("models:\n  m:\n    bundle: b\n    colour: red\n", r"model 'm'.*colour"),
        ("models: {a: [", "not valid YAML"),
        ("models:\n  m:\n    bundle: b\n    test_time: {mirror_axes: [w]}\n", r"'m'.*test_time"),
    ],
    ids=["list", "no-bundle", "short-code", "unknown-key", "yaml", "mirror-axis"],
)
def test_malformed_registry(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_registry(path)


def test_missing_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no model registry"):
        load_registry(tmp_path / "absent.yaml")


def test_outputs_say_which_are_findings_and_which_measurements(tmp_path: Path) -> None:
    """Issue #23 §2: the body-composition model's tissue classes are per-series measurements,
    its nodule candidates findings; boxes and predicted classes are findings; an entry
    without ``outputs`` keeps every label a finding."""
    from pipeline.codes.outputs import registry_outputs

    entry = load_registry().entry("ct_body_composition")
    assert [entry.output_kind(t) for t in ("soft_tissue", "adipose_tissue", "bone", "lung")] == [
        "measurement"
    ] * 4
    assert entry.output_kind("lung_nodule_3") == "finding"
    assert entry.output_kind("lung", box=True) == "finding"
    assert entry.output_kind("benign", task="classification", predicted=False) == "class_score"
    assert entry.output_kind("malignant", task="classification", predicted=True) == "finding"
    roles = registry_outputs(None, entry="ct_body_composition", model="x")
    assert roles.measurements == {"soft_tissue", "adipose_tissue", "bone", "lung"}
    # by bundle name, for rows that did not record their entry; unknown: no roles
    assert registry_outputs(None, entry=None, model="ct_body_composition") == roles
    assert not registry_outputs(None, entry=None, model="unknown").measurements
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  m:\n    bundle: b\n")
    assert load_registry(path).entry("m").output_kind("lung") == "finding"
    path.write_text(
        "models:\n  m:\n    bundle: b\n    outputs: {findings: [a], measurements: [a]}\n"
    )
    with pytest.raises(ConfigError, match="listed as a finding and a measurement"):
        load_registry(path)
