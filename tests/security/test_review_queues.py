"""Issue #23 §4 against the real app over HTTP: decide and move on.

- the keyboard's decisions are the same CSRF-protected POST as a click: "save and next"
  redirects to the next finding of the worklist's filtered list, the last one to the list;
  the decision form's ``next`` never leaves the app;
- only a lead (or admin) assigns queues: a reviewer is refused 403, a POST without the CSRF
  token 403, unknown readers and keys 400; an assignment is audited; names are escaped;
- two readers are blind to each other: the second reader's pages (finding, worklist, queues,
  metrics) hold nothing of the first's decision until both decided; then the metrics page
  shows their agreement.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from test_review_support import (
    PASSWORDS,
    ROLES,
    WAIT_S,
    audit_records,
    csrf_token,
    finding_rows,
    password_hash,
    post_login,
    review_config,
    serve,
    shared_lake,
)

from pipeline.lake import LakePaths, read_table

pytestmark = pytest.mark.slow

#: two reviewers that exist only in this module's app (their queues blind nobody else)
READERS = {"rita": "first-reader-password-for-tests", "remo": "second-reader-password-for-tests"}


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, session_key_file: Path) -> LakePaths:
    return shared_lake(tmp_path_factory, session_key_file)


@pytest.fixture(scope="module")
def base(lake: LakePaths, session_key_file: Path) -> Iterator[str]:
    from pipeline.review.app import hash_password

    users = {u: {"password_hash": password_hash(u), "role": ROLES[u]} for u in PASSWORDS}
    users |= {
        u: {"password_hash": hash_password(p), "role": "reviewer"} for u, p in READERS.items()
    }
    with serve(review_config(lake, users=users), lake, session_key_file) as url:
        yield url


def _login(base: str, user: str) -> requests.Session:
    s = requests.Session()
    r = post_login(s, base, user, {**PASSWORDS, **READERS}[user])
    assert r.status_code == 303, (r.status_code, r.text[:300])
    return s


def _hidden(html: str, name: str) -> str:
    match = re.search(rf'name="{name}"[^>]*value="([^"]*)"', html)
    assert match is not None, f"no hidden {name} in the page"
    return match.group(1).replace("&amp;", "&")


def _form(html: str) -> dict[str, str]:
    """The decision form's hidden fields (what a click or a key press POSTs)."""
    return {n: _hidden(html, n) for n in ("csrf", "key", "next", "q") if f'name="{n}"' in html}


def _worklist_links(html: str) -> list[str]:
    """Each finding's link, once (a row links its thumbnail and its name to the same page)."""
    links = [h.replace("&amp;", "&") for h in re.findall(r'<a class="open" href="([^"]+)"', html)]
    return list(dict.fromkeys(links))


