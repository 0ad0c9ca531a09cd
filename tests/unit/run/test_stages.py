"""The stage declarations are what the runner, ``pacsflow run`` and ``status`` derive from."""

from __future__ import annotations

from pipeline.config import load_config
from pipeline.lake import RESEARCH_TABLES, RESTRICTED_TABLES
from pipeline.lake.queries import OBJECT_EVENTS
from pipeline.run import PIPELINE, enabled_stages, stage_named


def test_every_stage_declares_lake_tables_and_the_run_order() -> None:
    tables = set(RESEARCH_TABLES) | set(RESTRICTED_TABLES)
    for stage in PIPELINE:
        assert set(stage.reads) <= tables, stage.name
        assert set(stage.writes) <= tables, stage.name
        assert stage_named(stage.name) is stage
    assert [s.name for s in PIPELINE] == [
        "crawl",
        "deid",
        "verify",
        "tensors",
        "infer",
        "writeback",
        "fhir",
    ]


def test_each_object_event_comes_from_exactly_one_stage() -> None:
    declared = [e for stage in PIPELINE for e in stage.events]
    assert sorted(declared) == sorted(OBJECT_EVENTS)


def test_the_run_switches_pick_the_stages_in_order() -> None:
    cfg = load_config(overrides={"run": {"verify": False, "writeback": False}}, environ={})
    assert [s.name for s in enabled_stages(cfg)] == ["crawl", "deid", "tensors", "infer", "fhir"]


def test_restricted_stages_are_those_reading_identified_tables() -> None:
    for stage in PIPELINE:
        reads_identified = bool(set(stage.reads) & {"index", "vault"})
        assert stage.restricted == reads_identified, stage.name
