"""Issue #23 §6: one way to write a measurement (``elongation 1.16``, not ``1.16 1``)."""

from __future__ import annotations

import pytest

from pipeline.review.format import label_name, measurement_rows, quantity
from pipeline.review.measurements import diameter_mm, size_bin
from pipeline.review.readers import cohen_kappa
from pipeline.review.studies import explain_sampling
from pipeline.review.thumbs import crop_box


@pytest.mark.parametrize(
    ("key", "value", "unit", "text"),
    [
        ("elongation", 1.16, "1", "1.16"),
        ("diameter_mm", 12.34, "mm", "12.3 mm"),
        ("mean_hu", -41.6, "[hnsf'U]", "-42 HU"),
        ("volume_ml", 1234.5, "ml", "1234 mL"),
        ("voxel_count", 12345, "voxels", "12 345"),
        ("size_mm", [12.5, 8.0], None, "12.5 × 8.0 mm"),
        ("score", None, "1", "—"),
    ],
)
def test_quantity(key: str, value: object, unit: str | None, text: str) -> None:
    assert quantity(value, unit, key=key) == text


def test_names_and_rows() -> None:
    assert label_name("diameter_mm") == "diameter"
    assert label_name("adipose_tissue") == "adipose tissue"
    assert label_name("mean_hu") == "mean density"
    rows = measurement_rows(
        '{"diameter_mm": {"value": 12.34, "unit": "mm"}, "elongation": {"value": 1.16,'
        ' "unit": "1"}, "voxel_count": {"value": 3, "unit": "voxels"}}',
        skip=("voxel_count",),
    )
    assert rows == [("diameter", "12.3 mm"), ("elongation", "1.16")]
    assert measurement_rows("not json") == []


def test_sizes_and_agreement() -> None:
    assert diameter_mm({"measurements": '{"diameter_mm": {"value": 7.5}}'}) == 7.5
    assert diameter_mm({"size_mm": [3.0, 25.0, 4.0]}) == 25.0
    ball = diameter_mm({"volume_ml": 4 / 3 * 3.141592653589793 * 0.125})  # r = 5 mm
    assert ball == pytest.approx(10.0)
    assert [size_bin(d) for d in (None, 3, 6, 12, 40)] == [
        "size unknown", "< 6 mm", "6–10 mm", "10–20 mm", "≥ 20 mm"
    ]  # fmt: skip
    assert cohen_kappa([]) is None
    assert cohen_kappa([("accept", "accept"), ("reject", "accept")]) == 0.0


def test_crop_keeps_the_finding_centred_and_inside() -> None:
    j0, j1, i0, i1 = crop_box([0, 20, 20, 0, 22, 22], 48, 48)
    assert (j1 - j0, i1 - i0) == (16, 16)
    assert j0 <= 20
    assert j1 >= 23
    assert crop_box([0, 0, 45, 0, 2, 47], 48, 48)[2:] == (32, 48)
    assert crop_box(None, 48, 40) == (0, 48, 0, 40)


def test_sampling_explained_per_model() -> None:
    seg = {"model": "m", "model_version": "1", "task": None}
    kept = [
        {**seg, "finding_key": "a", "voxel_count": 5, "score": None},
        {**seg, "finding_key": "b", "voxel_count": 0, "score": None},
        {"model": "d", "model_version": "2", "finding_key": "c", "box_mm": [0.0] * 6,
         "score": 0.7},
    ]  # fmt: skip
    out = explain_sampling(kept, "negatives", 10.0, 3, 1)
    assert (out["positives"], out["negatives"]) == (2, 1)
    assert "A random 10% of the 1 negatives" in out["text"]
    rules = {m["model"]: m["rule"] for m in out["models"]}
    assert rules["d@2"].startswith("a detected box")
    assert rules["m@1"].startswith("a mask with at least one voxel")
    assert "; or " not in rules["d@2"]


def test_group_by_study_counts_and_descriptions() -> None:
    from datetime import date

    from pipeline.review.studies import group_by_study, study_order

    def row(key: str, patient: str, study: str, series: str, number: int) -> dict[str, object]:
        return {
            "finding_key": key, "patient_token": patient, "StudyInstanceUID": study,
            "SeriesInstanceUID": series, "SeriesNumber": number, "StudyDate": date(2020, 1, 2),
            "Modality": "CT", "Manufacturer": None,
        }  # fmt: skip

    rows = [
        row("a", "P2", "S2", "s21", 1),
        row("b", "P1", "S1", "s12", 2),
        row("c", "P1", "S1", "s11", 1),
        row("d", "P1", "S1", "s11", 1),
    ]
    ordered = study_order(rows)
    assert [r["finding_key"] for r in ordered] == ["c", "d", "b", "a"]
    groups = group_by_study(
        ordered[:3],  # a page: the P2 study is on the next one
        rows,
        {"c": {"decision": "accept"}},
        {"s11": {"SeriesDescription": "Thorax 1.0", "StudyDescription": "CT chest"}},
    )
    assert len(groups) == 1
    g = groups[0]
    assert (g.patient_token, g.findings, g.decided, g.shown) == ("P1", 3, 1, 3)
    assert g.description == "CT chest"
    assert [(s.series, s.description, len(s.rows)) for s in g.series] == [
        ("s11", "Thorax 1.0", 2),
        ("s12", None, 1),
    ]
    assert g.manufacturers == ["unknown"]