def test_save_and_next_moves_down_the_filtered_list(lake: LakePaths, base: str) -> None:
    findings = finding_rows(lake)
    label = max(
        {f["label"] for f in findings}, key=lambda x: sum(f["label"] == x for f in findings)
    )
    s = _login(base, "rudi")
    listing = s.get(base + "/", params={"label": label, "sort": "finding_key"}, timeout=WAIT_S)
    links = _worklist_links(listing.text)
    keys = [parse_qs(urlsplit(u).query)["key"][0] for u in links]
    assert keys == sorted(f["finding_key"] for f in findings if f["label"] == label)
    assert len(keys) >= 2

    # the first finding of the list: its place, the next/previous keys, the key hints
    page = s.get(base + links[0], timeout=WAIT_S)
    assert page.status_code == 200
    assert f"1 of {len(keys)}" in page.text
    assert 'id="nav-next"' in page.text
    assert 'id="nav-prev"' not in page.text
    assert '<script src="/static/keys.js"></script>' in page.text
    assert "<kbd>A</kbd>" in page.text
    assert "<kbd>N</kbd>" in page.text
    # slices numbered from 1: the slider runs 0..n-1, the counter says "k+1 / n"
    counter = re.search(r'id="k-label">(\d+)</span> / (\d+)<', page.text)
    slider = re.search(r'id="k" min="0" max="(\d+)" value="(\d+)"', page.text)
    assert counter is not None
    assert slider is not None
    assert int(counter.group(2)) == int(slider.group(1)) + 1
    assert int(counter.group(1)) == int(slider.group(2)) + 1
    form = _form(page.text)
    assert parse_qs(urlsplit(form["next"]).query)["key"] == [keys[1]]

    # pressing A is this POST: saved, and on to the next finding of the same list
    before = read_table(lake, "reviews").num_rows
    r = s.post(
        base + "/decide", data={**form, "decision": "accept"}, timeout=WAIT_S,
        allow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303
    target = urlsplit(r.headers["location"])
    assert target.path == "/finding"
    assert parse_qs(target.query)["key"] == [keys[1]]
    assert parse_qs(target.query)["saved"] == ["accept"]
    nxt = s.get(base + r.headers["location"], timeout=WAIT_S)
    assert "Saved “accept” for the previous finding" in nxt.text
    assert f"2 of {len(keys)}" in nxt.text
    assert 'id="nav-prev"' in nxt.text
    assert read_table(lake, "reviews").num_rows == before + 1

    # the last one of the list: back to the worklist with the same filter
    last = s.get(base + links[-1], timeout=WAIT_S)
    assert 'id="nav-next"' not in last.text
    r = s.post(
        base + "/decide", data={**_form(last.text), "decision": "reject"}, timeout=WAIT_S,
        allow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303
    back = urlsplit(r.headers["location"])
    assert back.path == "/"
    assert parse_qs(back.query)["label"] == [label]
    assert "for the last finding of the list" in s.get(base + r.headers["location"]).text
    rows = read_table(lake, "reviews").to_pylist()
    assert {(r["finding_key"], r["decision"]) for r in rows if r["reviewer"] == "rudi"} >= {
        (keys[0], "accept"),
        (keys[-1], "reject"),
    }

    # no CSRF token: refused, nothing stored; a "next" off the app is not followed
    n = read_table(lake, "reviews").num_rows
    bad = {k: v for k, v in form.items() if k != "csrf"}
    r = s.post(base + "/decide", data={**bad, "decision": "accept"}, timeout=WAIT_S)
    assert r.status_code == 403
    assert read_table(lake, "reviews").num_rows == n
    for evil in ("https://evil.invalid/", "//evil.invalid/x", "/\\evil.invalid"):
        r = s.post(
            base + "/decide", data={**form, "next": evil, "decision": "uncertain"},
            timeout=WAIT_S, allow_redirects=False,
        )  # fmt: skip
        assert r.status_code == 303
        assert r.headers["location"].startswith("/finding?key="), evil

    # the script is a file (CSP), and hostile list contexts do not break the page
    js = requests.get(base + "/static/keys.js", timeout=WAIT_S)
    assert js.status_code == 200
    assert "decide-accept" in js.text
    for ctx in ({"q": "sample=nan&per_page=-1&page=9e99"}, {"q": "x" * 5000}, {"queue": "../x"}):
        r = s.get(base + "/finding", params={"key": keys[0], **ctx}, timeout=WAIT_S)
        assert r.status_code == 200, ctx


def test_only_a_lead_assigns_queues(lake: LakePaths, base: str) -> None:
    keys = [f["finding_key"] for f in finding_rows(lake)][:3]
    before = read_table(lake, "queues").num_rows
    data = {"name": "chest QA", "reader": "rudi", "keys": "\n".join(keys)}

    reviewer = _login(base, "rudi")
    token = csrf_token(reviewer.get(base + "/queues", timeout=WAIT_S).text)
    r = reviewer.post(base + "/queues", data={**data, "csrf": token}, timeout=WAIT_S)
    assert r.status_code == 403
    assert "assign-keys-form" not in reviewer.get(base + "/queues", timeout=WAIT_S).text
    assert "assign-form" not in reviewer.get(base + "/", timeout=WAIT_S).text
    anonymous = requests.post(base + "/queues", data=data, timeout=WAIT_S, allow_redirects=False)
    assert anonymous.status_code == 303
    assert "/login" in anonymous.headers["location"]

    lead = _login(base, "lena")
    page = lead.get(base + "/queues", timeout=WAIT_S)
    token = csrf_token(page.text)
    assert lead.post(base + "/queues", data=data, timeout=WAIT_S).status_code == 403  # no CSRF
    for bad, why in (
        ({"reader": "nobody"}, "must be a user who may decide"),
        ({"keys": "no-such-key"}, "unknown"),
        ({"second_reader": "rudi"}, "two different reviewers"),
        ({"name": ""}, "needs a name"),
    ):
        r = lead.post(base + "/queues", data={**data, **bad, "csrf": token}, timeout=WAIT_S)
        assert r.status_code == 400, bad
        assert why in r.text
    assert read_table(lake, "queues").num_rows == before

    hostile = "<script>alert(1)</script> QA"
    r = lead.post(
        base + "/queues", data={**data, "name": hostile, "csrf": token}, timeout=WAIT_S,
        allow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303
    rows = read_table(lake, "queues").to_pylist()
    assert len(rows) == before + 1
    queue = next(q for q in rows if q["name"] == hostile)
    assert queue["reviewers"] == ["rudi"]
    assert queue["finding_keys"] == keys
    assert queue["assigned_by"] == "lena"
    assert queue["spec"] is None
    listing = lead.get(base + r.headers["location"], timeout=WAIT_S)
    assert "<script>alert" not in listing.text
    assert "&lt;script&gt;alert(1)" in listing.text
    events = [e for e in audit_records(lake) if e["event"] == "review_queue_assigned"]
    assert events[-1]["details"]["queue_id"] == queue["queue_id"]
    assert events[-1]["details"]["findings"] == 3
    assert any(
        e["event"] == "review_denied" and e["details"].get("path") == "/queues"
        for e in audit_records(lake)
    )

    # the worklist's filter as a queue: its keys fixed in the worklist's order
    label = finding_rows(lake)[0]["label"]
    spec = urlencode({"label": label, "sort": "finding_key", "order": "desc"})
    r = lead.post(
        base + "/queues",
        data={"name": "by filter", "reader": "rudi", "spec": spec, "csrf": token},
        timeout=WAIT_S, allow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303
    made = [q for q in read_table(lake, "queues").to_pylist() if q["name"] == "by filter"][-1]
    wanted = sorted(f["finding_key"] for f in finding_rows(lake) if f["label"] == label)
    assert made["finding_keys"] == wanted[::-1]
    assert parse_qs(made["spec"])["label"] == [label]

    # the reviewer sees "my queue" with progress, and reads it in order
    mine = reviewer.get(base + "/queues", timeout=WAIT_S).text
    assert re.search(rf'data-queue="{made["queue_id"]}">.*?\d+ of {len(wanted)}', mine, re.S)
    start = "/finding?" + urlencode({"key": made["finding_keys"][0], "queue": made["queue_id"]})
    page = reviewer.get(base + start, timeout=WAIT_S).text
    assert f"1 of {len(wanted)}" in page
    r = reviewer.post(
        base + "/decide",
        data={**_form(page), "queue": made["queue_id"], "decision": "uncertain"},
        timeout=WAIT_S, allow_redirects=False,
    )  # fmt: skip
    target = parse_qs(urlsplit(r.headers["location"]).query)
    assert target["key"] == [made["finding_keys"][1]]
    assert target["queue"] == [made["queue_id"]]


def test_two_readers_are_blind_to_each_other(lake: LakePaths, base: str) -> None:
    keys = [f["finding_key"] for f in finding_rows(lake)][-2:]
    lead = _login(base, "lena")
    token = csrf_token(lead.get(base + "/queues", timeout=WAIT_S).text)
    r = lead.post(
        base + "/queues",
        data={"name": "double read", "reader": "rita", "second_reader": "remo",
              "keys": " ".join(keys), "csrf": token},
        timeout=WAIT_S, allow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303
    queue = [q for q in read_table(lake, "queues").to_pylist() if q["name"] == "double read"][-1]

    rita, remo = _login(base, "rita"), _login(base, "remo")
    page = rita.get(base + "/finding", params={"key": keys[0], "queue": queue["queue_id"]})
    secret = "rita-first-read-7f3a"
    r = rita.post(
        base + "/decide",
        data={**_form(page.text), "queue": queue["queue_id"], "decision": "accept",
              "comment": secret},
        timeout=WAIT_S, allow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303
    review = next(x for x in read_table(lake, "reviews").to_pylist() if x["comment"] == secret)

    def everything_remo_sees() -> dict[str, requests.Response]:
        return {
            "finding": remo.get(base + "/finding", params={"key": keys[0]}, timeout=WAIT_S),
            "in queue": remo.get(
                base + "/finding",
                params={"key": keys[0], "queue": queue["queue_id"]},
                timeout=WAIT_S,
            ),
            "worklist": remo.get(base + "/", params={"per_page": 1000}, timeout=WAIT_S),
            "accepted": remo.get(base + "/", params={"status": "accept"}, timeout=WAIT_S),
            "queues": remo.get(base + "/queues", timeout=WAIT_S),
            "metrics": remo.get(base + "/metrics", timeout=WAIT_S),
            "export": remo.get(base + "/export", timeout=WAIT_S),
        }

    seen = everything_remo_sees()
    assert seen["export"].status_code == 403  # a reviewer exports nothing
    for name, resp in seen.items():
        assert secret not in resp.text, name
        assert review["review_id"] not in resp.text, name
        assert "rita" not in resp.text or name == "metrics", name  # metrics names the readers
    assert 'id="status">unreviewed<' in seen["finding"].text
    shown = html.escape(keys[0])
    assert shown not in seen["accepted"].text
    row = re.search(rf'data-key="{re.escape(shown)}">.*?</tr>', seen["worklist"].text, re.S)
    assert row is not None
    assert "badge unreviewed" in row.group(0)
    # the first reader still sees her own decision; the lead sees it
    assert secret in rita.get(base + "/finding", params={"key": keys[0]}, timeout=WAIT_S).text
    assert secret in lead.get(base + "/finding", params={"key": keys[0]}, timeout=WAIT_S).text

    # the second reader decides: now both see both, and the metrics page shows agreement
    page = seen["in queue"]
    r = remo.post(
        base + "/decide",
        data={**_form(page.text), "queue": queue["queue_id"], "decision": "reject"},
        timeout=WAIT_S, allow_redirects=False,
    )  # fmt: skip
    assert r.status_code == 303
    assert secret in remo.get(base + "/finding", params={"key": keys[0]}, timeout=WAIT_S).text
    metrics = lead.get(base + "/metrics", timeout=WAIT_S).text
    row = re.search(rf'data-queue="{queue["queue_id"]}">.*?</tr>', metrics, re.S)
    assert row is not None
    assert re.search(r'class="num pairs">1<', row.group(0))
    assert 'class="num observed">0.0%<' in row.group(0)
