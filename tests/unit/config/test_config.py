"""Config models, the layered loader, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, config_hash, load_config
from pipeline.config.env import env_overrides
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
#: pipeline configs (models.yaml is the model registry, tested in tests/unit/infer)
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "models.yaml")


def test_configs_are_shipped() -> None:
    assert {"demo.yaml", "nightly.yaml"} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path, environ={})
    assert isinstance(cfg, PipelineConfig)


def test_demo_yaml_values() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml", environ={})
    assert cfg.compute.workers == 2
    assert cfg.synth.patients == 3
    assert cfg.crawl.on_invalid == "quarantine"


def test_unknown_key_names_the_closest_valid_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("compute:\n  wrokers: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'compute.wrokers': did you mean 'workers'"):
        load_config(p, environ={})


def test_unknown_top_level_section(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("crawll: {}\n")
    with pytest.raises(ConfigError, match="did you mean 'crawl'"):
        load_config(p, environ={})


def test_bad_choice_lists_valid_values(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("crawl:\n  on_invalid: ignore\n")
    with pytest.raises(ConfigError, match="quarantine"):
        load_config(p, environ={})


def test_precedence_defaults_file_local_env_flags(tmp_path: Path) -> None:
    p = tmp_path / "site.yaml"
    p.write_text("compute: {workers: 3, partition_size: 10}\nlake: /a\n")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "site.yaml").write_text("compute: {workers: 4}\n")
    env = {"PACSFLOW__COMPUTE__WORKERS": "5", "PACSFLOW__CRAWL__INCREMENTAL": "false"}
    assert load_config(environ={}).compute.workers == 2
    assert load_config(p, environ={}).compute.workers == 4  # local twin beats file
    cfg = load_config(p, environ=env)
    assert cfg.compute.workers == 5  # env beats local
    assert cfg.compute.partition_size == 10  # untouched keys survive merging
    assert cfg.crawl.incremental is False
    cfg = load_config(p, environ=env, overrides={"compute": {"workers": 6}})
    assert cfg.compute.workers == 6  # flags beat env
    assert str(cfg.lake) == "/a"


def test_env_overrides_parse_yaml_scalars() -> None:
    env = {"PACSFLOW__A__B": "4", "PACSFLOW__C": "[x, y]", "OTHER": "1", "PACSFLOW__D": "on"}
    assert env_overrides(env) == {"a": {"b": 4}, "c": ["x", "y"], "d": True}


def test_credentials_in_source_uri_are_refused() -> None:
    with pytest.raises(ConfigError, match="password_env"):
        load_config(overrides={"source": {"uri": "dicomweb+http://u:secret@host/x"}}, environ={})


def test_config_is_frozen_and_hash_is_stable() -> None:
    cfg = load_config(environ={})
    with pytest.raises(Exception, match="frozen"):
        cfg.compute.workers = 9  # type: ignore[misc]
    assert config_hash(cfg) == config_hash(load_config(environ={}))
    assert config_hash(cfg) != config_hash(load_config(overrides={"lake": "/x"}, environ={}))


def test_every_field_is_documented() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                missing += walk(ann)
        return missing

    assert walk(PipelineConfig) == []


def test_readme_documents_every_section() -> None:
    readme = (REPO / "README.md").read_text()
    for section in PipelineConfig.model_fields:
        assert f"`{section}`" in readme, section


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("compute: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar, environ={})


def test_committed_json_schema_matches_the_models() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", REPO / "tools" / "gen_config_schema.py")
    assert spec is not None
    assert spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = (REPO / "configs" / "schema.json").read_text(encoding="utf-8")
    assert committed == gen.render(), "run: python tools/gen_config_schema.py"
