"""Issue #24 §1, tables shaped for cohorts, on a lake the shipped default model inferred.

Findings: `findings` had no study, patient token or modality (a cohort needed three joins);
`label` carried the candidate's number (`lung_nodule_1..3`), so `GROUP BY label` split the
nodules; a nodule seen in the soft-tissue and the lung-kernel reconstruction of one
acquisition counted twice; the measurements were only a JSON string and the age only text.

The archive: one synthetic patient, two CT studies, each with a soft-tissue and a lung-kernel
reconstruction of one acquisition (same frame of reference and acquisition number) and a lung
lesion in the phantom."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.lake import LakePaths, read_table, write_partition
from pipeline.lake.duck import arrow_table, connect
from pipeline.lake.keys import generate_key_file
from pipeline.lake.queries import review_catalog, writeback_groups

pytestmark = pytest.mark.integration

KEYS = ("patient_token", "StudyInstanceUID", "Modality", "Manufacturer", "StudyDate")


class Built:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.lake = LakePaths(root / "lake")
        self.key = root / "lake.key"
        self.truth = json.loads((root / "archive" / "ground_truth.json").read_text())

    def cli(self, *args: str | Path, lake: Path | None = None) -> Any:
        common = ["--lake", str(lake or self.lake.root), "--key-file", str(self.key)]
        result = CliRunner().invoke(app, [str(a) for a in args] + common)
        assert result.exit_code == 0, result.output
        return result

    def sql(self, query: str, lake: Path | None = None) -> list[dict[str, Any]]:
        out = self.cli("sql", "--format", "json", query, lake=lake).output
        rows: list[dict[str, Any]] = json.loads(out)
        return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("cohort")
    synthesize(root / "archive", patients=1, seed=7, ct_slices=24, rows=128, columns=128,
               include_mr=False, include_bad=False)  # fmt: skip
    generate_key_file(root / "lake.key")
    b = Built(root)
    config = root / "cpu.yaml"
    config.write_text("compute: {device: cpu}\n")
    b.cli("crawl", "--source", root / "archive", "--workers", "1")
    b.cli("deid", "--workers", "1")
    b.cli("tensors", "--workers", "1", "--config", config)
    b.cli("infer", "--workers", "1", "--config", config)
    return b


def _lesions_per_study(truth: dict[str, Any]) -> int:
    """The phantom's lesions: the reconstructions of a study show the same ones."""
    per_study: dict[str, int] = {}
    for s in truth["series"]:
        n = len(s.get("lesions") or [])
        per_study[s["StudyInstanceUID"]] = max(per_study.get(s["StudyInstanceUID"], 0), n)
    return sum(per_study.values())


def test_findings_carry_the_cohort_keys(built: Built) -> None:
    rows = read_table(built.lake, "findings").to_pylist()
    assert rows
    series = {r["SeriesInstanceUID"]: r for r in read_table(built.lake, "series").to_pylist()}
    studies = {r["StudyInstanceUID"]: r for r in read_table(built.lake, "studies").to_pylist()}
    for f in rows:
        s = series[f["SeriesInstanceUID"]]
        st = studies[f["StudyInstanceUID"]]
        assert (f["patient_token"], f["StudyInstanceUID"], f["Modality"], f["Manufacturer"]) == (
            s["patient_token"], s["StudyInstanceUID"], s["Modality"], s["Manufacturer"]
        )  # fmt: skip
        assert f["StudyDate"] == st["StudyDate"]
        assert f["patient_age_years"] == st["patient_age_years"] is not None
        assert f["FrameOfReferenceUID"].startswith("2.25.")  # a pseudonym
        assert f["AcquisitionNumber"] == 1
    # the join-free view: a cohort in one query
    [row] = built.sql(
        "SELECT count(*) AS n FROM findings WHERE Modality = 'CT' AND patient_token IS NOT NULL "
        "AND StudyDate IS NOT NULL AND Manufacturer IS NOT NULL"
    )
    assert row["n"] == len(rows)


def test_label_is_the_class_and_the_instance_a_column(built: Built) -> None:
    rows = read_table(built.lake, "findings").to_pylist()
    nodules = [f for f in rows if f["label"] == "lung_nodule"]
    assert nodules, "the phantom's lesions are found"
    for f in nodules:
        assert f["instance"] >= 1
        assert f["finding_key"].endswith(f"/lung_nodule_{f['instance']}")  # keys unchanged
    assert all(f["instance"] is None for f in rows if f["label"] != "lung_nodule")
    grouped = built.sql("SELECT label, count(*) AS n FROM findings GROUP BY label ORDER BY 1")
    assert [g["label"] for g in grouped] == [
        "adipose_tissue", "bone", "lung", "lung_nodule", "soft_tissue"
    ]  # fmt: skip
    # write-back and the review keep the unique name (segment labels, tracking UIDs)
    con = connect()
    try:
        q = writeback_groups(built.lake, None)
        names = {lab["label"] for g in arrow_table(con, q.sql, q.params).to_pylist()
                 for lab in g["labels"]}  # fmt: skip
        catalog = {r["label"] for r in arrow_table(con, review_catalog(built.lake).sql).to_pylist()}
    finally:
        con.close()
    unique = {f"lung_nodule_{f['instance']}" for f in nodules}
    assert unique <= names
    assert "lung_nodule" not in names
    assert unique <= catalog


