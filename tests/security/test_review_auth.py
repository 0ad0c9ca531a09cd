"""Issue #18, section 3: authentication of `pacsflow review`, against the real app over HTTP.

- password guessing is throttled per user name and per client address, with a lockout that
  answers a right password exactly like a wrong one (429, Retry-After), audited;
- password hashing is bounded: 40 parallel logins neither take the server's memory (argon2 is
  64 MiB each) nor slow a reviewer's page; the excess is refused at once (503);
- sessions are server-side: a cookie captured before logout opens nothing after it; idle and
  absolute timeouts are enforced by the server;
- every denial (login redirect, 403, CSRF failure) and every slice image view is audited with
  the reviewer and the client address.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from test_review_support import (
    PASSWORDS,
    WAIT_S,
    audit_records,
    csrf_token,
    finding_rows,
    free_port,
    logged_in,
    post_login,
    review_config,
    review_settings,
    serve,
    serve_cli,
    shared_lake,
)

from pipeline.lake import LakePaths

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, session_key_file: Path) -> LakePaths:
    return shared_lake(tmp_path_factory, session_key_file)


class Clock:
    """The app's clock (``pipeline.review.app._now``), moved by the test."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, minutes: float) -> None:
        self.t += 60 * minutes


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    import pipeline.review.app as review_app

    c = Clock()
    monkeypatch.setattr(review_app, "_now", c)
    return c


def _new_records(lake: LakePaths, before: int, event: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(lake)[before:] if r["event"] == event]


def _without_token(html: str) -> str:
    return re.sub(r'name="csrf" value="[^"]+"', 'name="csrf" value=""', html)


def test_password_guessing_is_locked_out_per_user(
    lake: LakePaths, session_key_file: Path, clock: Clock
) -> None:
    """30 wrong passwords, then the right one: refused (429) like a wrong one, until the
    lockout ends; the lockout is audited."""
    cfg = review_config(lake, login_failures=5, lockout_minutes=15)
    before = len(audit_records(lake))
    with serve(cfg, lake, session_key_file) as base, requests.Session() as s:
        statuses = [post_login(s, base, "rudi", f"guess-{i}").status_code for i in range(30)]
        assert statuses[:5] == [401] * 5
        assert set(statuses[5:]) == {429}
        right = post_login(s, base, "rudi", PASSWORDS["rudi"])
        wrong = post_login(s, base, "rudi", "another-guess")
        for r in (right, wrong):
            assert r.status_code == 429
            assert 0 < int(r.headers["Retry-After"]) <= 15 * 60
            assert "Too many failed logins" in r.text
        # the locked-out guesser cannot tell the right password from a wrong one
        assert _without_token(right.text) == _without_token(wrong.text)
        assert right.headers["Retry-After"] == wrong.headers["Retry-After"]
        assert s.get(base + "/", allow_redirects=False, timeout=WAIT_S).status_code == 303
        # after the lockout the right password works again
        clock.advance(16)
        assert post_login(s, base, "rudi", PASSWORDS["rudi"]).status_code == 303
    locked = _new_records(lake, before, "review_login_locked")
    assert len(locked) >= 26
    assert all(r["details"]["reviewer"] == "rudi" for r in locked)
    assert all(r["details"]["address"] == "127.0.0.1" for r in locked)
    failed = _new_records(lake, before, "review_login_failed")
    assert len(failed) == 5
    assert failed[-1]["details"]["lockout_s"] == 15 * 60


