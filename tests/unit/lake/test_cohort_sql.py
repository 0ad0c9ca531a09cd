"""Issue #24 §1: the SQL that shapes tables for cohorts (age in years, a finding's unique name)
and where a finding lies in patient coordinates."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from pipeline.infer.cohort import extent_mm
from pipeline.lake.queries import finding_name, finding_name_sql, patient_age_years_sql


@pytest.mark.parametrize(
    ("age", "years"),
    [
        ("049Y", 49.0),
        ("018M", 1.5),
        ("003W", 3 * 7 / 365.25),
        ("010D", 10 / 365.25),
        ("49Y", 49.0),
        (" 049y ", 49.0),
        ("", None),
        ("abc", None),
        ("049", None),
        (None, None),
    ],
)
def test_patient_age_in_years(age: str | None, years: float | None) -> None:
    con = duckdb.connect()
    [(got,)] = con.execute(
        f"SELECT {patient_age_years_sql('a')} FROM (SELECT $age::VARCHAR AS a)", {"age": age}
    ).fetchall()
    assert got == (pytest.approx(years) if years is not None else None)


def test_the_unique_name_of_a_finding_is_the_same_as_before_the_split() -> None:
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT {finding_name_sql('f')} FROM (VALUES ('lung_nodule', 2), ('lung', NULL), "
        "('lung_nodule_1', NULL)) f(label, instance)"
    ).fetchall()
    assert [r[0] for r in rows] == ["lung_nodule_2", "lung", "lung_nodule_1"]
    assert finding_name("lung_nodule", 2) == "lung_nodule_2"
    assert finding_name("lung", None) == "lung"


def test_extent_in_patient_coordinates() -> None:
    # 0.5 mm columns, 0.7 mm rows, 2 mm slices, origin (10, 20, -100)
    affine = np.array(
        [[0.5, 0, 0, 10.0], [0, 0.7, 0, 20.0], [0, 0, 2.0, -100.0], [0, 0, 0, 1]], dtype=float
    )
    centre, size = extent_mm([4.0, 10.0, 20.0], [3, 8, 18, 5, 12, 22], affine)
    assert centre == pytest.approx([10 + 20 * 0.5, 20 + 10 * 0.7, -100 + 4 * 2.0])
    assert size == pytest.approx([5 * 0.5, 5 * 0.7, 3 * 2.0])
    assert extent_mm(None, None, affine) == (None, None)


def test_measure_gives_each_label_its_centroid() -> None:
    from pipeline.infer.stage import measure

    labels = np.zeros((10, 20, 30), np.uint8)
    labels[2:5, 3:9, 10:20] = 1
    labels[7, 1, 1] = 2
    labels[8, 1, 1] = 2
    m = measure(labels, labels.astype(float), (1.0, 1.0, 1.0), [1, 2, 3], False)
    assert m[1]["centroid"] == pytest.approx([3.0, 5.5, 14.5])
    assert m[2]["centroid"] == pytest.approx([7.5, 1.0, 1.0])
    assert m[3]["centroid"] is None
