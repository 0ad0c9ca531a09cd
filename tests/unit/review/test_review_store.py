"""The review decision store and its arithmetic: decisions as rows of `reviews` with history,
latest-wins status, acceptance rates with Wilson intervals, sampling, label-set export and the
worklist query."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.lake import LakePaths, read_table
from pipeline.review.store import (
    acceptance,
    by_group,
    history,
    label_set,
    latest_decisions,
    load_reviews,
    metrics_by_version,
    record_decision,
    sample,
    wilson_interval,
)
from pipeline.review.worklist import Query, run_query

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def _finding(
    i: int, *, voxels: int = 10, score: float | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "finding_key": f"s{i}/t/tiny@0.1.0+abc/label{i % 3}",
        "SeriesInstanceUID": f"2.25.{i}",
        "tensor_key": f"s{i}/t",
        "tensor_checksum": f"sha256:{i:064x}",
        "model": "tiny",
        "model_version": "0.1.0",
        "weights_sha256": "ab" * 32,
        "label": f"label{i % 3}",
        "label_value": i % 3 + 1,
        "voxel_count": voxels,
        "score": score,
        "mask_path": f"masks/s{i}.npy",
        "Manufacturer": "ACME" if i % 2 else "Globex",
        "Modality": "CT",
        "StudyDate": date(2020, 1, 1) + timedelta(days=i),
        **extra,
    }


def test_decisions_are_rows_with_history_and_latest_wins(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake")
    f = _finding(1)
    record_decision(lake, f, reviewer="ann", decision="reject", comment="leak", now=T0)
    record_decision(
        lake,
        f,
        reviewer="bob",
        decision="accept",
        corrected_label="label9",
        now=T0 + timedelta(hours=1),
    )
    record_decision(
        lake, _finding(2), reviewer="ann", decision="uncertain", now=T0 + timedelta(minutes=1)
    )
    table = read_table(lake, "reviews")
    assert table.num_rows == 3
    rows = load_reviews(lake)
    assert [r["decision"] for r in rows] == ["reject", "uncertain", "accept"]
    mine = history(rows, f["finding_key"])
    assert [(r["reviewer"], r["decision"]) for r in mine] == [("ann", "reject"), ("bob", "accept")]
    assert mine[0]["comment"] == "leak"
    assert mine[0]["corrected_label"] is None
    assert mine[1]["corrected_label"] == "label9"
    for r in mine:  # each decision stays tied to what the model saw
        assert r["model_version"] == "0.1.0"
        assert r["tensor_checksum"] == f["tensor_checksum"]
        assert r["reviewed_at"].tzinfo is not None
    latest = latest_decisions(rows)
    assert latest[f["finding_key"]]["decision"] == "accept"
    assert latest[_finding(2)["finding_key"]]["decision"] == "uncertain"
    # latest wins whatever the order rows come in
    assert latest_decisions(reversed(rows)) == latest


def test_bad_decisions_are_refused(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake")
    with pytest.raises(ValueError, match="decision must be"):
        record_decision(lake, _finding(1), reviewer="ann", decision="maybe")
    with pytest.raises(ValueError, match="reviewer"):
        record_decision(lake, _finding(1), reviewer="", decision="accept")
    assert read_table(lake, "reviews").num_rows == 0


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # reference values (Wilson 1927; e.g. statsmodels proportion_confint method="wilson")
        (8, 10, 0.4901624, 0.9433178),
        (0, 10, 0.0, 0.2775328),
        (10, 10, 0.7224672, 1.0),
        (50, 100, 0.4038315, 0.5961685),
        (1, 1, 0.2065493, 1.0),
    ],
)
def test_wilson_interval(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-6)
    assert got[1] == pytest.approx(hi, abs=1e-6)
    p = k / n
    assert got[0] <= p <= got[1]


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)
    # narrower with more data at the same proportion
    a, b = wilson_interval(5, 10), wilson_interval(500, 1000)
    assert b[1] - b[0] < a[1] - a[0]


def test_acceptance_rate_arithmetic() -> None:
    r = acceptance(["accept", "accept", "reject", "uncertain", "accept"])
    assert (r.reviewed, r.accepted, r.rejected, r.uncertain, r.decided) == (5, 3, 1, 1, 4)
    assert r.rate == pytest.approx(0.75)  # uncertain is reviewed but not decided
    assert r.interval == wilson_interval(3, 4)
    empty = acceptance([])
    assert empty.rate is None
    assert empty.interval == (0.0, 1.0)
    only_uncertain = acceptance(["uncertain"])
    assert only_uncertain.reviewed == 1
    assert only_uncertain.rate is None
    groups = by_group([("B", "accept"), ("A", "reject"), ("B", "reject"), ("B", "accept")])
    assert list(groups) == ["A", "B"]
    assert groups["A"].rate == 0.0
    assert groups["B"].rate == pytest.approx(2 / 3)


def test_metrics_by_version() -> None:
    findings = [_finding(i, score=i / 10) for i in range(6)]
    findings.append({**_finding(6), "model_version": "0.2.0"})
    t = T0
    decisions = {
        findings[0]["finding_key"]: "accept",
        findings[1]["finding_key"]: "reject",
        findings[2]["finding_key"]: "accept",
        findings[3]["finding_key"]: "uncertain",
    }
    latest = {
        k: {"decision": d, "reviewed_at": t, "review_id": k, "reviewer": "ann"}
        for k, d in decisions.items()
    }
    out = metrics_by_version(findings, latest)
    assert [(m.model, m.model_version) for m in out] == [("tiny", "0.1.0"), ("tiny", "0.2.0")]
    v1, v2 = out
    assert v1.findings == 6
    assert v1.overall.reviewed == 4
    assert v1.overall.rate == pytest.approx(2 / 3)
    assert set(v1.by_manufacturer) == {"ACME", "Globex"}
    assert v1.by_manufacturer["Globex"].accepted == 2  # findings 0 and 2
    assert v1.by_manufacturer["ACME"].rejected == 1
    assert list(v1.by_month) == ["2026-03"]
    assert sorted(v1.scores_accepted) == [0.0, 0.2]
    assert v1.scores_rejected == [0.1]
    assert v2.overall.reviewed == 0
    assert v2.overall.rate is None


def test_sampling_is_deterministic_and_exact() -> None:
    findings = [_finding(i, voxels=0 if i % 4 else 5) for i in range(200)]
    positives = sample(findings, "positives")
    assert len(positives) == 50
    assert all(f["voxel_count"] > 0 for f in positives)
    neg = sample(findings, "negatives", percent=10, seed=7)
    assert len(neg) == 15  # ceil(150 * 10%)
    assert all(f["voxel_count"] == 0 for f in neg)
    # same seed, same sample, whatever the input order; another seed, another sample
    again = sample(list(reversed(findings)), "negatives", percent=10, seed=7)
    assert {f["finding_key"] for f in again} == {f["finding_key"] for f in neg}
    other = sample(findings, "negatives", percent=10, seed=8)
    assert {f["finding_key"] for f in other} != {f["finding_key"] for f in neg}
    # adding findings does not reshuffle the ones already there (hash-ranked)
    qa = sample(findings, "qa", percent=10, seed=7)
    assert len(qa) == 65
    assert sample(findings, "negatives", percent=0, seed=7) == []
    assert len(sample(findings, "negatives", percent=100)) == 150
    assert len(sample(findings, "all")) == 200
    with pytest.raises(ValueError, match="sampling mode"):
        sample(findings, "everything")


def test_lowest_confidence_first_keeps_unknown_last() -> None:
    findings = [_finding(0, score=0.9), _finding(1), _finding(2, score=0.1), _finding(3)]
    order = [f["finding_key"] for f in sample(findings, "lowest-confidence")]
    assert order == [
        findings[2]["finding_key"],
        findings[0]["finding_key"],
        findings[1]["finding_key"],
        findings[3]["finding_key"],
    ]


def test_label_set_exports_accepted_and_rejected_only() -> None:
    findings = [_finding(i) for i in range(4)]
    latest: dict[str, dict[str, Any]] = {
        findings[0]["finding_key"]: {
            "decision": "accept",
            "corrected_label": None,
            "reviewer": "ann",
            "reviewed_at": T0,
            "review_id": "r0",
        },
        findings[1]["finding_key"]: {
            "decision": "reject",
            "corrected_label": "other",
            "reviewer": "bob",
            "reviewed_at": T0,
            "review_id": "r1",
        },
        findings[2]["finding_key"]: {
            "decision": "uncertain",
            "corrected_label": None,
            "reviewer": "bob",
            "reviewed_at": T0,
            "review_id": "r2",
        },
    }
    table = label_set(findings, latest)
    rows = table.to_pylist()
    assert [r["decision"] for r in rows] == ["accept", "reject"]
    assert rows[0]["final_label"] == findings[0]["label"]
    assert rows[1]["final_label"] == "other"
    assert rows[0]["tensor_checksum"] == findings[0]["tensor_checksum"]
    assert rows[0]["mask_path"] == "masks/s0.npy"


def test_worklist_query_filters_sorts_and_pages() -> None:
    findings = [_finding(i, score=(i % 10) / 10) for i in range(120)]
    latest = {
        findings[0]["finding_key"]: {"decision": "accept", "reviewed_at": T0, "review_id": "a"},
        findings[1]["finding_key"]: {"decision": "reject", "reviewed_at": T0, "review_id": "b"},
    }
    page = run_query(findings, latest, Query.parse({}, per_page=50))
    assert (page.total, page.pages, len(page.rows)) == (120, 3, 50)
    last = run_query(findings, latest, Query.parse({"page": "9"}, per_page=50))
    assert last.page == 3
    assert len(last.rows) == 20
    acme = run_query(findings, latest, Query.parse({"manufacturer": "ACME", "label": "label1"}))
    assert acme.total == 20
    assert all(r["Manufacturer"] == "ACME" and r["label"] == "label1" for r in acme.rows)
    scored = run_query(
        findings, latest, Query.parse({"score_min": "0.5", "sort": "score", "order": "desc"})
    )
    assert scored.total == 60
    assert scored.rows[0]["score"] == pytest.approx(0.9)
    accepted = run_query(findings, latest, Query.parse({"status": "accept"}))
    assert [r["finding_key"] for r in accepted.rows] == [findings[0]["finding_key"]]
    assert run_query(findings, latest, Query.parse({"status": "unreviewed"})).total == 118
    assert run_query(findings, latest, Query.parse({"status": "reviewed"})).total == 2
    dated = run_query(
        findings, latest, Query.parse({"date_from": "2020-01-11", "date_to": "2020-01-20"})
    )
    assert dated.total == 10
    # nonsense values fall back to defaults instead of failing
    q = Query.parse({"page": "x", "score_min": "abc", "sort": "evil", "sample": "?"})
    assert (q.page, q.score_min, q.sort, q.sample) == (1, None, "", "all")
    assert Query.parse({"label": "a", "page": "2"}).params(page=3) == {"label": "a", "page": "3"}
    assert math.isclose(Query.parse({"percent": "250"}).percent, 100.0)


def test_boxes_and_predicted_classes_are_positives() -> None:
    """Detection and classification findings have no mask (voxel_count null): a box above the
    detector's threshold and a predicted class are positives, the other classes negatives.
    Was: every box and class counted as a negative."""
    box = _finding(1, voxels=0, box_mm=[0.0, 0.0, 0.0, 4.0, 4.0, 4.0], voxel_count=None)
    top = _finding(2, voxels=0, predicted=True, voxel_count=None)
    other = _finding(3, voxels=0, predicted=False, voxel_count=None)
    empty = _finding(4, voxels=0)
    assert sample([box, top, other, empty], "positives") == [box, top]
    assert sample([box, top, other, empty], "negatives", percent=100) == [other, empty]
