"""Issue #23 §4: agreement between two readers, and the blinding and reading-order helpers of
review queues (plain Python; the HTTP side is tests/security/test_review_queues.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.lake import LakePaths, read_table
from pipeline.review.agreement import agreement, cohens_kappa
from pipeline.review.queue import (
    assign_queue,
    blinded_keys,
    load_queues,
    neighbours,
    visible_reviews,
)

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def _review(i: int, key: str, reviewer: str, decision: str) -> dict[str, object]:
    return {
        "review_id": f"r{i:03d}",
        "finding_key": key,
        "reviewer": reviewer,
        "decision": decision,
        "reviewed_at": T0 + timedelta(minutes=i),
    }


def test_kappa_against_a_hand_computed_case() -> None:
    # 10 findings: 4 accept/accept, 3 reject/reject, accept/reject, reject/accept,
    # uncertain/accept.  po = 7/10; marginals A (5, 4, 1), B (6, 4, 0) over
    # (accept, reject, uncertain): pe = .5*.6 + .4*.4 + .1*0 = .46;
    # kappa = (.7 - .46) / .54 = 4/9; SE = sqrt(.7*.3 / (10 * .54^2)) = .268359;
    # 95% CI = 4/9 -+ 1.96 * .268359 = (-.0815, .9704).
    pairs = (
        [("accept", "accept")] * 4
        + [("reject", "reject")] * 3
        + [("accept", "reject"), ("reject", "accept"), ("uncertain", "accept")]
    )
    po, pe, kappa, ci = cohens_kappa(pairs)
    assert po == pytest.approx(0.7)
    assert pe == pytest.approx(0.46)
    assert kappa == pytest.approx(4 / 9)
    assert ci is not None
    assert ci[0] == pytest.approx(-0.0815, abs=1e-4)
    assert ci[1] == pytest.approx(0.9704, abs=1e-4)


def test_kappa_edge_cases() -> None:
    assert cohens_kappa([]) == (None, None, None, None)
    # both readers always say accept: agreement 100%, chance agreement 1, kappa undefined
    po, pe, kappa, ci = cohens_kappa([("accept", "accept")] * 3)
    assert (po, pe, kappa, ci) == (1.0, 1.0, None, None)
    # perfect agreement over two classes: kappa 1, interval clipped to 1
    po, _, kappa, ci = cohens_kappa([("accept", "accept"), ("reject", "reject")] * 5)
    assert (po, kappa, ci) == (1.0, 1.0, (1.0, 1.0))
    with pytest.raises(ValueError, match="decisions must be among"):
        cohens_kappa([("accept", "maybe")])


def test_agreement_from_reviews_uses_each_readers_latest_decision() -> None:
    reviews = [
        _review(1, "k1", "ann", "reject"),
        _review(2, "k1", "ann", "accept"),  # ann changed her mind: accept counts
        _review(3, "k1", "bob", "accept"),
        _review(4, "k2", "ann", "reject"),
        _review(5, "k2", "bob", "accept"),
        _review(6, "k3", "ann", "accept"),  # bob has not read k3 yet
        _review(7, "k9", "bob", "accept"),  # not in the queue
        _review(8, "k2", "cyd", "reject"),  # not a reader of it
    ]
    a = agreement(reviews, ("ann", "bob"), ["k1", "k2", "k3"])
    assert (a.pairs, a.agreed, a.pending) == (2, 1, 1)
    assert a.observed == pytest.approx(0.5)
    assert a.table == {("accept", "accept"): 1, ("reject", "accept"): 1}
    # A: accept .5, reject .5; B: accept 1 -> pe = .5, kappa = 0
    assert a.kappa == pytest.approx(0.0)


def test_two_readers_are_blind_until_both_decided(tmp_path: Path) -> None:
    lake = LakePaths(tmp_path / "lake")
    q = assign_queue(
        lake, name="double", reviewers=["ann", "bob"], finding_keys=["k1", "k2"], assigned_by="lea"
    )
    solo = assign_queue(
        lake, name="solo", reviewers=["cyd"], finding_keys=["k3"], assigned_by="lea"
    )
    assert [x.queue_id for x in load_queues(lake)] == [q.queue_id, solo.queue_id]
    assert read_table(lake, "queues").num_rows == 2
    reviews = [_review(1, "k1", "ann", "accept"), _review(2, "k3", "lea", "reject")]
    queues = load_queues(lake)
    assert blinded_keys(queues, reviews, "bob") == {"k1", "k2"}
    assert blinded_keys(queues, reviews, "lea") == set()  # not a reader: sees everything
    assert blinded_keys(queues, reviews, "cyd") == set()  # a one-reader queue blinds nobody
    assert [r["review_id"] for r in visible_reviews(reviews, "bob", queues)] == ["r002"]
    assert [r["review_id"] for r in visible_reviews(reviews, "ann", queues)] == ["r001", "r002"]
    reviews.append(_review(3, "k1", "bob", "reject"))
    assert blinded_keys(queues, reviews, "bob") == {"k2"}  # both decided k1: open to both
    assert len(visible_reviews(reviews, "bob", queues)) == 3


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"name": " "}, "needs a name"),
        ({"reviewers": ["ann", "ann"]}, "two different reviewers"),
        ({"reviewers": ["a", "b", "c"]}, "two different reviewers"),
        ({"finding_keys": []}, "at least one finding"),
        ({"finding_keys": ["k1", "k1"]}, "listed twice"),
    ],
)
def test_bad_queues_are_refused(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "name": "q",
        "reviewers": ["ann"],
        "finding_keys": ["k1"],
        "assigned_by": "lea",
    }
    args.update(kw)
    with pytest.raises(ValueError, match=message):
        assign_queue(LakePaths(tmp_path / "lake"), **args)  # type: ignore[arg-type]


def test_neighbours() -> None:
    keys = ["a", "b", "c"]
    assert neighbours(keys, "a") == neighbours(keys, "a").__class__(0, 3, None, "b")
    assert (neighbours(keys, "b").previous, neighbours(keys, "b").next) == ("a", "c")
    assert neighbours(keys, "c").next is None
    assert neighbours(keys, "zz").index is None