def test_password_guessing_is_locked_out_per_address(
    lake: LakePaths, session_key_file: Path, clock: Clock
) -> None:
    """Guessing across many user names from one address locks the address: then even a
    real user's right password from it is refused."""
    cfg = review_config(lake, login_failures=5, address_failures=20)
    before = len(audit_records(lake))
    with serve(cfg, lake, session_key_file) as base, requests.Session() as s:
        statuses = [post_login(s, base, f"user{i}", "guess").status_code for i in range(20)]
        assert statuses == [401] * 20
        r = post_login(s, base, "lena", PASSWORDS["lena"])
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) > 0
        clock.advance(16)
        assert post_login(s, base, "lena", PASSWORDS["lena"]).status_code == 303
    locked = _new_records(lake, before, "review_login_locked")
    assert [r["details"]["reviewer"] for r in locked] == ["lena"]
    # unknown user names never enter the audit log (one may be a mistyped password)
    failed = _new_records(lake, before, "review_login_failed")
    assert {r["details"]["reviewer"] for r in failed} == {"unknown"}


def test_logout_revokes_a_captured_cookie(lake: LakePaths, session_key_file: Path) -> None:
    cfg = review_config(lake)
    before = len(audit_records(lake))
    with serve(cfg, lake, session_key_file) as base:
        s = logged_in(base, "rudi")
        captured = requests.utils.dict_from_cookiejar(s.cookies)
        assert captured
        page = s.get(base + "/", timeout=WAIT_S)
        assert page.status_code == 200
        out = s.post(
            base + "/logout",
            data={"csrf": csrf_token(page.text)},
            timeout=WAIT_S,
            allow_redirects=False,
        )
        assert out.status_code == 303
        with requests.Session() as thief:
            thief.cookies.update(captured)
            r = thief.get(base + "/", timeout=WAIT_S, allow_redirects=False)
            assert r.status_code == 303
            assert r.headers["location"].startswith("/login")
    assert _new_records(lake, before, "review_logout")[0]["details"]["reviewer"] == "rudi"
    denied = _new_records(lake, before, "review_denied")
    assert denied[-1]["details"]["reason"] == "session_unknown"
    assert denied[-1]["details"]["path"] == "/"


def test_idle_timeout_is_enforced_server_side(
    lake: LakePaths, session_key_file: Path, clock: Clock
) -> None:
    cfg = review_config(lake, idle_minutes=10, session_minutes=480)
    before = len(audit_records(lake))
    with serve(cfg, lake, session_key_file) as base:
        s = logged_in(base, "rudi")
        for _ in range(3):  # active: each request within 10 minutes of the last
            clock.advance(9)
            assert s.get(base + "/", timeout=WAIT_S, allow_redirects=False).status_code == 200
        clock.advance(11)  # idle
        r = s.get(base + "/", timeout=WAIT_S, allow_redirects=False)
        assert r.status_code == 303
        assert r.headers["location"].startswith("/login")
    denied = _new_records(lake, before, "review_denied")
    assert denied[-1]["details"]["reason"] == "session_idle"
    assert denied[-1]["details"]["reviewer"] == "rudi"


def test_absolute_timeout_is_enforced_server_side(
    lake: LakePaths, session_key_file: Path, clock: Clock
) -> None:
    cfg = review_config(lake, idle_minutes=30, session_minutes=60)
    before = len(audit_records(lake))
    with serve(cfg, lake, session_key_file) as base:
        s = logged_in(base, "rudi")
        for _ in range(2):
            clock.advance(25)
            assert s.get(base + "/", timeout=WAIT_S, allow_redirects=False).status_code == 200
        clock.advance(11)  # 61 minutes after login, 11 after the last request
        r = s.get(base + "/", timeout=WAIT_S, allow_redirects=False)
        assert r.status_code == 303
    denied = _new_records(lake, before, "review_denied")
    assert denied[-1]["details"]["reason"] == "session_expired"