def test_one_lesion_id_across_the_reconstructions_of_an_acquisition(built: Built) -> None:
    lesions = _lesions_per_study(built.truth)
    assert lesions >= 2
    [row] = built.sql(
        "SELECT count(*) AS n_rows, count(DISTINCT lesion_id) AS n_lesions, "
        "count(DISTINCT SeriesInstanceUID) AS n_series FROM findings WHERE label = 'lung_nodule'"
    )
    assert row["n_series"] == 2 * row["n_lesions"]  # soft-tissue and lung kernels
    assert row["n_rows"] == 2 * lesions
    assert row["n_lesions"] == lesions
    # organs of the same acquisition are linked too; of another study they are not
    per_study = built.sql(
        "SELECT StudyInstanceUID, count(DISTINCT lesion_id) AS n FROM findings "
        "WHERE label = 'lung' GROUP BY ALL"
    )
    assert [r["n"] for r in per_study] == [1, 1]
    assert len({r["lesion_id"] for r in built.sql("SELECT lesion_id FROM findings WHERE "
                                                  "label = 'lung'")}) == 2  # fmt: skip


def test_typed_measurements_and_age_in_years(built: Built) -> None:
    rows = read_table(built.lake, "findings").to_pylist()
    for f in rows:
        m = json.loads(f["measurements"])
        assert f["mean_value"] == pytest.approx(m["mean_value"]["value"])
        if f["label"] == "lung_nodule":
            assert f["diameter_mm"] == pytest.approx(m["diameter_mm"]["value"])
            assert f["elongation"] == pytest.approx(m["elongation"]["value"])
            assert 3 <= f["diameter_mm"] <= 40
            assert len(f["centre_mm"]) == len(f["size_mm"]) == 3
        else:
            assert f["diameter_mm"] is None
    for st in built.sql("SELECT PatientAge, patient_age_years FROM studies"):
        assert st["PatientAge"].endswith("Y")  # the original string is kept
        assert st["patient_age_years"] == float(st["PatientAge"][:3])


def test_rows_of_an_older_release_read_split_and_keyed(built: Built, tmp_path: Path) -> None:
    """A lake inferred before issue #24: `label` ``lung_nodule_1``, none of the new columns.
    The view splits the label, fills the cohort keys and typed measurements."""
    root = tmp_path / "old"
    shutil.copytree(built.lake.root, root)
    old = LakePaths(root)
    new_columns = ("instance", "mean_value", "diameter_mm", "elongation", "patient_age_years",
                   *KEYS, "FrameOfReferenceUID", "AcquisitionNumber")  # fmt: skip
    rows = read_table(old, "findings").to_pylist()
    for f in rows:
        if f["instance"] is not None:
            f["label"] = f"{f['label']}_{f['instance']}"
        for c in new_columns:
            f[c] = None
    write_partition(old, "findings", rows, part="old-release")  # same keys: replaced
    assert all(f["StudyInstanceUID"] is None for f in read_table(old, "findings").to_pylist())
    view = built.sql(
        "SELECT label, instance, diameter_mm, patient_token, StudyInstanceUID, Modality, "
        "Manufacturer, StudyDate, patient_age_years FROM findings WHERE label LIKE 'lung_nodule%'",
        lake=root,
    )
    assert view
    assert all(r["label"] == "lung_nodule" and r["instance"] >= 1 for r in view)
    assert all(r["diameter_mm"] and r["patient_age_years"] for r in view)
    assert all(r[k] is not None for r in view for k in KEYS)
    # write-back composes the same unique names from old rows as from new ones
    con = connect()
    try:
        q = writeback_groups(old, None)
        names = {lab["label"] for g in arrow_table(con, q.sql, q.params).to_pylist()
                 for lab in g["labels"]}  # fmt: skip
    finally:
        con.close()
    assert {f"lung_nodule_{r['instance']}" for r in view} <= names


def test_reviews_and_corrections_views_carry_the_keys(built: Built) -> None:
    for view in ("reviews", "corrections"):
        cols = {r["column_name"] for r in built.sql(f"DESCRIBE {view}")}
        assert {*KEYS, "SeriesInstanceUID", "label", "instance", "lesion_id"} <= cols, view


def test_decisions_and_corrections_store_the_keys(built: Built, tmp_path: Path) -> None:
    import numpy as np

    from pipeline.review.corrections import record_correction
    from pipeline.review.store import record_decision

    root = tmp_path / "reviewed"
    shutil.copytree(built.lake.root, root)
    lake = LakePaths(root)
    con = connect()
    try:
        catalog = arrow_table(con, review_catalog(lake).sql).to_pylist()
    finally:
        con.close()
    f = next(r for r in catalog if r["label"] == "lung_nodule_1")
    record_decision(lake, f, reviewer="qa", decision="accept")
    record_correction(lake, f, np.zeros(f["shape"], dtype=np.uint8), reviewer="qa")
    for table in ("reviews", "corrections"):
        [row] = read_table(lake, table).to_pylist()
        assert {k: row[k] for k in KEYS} == {k: f[k] for k in KEYS}, table
        [view] = built.sql(
            f"SELECT patient_token, label, instance, lesion_id FROM {table}", lake=root
        )
        assert (view["label"], view["instance"]) == ("lung_nodule", 1)
        assert view["patient_token"] == f["patient_token"]
        assert view["lesion_id"].startswith("L")
