"""The review app's security pieces on their own (no server): server-side sessions and their
timeouts, login throttling with lockout, the bound on password checks, CSV escaping, lenient
worklist parsing of non-finite numbers, and the identifier check of free text."""

from __future__ import annotations

import math
import threading

import anyio
import pyarrow as pa
import pytest

from pipeline.review.auth import Busy, HashGate, LoginThrottle, SessionStore
from pipeline.review.phi import check_free_text
from pipeline.review.store import csv_safe
from pipeline.review.worklist import Query

T0 = 1_700_000_000.0


def test_sessions_end_at_logout_idle_and_absolute_timeouts() -> None:
    store = SessionStore(idle_s=600, absolute_s=3600)
    s = store.create("ann", T0)
    assert store.get(s.sid, T0 + 500).session is s
    assert store.get(s.sid, T0 + 1000).session is s  # 500 s after the last use
    idle = store.get(s.sid, T0 + 1601)
    assert (idle.session, idle.reason, idle.user) == (None, "idle", "ann")
    assert store.get(s.sid, T0 + 1602).reason == "unknown"  # gone for good

    s = store.create("ann", T0)
    for t in range(500, 3600, 500):
        assert store.get(s.sid, T0 + t).session is s
    assert store.get(s.sid, T0 + 3601).reason == "expired"

    s = store.create("ann", T0)
    other = store.create("ann", T0)
    assert s.sid != other.sid
    assert s.csrf != other.csrf
    assert store.delete(s.sid)
    assert store.get(s.sid, T0).reason == "unknown"
    assert store.get(other.sid, T0).session is other
    assert store.get(None, T0).reason == "unknown"


def test_throttle_locks_user_names_and_addresses() -> None:
    t = LoginThrottle(user_failures=3, address_failures=5, window_s=60, lockout_s=300)
    assert t.failed("ann", "10.0.0.1", T0) == 0
    assert t.failed("ANN", "10.0.0.2", T0 + 1) == 0  # user names are case-insensitive
    assert t.failed("ann", "10.0.0.3", T0 + 2) == 300
    assert t.locked("ann", "10.0.0.9", T0 + 3) == pytest.approx(299)
    assert t.locked("bob", "10.0.0.9", T0 + 3) == 0
    assert t.locked("ann", "10.0.0.9", T0 + 303) == 0

    # failures outside the window do not add up
    t = LoginThrottle(user_failures=3, address_failures=5, window_s=60, lockout_s=300)
    for i in range(10):
        t.failed("bob", "10.0.0.1", T0 + 61 * i)
    assert t.locked("bob", "10.0.0.1", T0 + 61 * 10) == 0

    # many names from one address lock the address; a success does not reset it
    t = LoginThrottle(user_failures=3, address_failures=5, window_s=60, lockout_s=300)
    for i in range(4):
        t.failed(f"user{i}", "10.0.0.7", T0)
    t.succeeded("user0")
    t.failed("user9", "10.0.0.7", T0)
    assert t.locked("carl", "10.0.0.7", T0 + 1) > 0
    assert t.locked("carl", "10.0.0.8", T0 + 1) == 0


def test_throttle_memory_is_bounded() -> None:
    t = LoginThrottle(
        user_failures=3, address_failures=3, window_s=60, lockout_s=300, max_entries=100
    )
    for i in range(1000):
        t.failed(f"user{i}", f"10.0.{i // 250}.{i % 250}", T0 + i)
    assert len(t._entries) <= 100


def test_hash_gate_refuses_beyond_its_bound() -> None:
    gate = HashGate(concurrency=2, queue=1)
    release = threading.Event()
    outcomes: list[str] = []

    def slow() -> str:
        release.wait(10)
        return "done"

    async def attempt() -> None:
        try:
            outcomes.append(await gate.run(slow))
        except Busy:
            outcomes.append("busy")

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(attempt)
            await anyio.sleep(0.2)
            assert outcomes == ["busy"] * 3  # refused at once, not queued
            release.set()

    anyio.run(main)
    assert sorted(outcomes) == ["busy"] * 3 + ["done"] * 3


def test_csv_safe_prefixes_formula_cells() -> None:
    t = pa.table(
        {
            "a": ["=1+1", "+1", "-1", "@x", "\tx", "\rx", "ok", None, "a=b"],
            "n": list(range(9)),
        }
    )
    out = csv_safe(t)
    assert out.column("a").to_pylist() == [
        "'=1+1",
        "'+1",
        "'-1",
        "'@x",
        "'\tx",
        "'\rx",
        "ok",
        None,
        "a=b",
    ]
    assert out.column("n") == t.column("n")
    assert out.schema == t.schema


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "9" * 5000, "x"])
def test_worklist_numbers_must_be_finite(value: str) -> None:
    q = Query.parse({"percent": value, "score_min": value, "seed": value, "page": value})
    assert q.percent == 10.0
    assert q.score_min is None
    assert (q.seed, q.page) == (0, 1)
    assert math.isfinite(q.percent)


def test_worklist_percent_zero_is_kept() -> None:
    assert Query.parse({"percent": "0"}).percent == 0.0


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("Mikkel Taylor", False),
        ("TAYLOR", False),
        ("taylor^mikkel", False),
        ("673-00001", False),
        ("nu 7519 6472", False),
        ("24.12.1939", False),
        ("12/24/1939", False),
        ("24 Dec 1939", False),
        ("December 24, 1939", False),
        ("1939-12-24", False),
        ("tailor-made mask, 1939 HU", True),
        ("slice 24 of 39", True),
        ("mikkelsen sign", True),
    ],
)
def test_check_free_text(text: str, ok: bool) -> None:
    ids = {"Taylor^Mikkel", "67300001", "19391224", "NU75196472"}
    assert check_free_text(text, ids)[0] is ok