def test_denials_and_slice_views_are_audited(lake: LakePaths, session_key_file: Path) -> None:
    cfg = review_config(lake)
    key = finding_rows(lake)[0]["finding_key"]
    before = len(audit_records(lake))
    with serve(cfg, lake, session_key_file) as base:
        anon = requests.get(base + "/export", timeout=WAIT_S, allow_redirects=False)
        assert anon.status_code == 303
        with logged_in(base, "rudi") as s:
            assert s.get(base + "/export", timeout=WAIT_S).status_code == 403
            assert s.get(base + "/viewer", params={"key": key}, timeout=WAIT_S).status_code == 403
            r = s.post(base + "/decide", data={"key": key, "decision": "accept"}, timeout=WAIT_S)
            assert r.status_code == 403
            img = s.get(base + "/slice.png", params={"key": key, "k": 1}, timeout=WAIT_S)
            assert img.status_code == 200
            assert img.headers["content-type"] == "image/png"
    denied = [r["details"] for r in _new_records(lake, before, "review_denied")]
    got = {(d["reason"], d["status"], d["path"], d.get("reviewer")) for d in denied}
    assert got == {
        ("no_session", 303, "/export", None),
        ("role", 403, "/export", "rudi"),
        ("viewer_role", 403, "/viewer", "rudi"),
        ("csrf", 403, "/decide", "rudi"),
    }
    assert all(d["address"] == "127.0.0.1" for d in denied)
    views = [r["details"] for r in _new_records(lake, before, "review_slice_viewed")]
    assert [(v["finding_key"], v["k"], v["reviewer"]) for v in views] == [(key, 1, "rudi")]
    assert views[0]["address"] == "127.0.0.1"


@pytest.fixture
def cli_config(lake: LakePaths, session_key_file: Path, tmp_path: Path) -> Path:
    """A config file for `pacsflow review` with generous lockout limits (so the burst below
    measures the hashing bound alone) and the default hashing bound."""
    path = tmp_path / "review.yaml"
    review = review_settings(
        login_failures=1000, address_failures=1000, hash_concurrency=2, hash_queue=8
    )
    path.write_text(
        yaml.safe_dump(
            {"lake": str(lake.root), "key_file": str(session_key_file), "review": review}
        )
    )
    return path


def test_parallel_logins_are_bounded_and_do_not_slow_pages(cli_config: Path) -> None:
    """40 logins at once: the server's memory grows by about two argon2 hashes, not forty
    (the measured 2.56 GB), the excess is answered 503 at once, and a reviewer's worklist
    request is served meanwhile without waiting behind the hashes."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["review", "--config", str(cli_config), "--port", str(port)]
    with serve_cli(args, url=base) as server:
        reviewer = logged_in(base, "lena")  # warms argon2 up
        assert reviewer.get(base + "/", timeout=WAIT_S).status_code == 200
        rss_before = server.rss_kib("VmRSS")

        sessions = [requests.Session() for _ in range(40)]
        tokens = [csrf_token(s.get(base + "/login", timeout=WAIT_S).text) for s in sessions]
        start = threading.Barrier(len(sessions) + 1)

        def attempt(i: int) -> tuple[int, float, str | None]:
            start.wait()
            t0 = time.monotonic()
            r = sessions[i].post(
                base + "/login",
                data={"username": "rudi", "password": f"wrong-{i}", "csrf": tokens[i]},
                timeout=120,
                allow_redirects=False,
            )
            return r.status_code, time.monotonic() - t0, r.headers.get("Retry-After")

        with ThreadPoolExecutor(len(sessions)) as pool:
            futures = [pool.submit(attempt, i) for i in range(len(sessions))]
            start.wait()
            time.sleep(0.2)
            t0 = time.monotonic()
            page = reviewer.get(base + "/", timeout=120)
            page_s = time.monotonic() - t0
            results = [f.result() for f in futures]
        peak_growth_mib = (server.rss_kib("VmHWM") - rss_before) / 1024
        for s in sessions:
            s.close()
        reviewer.close()

    assert page.status_code == 200
    busy = [r for r in results if r[0] == 503]
    checked = [r for r in results if r[0] == 401]
    assert len(busy) + len(checked) == 40, results
    assert len(busy) >= 20, results
    assert all(seconds < 2.0 and retry for _, seconds, retry in busy), busy
    assert page_s < 5.0, f"the worklist took {page_s:.1f} s during the login burst"
    assert peak_growth_mib < 400, f"memory grew by {peak_growth_mib:.0f} MiB"
