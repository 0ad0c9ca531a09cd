"""`pacsflow review` end to end in real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium with the system browser; no browser download): log in, filter the worklist,
open a finding and see its overlay image, accept one finding and reject another, see the
metrics page count them, find both decisions in the `reviews` table; a wrong password and a
POST without the CSRF token are refused; the Content-Security-Policy blocks nothing the pages
need (no violation in the console); the static report opens offline and lists every finding.
Screenshots of the worklist and a finding view go to docs/screenshots/.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from review_factory import add_big_ct, build_review_lake, headless_chromium
from typer.testing import CliRunner

from pipeline.config import load_config
from pipeline.lake import LakePaths, read_table

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
KEY = b"r" * 32
SEED = 6161
#: test-only passwords of users that live for one test on loopback
PASSWORDS = {"lena": "lead-password-for-tests", "rudi": "reviewer-password-for-tests"}
WAIT_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LakePaths:
    """A small real lake with findings: synthesize -> crawl -> deid -> tensors -> infer."""
    return build_review_lake(tmp_path_factory.mktemp("review-e2e"), KEY, seed=SEED)


@pytest.fixture(scope="module")
def server(lake: LakePaths) -> Iterator[str]:
    """The review app on a free loopback port, served by uvicorn in a thread."""
    import uvicorn

    from pipeline.lake import AuditLog
    from pipeline.lake.keys import LakeKeys
    from pipeline.review.app import create_app, hash_password, server_config

    cfg = load_config(
        overrides={
            "lake": str(lake.root),
            "review": {
                "users": {
                    "lena": {"password_hash": hash_password(PASSWORDS["lena"]), "role": "lead"},
                    "rudi": {
                        "password_hash": hash_password(PASSWORDS["rudi"]),
                        "role": "reviewer",
                    },
                },
                "session_minutes": 30,
                "viewer_url": "https://viewer.invalid/ohif/viewer?StudyInstanceUIDs={StudyInstanceUID}",
                "viewer_roles": ["lead"],
            },
        },
        environ={},
    )
    port = _free_port()
    audit = AuditLog(lake, LakeKeys(KEY), witness="none")
    app = create_app(cfg, lake, audit=audit, secret="test-session-secret")
    srv = uvicorn.Server(server_config(app, host="127.0.0.1", port=port))
    thread = threading.Thread(target=srv.run, name="review-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the review app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=WAIT_S)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chromium() as driver:
        yield driver


def _wait(driver: Any, condition: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition)


def _login(driver: Any, base: str, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/login")
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    submit = driver.find_element(By.ID, "login-submit")
    submit.click()
    # the answer is a new page: wait until the form is gone (the password check takes a while)
    from selenium.webdriver.support import expected_conditions

    _wait(driver, expected_conditions.staleness_of(submit))


def _image_loaded(driver: Any, element: Any) -> bool:
    return bool(
        driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", element
        )
    )


def _decide(driver: Any, decision: str, comment: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "comment").send_keys(comment)
    driver.find_element(By.ID, f"decide-{decision}").click()
    # issue #23: opened from the worklist, a decision saves and opens the next finding of the
    # list (or the list after the last one), which says what was saved
    _wait(driver, lambda d: d.find_elements(By.ID, "saved"))
    assert f"“{decision}”" in driver.find_element(By.ID, "saved").text


def _screenshot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / name))
    assert (SCREENSHOTS / name).stat().st_size > 1000


def test_review_in_a_real_browser(
    lake: LakePaths, server: str, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    findings = read_table(lake, "findings").to_pylist()

    # a wrong password is refused
    _login(browser, server, "lena", "not-the-password")
    assert "Wrong user name or password" in browser.find_element(By.ID, "login-error").text
    assert browser.current_url.endswith("/login")

    # log in; the worklist lists every finding
    _login(browser, server, "lena", PASSWORDS["lena"])
    _wait(browser, lambda d: d.find_elements(By.ID, "worklist"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.finding-row")) == len(findings)

    # filter: one label, positives only; every row left is a positive of that label
    label = "soft_tissue"  # the tiny bundle's random weights find this label everywhere
    Select(browser.find_element(By.ID, "f-label")).select_by_visible_text(label)
    Select(browser.find_element(By.ID, "f-sample")).select_by_visible_text("positives")
    browser.find_element(By.ID, "apply").click()
    _wait(browser, lambda d: f"label={label}" in d.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.finding-row")
    wanted = [f for f in findings if f["label"] == label and f["voxel_count"] > 0]
    assert len(rows) == len(wanted) >= 2
    # the finding's name, readable (issue #23: "soft tissue", in the second column)
    name = label.replace("_", " ")
    assert all(r.find_elements(By.TAG_NAME, "td")[1].text.startswith(name) for r in rows)
    _screenshot(browser, "review-worklist.png")
    keys = [r.get_attribute("data-key") for r in rows]

    # open a finding: the slice with its overlay is there; scroll a slice; accept it
    rows[0].find_element(By.CSS_SELECTOR, "a.open").click()
    img = _wait(browser, lambda d: d.find_element(By.ID, "slice"))
    _wait(browser, lambda d: _image_loaded(d, img))
    assert "overlay=1" in img.get_attribute("src")
    assert browser.execute_script("return arguments[0].naturalWidth", img) >= 384
    browser.find_element(By.ID, "next-slice").click()
    img = _wait(browser, lambda d: d.find_element(By.ID, "slice"))
    _wait(browser, lambda d: _image_loaded(d, img))
    _screenshot(browser, "review-finding.png")
    _decide(browser, "accept", "looks right")

    # open another (from the filtered worklist) and reject it
    browser.get(f"{server}/?label={label}&sample=positives")
    browser.find_element(By.CSS_SELECTOR, f'tr[data-key="{keys[1]}"] a.open').click()
    _wait(browser, lambda d: d.find_elements(By.ID, "decide"))
    _decide(browser, "reject", "mask leaks")

    # lowest confidence first: segmentation findings have no score, and the page says so
    browser.get(f"{server}/?sample=lowest-confidence")
    assert "confidence is unknown" in browser.find_element(By.CSS_SELECTOR, ".note").text

    # the metrics page counts both
    browser.get(server + "/metrics")
    card = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".metrics-version"))
    assert card.find_element(By.CSS_SELECTOR, ".reviewed").text == "2"
    assert card.find_element(By.CSS_SELECTOR, ".accepted").text == "1"
    assert card.find_element(By.CSS_SELECTOR, ".rejected").text == "1"
    assert card.find_element(By.CSS_SELECTOR, ".rate").text == "50.0%"
    for plot in card.find_elements(By.TAG_NAME, "img"):
        assert _image_loaded(browser, plot)

    # the reviews table holds both decisions, tied to the model version and tensor checksum
    by_key = {f["finding_key"]: f for f in findings}
    reviews = sorted(read_table(lake, "reviews").to_pylist(), key=lambda r: r["reviewed_at"])
    assert [(r["finding_key"], r["decision"]) for r in reviews] == [
        (keys[0], "accept"),
        (keys[1], "reject"),
    ]
    for r in reviews:
        assert r["reviewer"] == "lena"
        assert r["model_version"] == by_key[r["finding_key"]]["model_version"]
        assert r["tensor_checksum"] == by_key[r["finding_key"]]["tensor_checksum"]

    # every view and decision is in the audit log: who and which finding, no PHI
    records = [
        json.loads(line)
        for line in (lake.audit / "audit.jsonl").read_text().splitlines()
        if line.strip()
    ]
    events = [(r["event"], r["details"].get("finding_key")) for r in records]
    assert ("review_finding_viewed", keys[0]) in events
    assert ("review_decision", keys[0]) in events
    assert ("review_decision", keys[1]) in events
    assert any(r["event"] == "review_login_failed" for r in records)
    assert all(
        r["details"].get("reviewer") in ("lena", None) for r in records if "review" in r["event"]
    )

    # the pages' script and styles are files: the Content-Security-Policy blocked nothing
    blocked = [
        e["message"]
        for e in browser.get_log("browser")
        if "Content Security Policy" in e["message"] or "Refused to" in e["message"]
    ]
    assert blocked == []

    # the label set export holds the two decided findings
    browser.get(server + "/metrics")  # keep the browser on a page of the app
    _csrf_and_export_checks(server, keys, lake)

    # the static report opens offline in the same browser and shows every finding
    from pipeline.cli.main import app

    out = tmp_path / "report.html"
    runner = CliRunner()
    result = runner.invoke(app, ["review", "--lake", str(lake.root), "--report", str(out)])
    assert result.exit_code == 0, result.output
    assert f"({len(findings)} findings)" in result.output
    other = tmp_path / "other-run.html"
    result = runner.invoke(
        app, ["review", "--lake", str(lake.root), "--report", str(other), "--run", "nope"]
    )
    # issue #20: an unknown run is an error in one line (it wrote an empty report, exit 0)
    assert result.exit_code == 2, result.output
    assert "no run 'nope'" in result.output
    assert not other.exists()
    html = out.read_text()
    assert "http://" not in html
    assert "https://" not in html
    browser.get(out.as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "#report-findings tr.finding-row")
    assert {r.get_attribute("data-key") for r in rows} == set(by_key)
    statuses = {
        r.get_attribute("data-key"): r.find_element(By.CSS_SELECTOR, ".badge").text for r in rows
    }
    assert statuses[keys[0]] == "accept"
    assert statuses[keys[1]] == "reject"
    images = browser.find_elements(By.CSS_SELECTOR, "img")
    assert len(images) >= len(findings)
    assert all(_image_loaded(browser, i) for i in images)


def test_worklist_groups_by_study(lake: LakePaths, server: str, browser: Any) -> None:
    """Issue #23 §3: the worklist is grouped by pseudonymous patient and study, each group's
    header with the shifted study date and its counts, each row with a thumbnail."""
    from selenium.webdriver.common.by import By

    findings = read_table(lake, "findings").to_pylist()
    series = {s["SeriesInstanceUID"]: s for s in read_table(lake, "series").to_pylist()}
    study_of = {f["finding_key"]: series[f["SeriesInstanceUID"]] for f in findings}
    _login(browser, server, "lena", PASSWORDS["lena"])
    browser.get(server + "/?per_page=1000")
    _wait(browser, lambda d: d.find_elements(By.ID, "worklist"))
    groups = browser.find_elements(By.CSS_SELECTOR, "#worklist tbody.study")
    studies = {(s["patient_token"], s["StudyInstanceUID"]) for s in study_of.values()}
    assert len(groups) == len(studies) >= 2
    seen: set[str] = set()
    for g in groups:
        patient, study = g.get_attribute("data-patient"), g.get_attribute("data-study")
        keys = [
            r.get_attribute("data-key") for r in g.find_elements(By.CSS_SELECTOR, "tr.finding-row")
        ]
        assert keys
        for k in keys:  # every row sits in its own study's group
            assert (study_of[k]["patient_token"], study_of[k]["StudyInstanceUID"]) == (
                patient,
                study,
            )
        seen.update(keys)
        head = g.find_element(By.CSS_SELECTOR, "tr.study-head")
        assert head.find_element(By.CSS_SELECTOR, ".n-findings").text == str(len(keys))
        assert patient[:10] in head.text
        assert g.find_elements(By.CSS_SELECTOR, "tr.series-head")
    assert seen == {f["finding_key"] for f in findings}
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#worklist img.thumb")
    assert len(thumbs) == len(findings)
    browser.execute_script("window.scrollTo(0, 0)")
    for t in thumbs[:8]:
        _wait(browser, lambda d, t=t: _image_loaded(d, t))
    assert "sampling" in browser.find_element(By.ID, "sampling").text.lower()
    _screenshot(browser, "review-worklist-by-study.png")


def _session(server: str, user: str) -> Any:
    """A `requests` session logged in as ``user`` (through the login form and its token)."""
    import requests

    s = requests.Session()
    page = s.get(server + "/login", timeout=WAIT_S)
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    r = s.post(
        server + "/login",
        data={"username": user, "password": PASSWORDS[user], "csrf": token.group(1)},
        timeout=WAIT_S,
        allow_redirects=False,
    )
    assert r.status_code == 303
    return s


def test_sessions_expire(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.review.app as review_app

    with _session(server, "rudi") as s:
        assert s.get(server + "/", timeout=WAIT_S, allow_redirects=False).status_code == 200
        later = time.time() + 31 * 60  # session_minutes is 30
        monkeypatch.setattr(review_app, "_now", lambda: later)
        r = s.get(server + "/", timeout=WAIT_S, allow_redirects=False)
        assert r.status_code == 303
        assert "/login" in r.headers["location"]


def _csrf_and_export_checks(server: str, keys: list[str], lake: LakePaths) -> None:
    """With `requests`: a POST without (or with a wrong) CSRF token is refused and stores
    nothing; a reviewer may not export; a lead exports the label set."""
    import requests

    with requests.Session() as s:
        page = s.get(server + "/login", timeout=WAIT_S)
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        # login itself needs the token
        refused = s.post(
            server + "/login",
            data={"username": "rudi", "password": PASSWORDS["rudi"]},
            timeout=WAIT_S,
            allow_redirects=False,
        )
        assert refused.status_code == 403
        ok = s.post(
            server + "/login",
            data={"username": "rudi", "password": PASSWORDS["rudi"], "csrf": token.group(1)},
            timeout=WAIT_S,
            allow_redirects=False,
        )
        assert ok.status_code == 303
        before = read_table(lake, "reviews").num_rows
        for data in (
            {"key": keys[0], "decision": "reject"},
            {"key": keys[0], "decision": "reject", "csrf": token.group(1)},  # the old token
        ):
            r = s.post(server + "/decide", data=data, timeout=WAIT_S, allow_redirects=False)
            assert r.status_code == 403, data
            assert "CSRF" in r.text
        assert read_table(lake, "reviews").num_rows == before
        # a reviewer may not export, nor open identified studies; roles are checked server-side
        assert s.get(server + "/export", timeout=WAIT_S).status_code == 403
        page = s.get(server + "/finding", params={"key": keys[0]}, timeout=WAIT_S)
        assert "viewer-link" not in page.text
        denied = s.get(server + "/viewer", params={"key": keys[0]}, timeout=WAIT_S)
        assert denied.status_code == 403
        # not logged in: sent to the login page
        anon = requests.get(server + "/export", timeout=WAIT_S, allow_redirects=False)
        assert anon.status_code == 303
        assert "/login" in anon.headers["location"]

    with _session(server, "lena") as s:
        # a lead may: the link redirects to the original study, read from the vault just now
        page = s.get(server + "/finding", params={"key": keys[0]}, timeout=WAIT_S)
        assert "viewer-link" in page.text
        series = read_table(lake, "findings").to_pylist()
        pseudonym = next(f["SeriesInstanceUID"] for f in series if f["finding_key"] == keys[0])
        vault = read_table(lake, "vault").to_pylist()
        original = next(v["StudyInstanceUID"] for v in vault if v["series_pseudonym"] == pseudonym)
        assert original not in page.text  # never in a page
        link = s.get(
            server + "/viewer", params={"key": keys[0]}, timeout=WAIT_S, allow_redirects=False
        )
        assert link.status_code == 302
        assert link.headers["location"].endswith(f"StudyInstanceUIDs={original}")
        csv = s.get(server + "/export?format=csv", timeout=WAIT_S)
        assert csv.status_code == 200
        lines = csv.text.strip().splitlines()
        assert len(lines) == 3  # header + accepted + rejected
        assert keys[0] in csv.text
        assert keys[1] in csv.text


def test_keyboard_decisions_move_through_a_queue(
    lake: LakePaths, server: str, browser: Any
) -> None:
    """Issue #23 §4: A / R / U decide and open the next finding (the same POST as a click),
    N / P move without deciding, keys typed into a field decide nothing; a queue a lead
    assigned is read the same way from "my queues"."""
    from urllib.parse import parse_qs, urlsplit

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    def key_of(url: str) -> str:
        return parse_qs(urlsplit(url).query)["key"][0]

    def press(key: str) -> None:
        ActionChains(browser).send_keys(key).perform()

    findings = read_table(lake, "findings").to_pylist()
    label = max(
        {f["label"] for f in findings}, key=lambda x: [f["label"] for f in findings].count(x)
    )
    keys = sorted(f["finding_key"] for f in findings if f["label"] == label)
    assert len(keys) >= 3
    before = read_table(lake, "reviews").num_rows

    _login(browser, server, "rudi", PASSWORDS["rudi"])
    browser.get(f"{server}/?label={label}&sort=finding_key")
    browser.find_element(By.CSS_SELECTOR, "tr.finding-row a.open").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "queue-nav"))
    assert key_of(browser.current_url) == keys[0]
    assert browser.find_element(By.ID, "nav-position").text.startswith(f"1 of {len(keys)}")
    assert "A accept" in browser.find_element(By.CSS_SELECTOR, ".keys-hint").text

    # a key typed into the comment field is text, not a decision
    browser.find_element(By.ID, "comment").send_keys("a")
    time.sleep(0.5)
    assert key_of(browser.current_url) == keys[0]
    browser.find_element(By.TAG_NAME, "h1").click()  # leave the field

    press("a")  # accept: saved, and the next finding opens
    _wait(browser, lambda d: key_of(d.current_url) == keys[1] and d.find_elements(By.ID, "saved"))
    assert "“accept”" in browser.find_element(By.ID, "saved").text
    assert browser.find_element(By.ID, "nav-position").text.startswith(f"2 of {len(keys)}")
    press("r")
    _wait(browser, lambda d: key_of(d.current_url) == keys[2])
    press("p")  # back without deciding
    _wait(browser, lambda d: key_of(d.current_url) == keys[1])
    press("n")
    _wait(browser, lambda d: key_of(d.current_url) == keys[2])
    _screenshot(browser, "review-keyboard.png")

    rows = read_table(lake, "reviews").to_pylist()
    mine = sorted(
        (r["reviewed_at"], r["finding_key"], r["decision"]) for r in rows if r["reviewer"] == "rudi"
    )
    assert [(k, d) for _, k, d in mine][-2:] == [(keys[0], "accept"), (keys[1], "reject")]
    assert len(rows) == before + 2

    # a lead assigns a queue of two findings to rudi; he reads it from "my queues" by keys
    queue_keys = [keys[-1], keys[0]]
    with _session(server, "lena") as lead:
        page = lead.get(server + "/queues", timeout=WAIT_S)
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        r = lead.post(
            server + "/queues",
            data={"name": "keyboard", "reader": "rudi", "keys": " ".join(queue_keys),
                  "csrf": token.group(1)},
            timeout=WAIT_S, allow_redirects=False,
        )  # fmt: skip
        assert r.status_code == 303
    browser.get(server + "/queues")
    row = browser.find_element(By.CSS_SELECTOR, "tr.my-queue")
    assert row.find_element(By.CSS_SELECTOR, ".progress").text == "1 of 2"  # keys[0] decided
    row.find_element(By.CSS_SELECTOR, "a.start").click()
    _wait(browser, lambda d: d.find_elements(By.ID, "queue-nav"))
    assert key_of(browser.current_url) == queue_keys[0]  # the first one he has not decided
    press("u")  # uncertain; on to the queue's next finding
    _wait(browser, lambda d: key_of(d.current_url) == queue_keys[1])
    assert "queue=" in browser.current_url
    press("a")  # the last one: back to "my queues", now complete
    _wait(browser, lambda d: urlsplit(d.current_url).path == "/queues")
    assert browser.find_element(By.CSS_SELECTOR, "tr.my-queue .progress").text == "2 of 2"
    rows = read_table(lake, "reviews").to_pylist()
    assert len(rows) == before + 4
    blocked = [
        e["message"]
        for e in browser.get_log("browser")
        if "Content Security Policy" in e["message"] or "Refused to" in e["message"]
    ]
    assert blocked == []


# --------------------------------------------------------------------------------------------
# issue #23: the in-page viewer (NiiVue, WebGL2 through SwiftShader) and corrections
# --------------------------------------------------------------------------------------------

#: reads the viewer's canvas right after a draw (same task: the buffer is still there)
_PIXELS = """
const nv = window.pacsflowViewer.nv; nv.drawScene();
const gl = nv.gl, w = gl.drawingBufferWidth, h = gl.drawingBufferHeight;
const px = new Uint8Array(w * h * 4); gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, px);
let sum = 0, lit = 0, hash = 0;
for (let i = 0; i < px.length; i += 4) {
  const v = px[i] + px[i + 1] + px[i + 2]; sum += v; if (v > 30) lit++;
  hash = (hash * 31 + v) % 1000000007;
}
return [w, h, sum, lit, hash];
"""


@pytest.fixture(scope="module")
def gl_browser() -> Iterator[Any]:
    with headless_chromium(webgl=True) as driver:
        yield driver


def _only_from_the_app(driver: Any, server: str) -> list[str]:
    """Nothing the page loaded came from anywhere but the app, and the Content-Security-Policy
    blocked nothing: the page's resource URLs."""
    urls = driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name).concat([location.href])"
    )
    assert urls, urls
    assert all(u.startswith(server + "/") for u in urls), urls
    blocked = [
        e["message"]
        for e in driver.get_log("browser")
        if "Content Security Policy" in e["message"] or "Refused to" in e["message"]
    ]
    assert blocked == []
    return list(urls)


def _viewer_ready(driver: Any, wait_s: float = WAIT_S) -> dict[str, Any]:
    def ready(d: Any) -> Any:
        state = d.execute_script(
            "const v = window.pacsflowViewer; return v && (v.ready || v.error) ? "
            "{ready: v.ready, error: v.error, loadMs: v.loadMs, moduleMs: v.moduleMs} : null"
        )
        return state

    from selenium.common.exceptions import TimeoutException

    try:
        from selenium.webdriver.support.ui import WebDriverWait

        state = WebDriverWait(driver, wait_s).until(ready)
    except TimeoutException:
        status = driver.find_element("id", "nv-status").text
        logs = [e["message"] for e in driver.get_log("browser")]
        pytest.fail(f"the viewer did not load: {status!r}; console: {logs}")
    assert state["error"] is None, state
    return dict(state)


def test_viewer_renders_and_corrections_are_stored_and_exported(
    lake: LakePaths, server: str, gl_browser: Any
) -> None:
    import numpy as np

    from pipeline.review.corrections import load_corrections

    driver = gl_browser
    from pipeline.review.store import record_decision

    findings = read_table(lake, "findings").to_pylist()
    # a finding with a mask (not one an earlier test of this module happened to accept: the
    # keyboard test accepts empty ones too), the largest, accepted here
    f = max(
        (x for x in findings if (x["voxel_count"] or 0) > 0 and x.get("bbox")),
        key=lambda x: (x["voxel_count"], x["finding_key"]),
    )
    accepted = record_decision(lake, f, reviewer="lena", decision="accept")["finding_key"]
    _login(driver, server, "rudi", PASSWORDS["rudi"])
    # NiiVue asked for by name: this browser's WebGL is SwiftShader's, where the page would
    # choose the slice viewer (test_slice_viewer_renders_planes_fast_and_switches_to_niivue)
    driver.get(f"{server}/finding?key={quote(accepted, safe='')}&viewer=niivue")
    _viewer_ready(driver)
    assert driver.execute_script("return window.pacsflowViewer.renderer") == "niivue"

    # the canvas renders the volume, and two slices give different pixels
    driver.execute_script(
        "const nv = window.pacsflowViewer.nv; nv.setSliceType(nv.sliceTypeAxial);"
        "nv.scene.crosshairPos = [0.5, 0.5, 0.25]; nv.createOnLocationChange();"
    )
    w, h, _sum, lit, first = driver.execute_script(_PIXELS)
    assert min(w, h) > 100, (w, h)
    assert lit > 0.05 * w * h, (w, h, lit)
    driver.execute_script("window.pacsflowViewer.nv.scene.crosshairPos[2] = 0.75")
    second = driver.execute_script(_PIXELS)[4]
    assert second != first
    # slice numbers from 1, and the "go to finding" crosshair is on the finding's box
    driver.find_element("id", "nv-centre").click()
    vox = driver.execute_script("return window.pacsflowViewer.vox")
    k0, j0, i0, k1, j1, i1 = f["bbox"]
    assert k0 <= vox[2] <= k1, (vox, f["bbox"])
    assert j0 <= vox[1] <= j1, (vox, f["bbox"])
    assert i0 <= vox[0] <= i1, (vox, f["bbox"])
    assert driver.find_element("id", "nv-pos").text.startswith(f"slice {vox[2] + 1} / ")

    # a correction through NiiVue's drawing API: unchanged, it is the model's mask exactly
    # (the drawing round-trips to the stored voxel order); then a 2x2x2 block alone
    saved = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.pacsflowViewer.save().then(done, (e) => done({error: String(e)}));"
    )
    assert "error" not in saved, saved
    model = np.load(lake.research / f["mask_path"]) == f["label_value"]
    stored = np.load(lake.research / saved["mask_path"])
    assert np.array_equal(stored, model.astype(np.uint8))
    saved = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; const nv = window.pacsflowViewer.nv;"
        "nv.drawBitmap.fill(0); const d = nv.back.dimsRAS;"
        "for (const [x, y, z] of [[0,0,0],[1,0,0],[0,1,0],[1,1,0],[0,0,1],[1,0,1],[0,1,1],"
        "[1,1,1]]) nv.drawBitmap[x + 2 + (y + 2) * d[1] + (z + 2) * d[1] * d[2]] = 1;"
        "nv.refreshDrawing(true);"
        "window.pacsflowViewer.save().then(done, (e) => done({error: String(e)}));"
    )
    assert saved.get("voxel_count") == 8, saved
    rows = [r for r in load_corrections(lake) if r["finding_key"] == accepted]
    assert len(rows) == 2
    assert rows[-1]["reviewer"] == "rudi"
    assert rows[-1]["tensor_checksum"] == f["tensor_checksum"]
    assert rows[-1]["model_version"] == f["model_version"]
    assert int(np.load(lake.research / rows[-1]["mask_path"]).sum()) == 8

    _only_from_the_app(driver, server)
    driver.execute_script("window.pacsflowViewer.nv.setSliceType(3)")
    driver.find_element("id", "nv-centre").click()
    driver.execute_script("document.getElementById('nv').scrollIntoView()")
    _screenshot(driver, "review-viewer.png")

    # the label set export carries the latest corrected mask
    with _session(server, "lena") as s:
        csv = s.get(server + "/export?format=csv", timeout=WAIT_S).text
    assert rows[-1]["mask_path"] in csv

    # load time of a CT and its mask (NIfTI over loopback, WebGL2 on SwiftShader, the CPU):
    # a volume over 2**21 voxels is shown first as a preview (every n-th voxel), then whole;
    # measured and printed (bench/viewer_load.py measures 512x512x300, see bench/RESULTS.md)
    big = add_big_ct(lake, f, (120, 256, 256))
    driver.get(f"{server}/finding?key={quote(big, safe='')}&viewer=niivue")
    _viewer_ready(driver, 300)
    t = driver.execute_script("return window.pacsflowViewer.timings")
    nv = driver.find_element("id", "nv")
    assert nv.get_attribute("data-preview") == str(t["preview"])
    assert nv.get_attribute("data-loaded") == str(t["frame"])
    # the preview gave way to the whole volume and mask
    dims = driver.execute_script("return Array.from(window.pacsflowViewer.nv.back.dims)")
    assert dims[1:] == [256, 256, 120], dims
    drawn = driver.execute_script("return window.pacsflowViewer.nv.drawBitmap.length")
    assert drawn == 120 * 256 * 256
    print(f"viewer: 120x256x256 CT + mask, preview in {t['preview']} ms, whole in {t['frame']} ms")
    assert t["preview"] < t["frame"] < 300000, t


# the slice viewer's canvas: size, lit pixels and a hash of its pixels (2-D context)
_SLICE_PIXELS = """
const c = document.getElementById('nv-slices'), w = c.width, h = c.height;
const px = c.getContext('2d').getImageData(0, 0, w, h).data;
let lit = 0, red = 0, hash = 0;
for (let i = 0; i < px.length; i += 4) {
  const v = px[i] + px[i + 1] + px[i + 2]; if (v > 30) lit++;
  if (px[i] > px[i + 1] + 60) red++;
  hash = (hash * 31 + v) % 1000000007;
}
return [w, h, lit, red, hash];
"""

# orientation of the three planes for a few affines (LPS, row-major), from the module itself
_ORIENTATION = """
const done = arguments[arguments.length - 1];
import('/static/slices.js').then((m) => {
  const cols = (a) => [[a[0], a[4], a[8]], [a[1], a[5], a[9]], [a[2], a[6], a[10]]];
  const out = {};
  for (const [name, a] of Object.entries(arguments[0])) {
    out[name] = [0, 1, 2].map((axis) => {
      const s = m.screenOf(axis, cols(a));
      return [s.kind, s.labels.left, s.labels.right, s.labels.top, s.labels.bottom];
    });
  }
  done(out);
}, (e) => done({error: String(e)}));
"""


def test_slice_viewer_renders_planes_fast_and_switches_to_niivue(
    lake: LakePaths, server: str, gl_browser: Any
) -> None:
    """On a browser whose WebGL is the CPU's (SwiftShader here) the page picks the slice
    viewer: the three planes through the finding come first, then the whole volume; the
    canvas shows volume and mask, scrolls, windows and turns planes by the affine; the 3-D
    layout switches to NiiVue. Before: NiiVue only, 9 s for a 120x256x256 CT here and
    81-100 s for a 512x512x300 one (bench/viewer_load.py)."""
    import numpy as np
    from selenium.webdriver.support.ui import WebDriverWait

    driver = gl_browser
    findings = read_table(lake, "findings").to_pylist()
    f = max(
        (x for x in findings if (x["voxel_count"] or 0) > 0 and x.get("bbox")),
        key=lambda x: (x["voxel_count"], x["finding_key"]),
    )
    _login(driver, server, "rudi", PASSWORDS["rudi"])
    big = add_big_ct(lake, f, (120, 256, 256))
    driver.get(f"{server}/finding?key={quote(big, safe='')}")
    _viewer_ready(driver)
    state = driver.execute_script(
        "const v = window.pacsflowViewer; return [v.renderer, v.rendererWhy, v.timings, "
        "v.slices.volume.dims, v.slices.maskBlock.dims, v.slices.maskBlock.start, v.vox]"
    )
    renderer, why, t, vol_dims, mask_dims, mask_start, vox = state
    assert renderer == "slices", why
    assert "SwiftShader" in why, why
    assert vol_dims == [256, 256, 120]  # the whole volume, x = column
    # the mask came cut to the finding (crop=1): the box of its voxels, where it lies
    big_f = next(x for x in read_table(lake, "findings").to_pylist() if x["finding_key"] == big)
    on = np.load(lake.research / big_f["mask_path"]) == big_f["label_value"]
    hits = [np.flatnonzero(on.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    assert mask_start == [int(hits[a][0]) for a in (2, 1, 0)]
    assert mask_dims == [int(hits[a][-1] - hits[a][0] + 1) for a in (2, 1, 0)]
    assert int(np.prod(mask_dims)) < 256 * 256 * 120 / 20
    nv = driver.find_element("id", "nv")
    assert nv.get_attribute("data-first") == str(t["first"])
    assert nv.get_attribute("data-loaded") == str(t["frame"])
    assert t["planes"] <= t["first"] <= t["frame"], t
    print(
        f"slice viewer: 120x256x256 CT + mask, first frame {t['first']} ms, whole {t['frame']} ms"
    )

    # it opened on the finding: the position is inside its box, numbered from 1
    k0, j0, i0, k1, j1, i1 = big_f["bbox"]
    assert k0 <= vox[2] <= k1, (vox, big_f["bbox"])
    assert j0 <= vox[1] <= j1, (vox, big_f["bbox"])
    assert i0 <= vox[0] <= i1, (vox, big_f["bbox"])
    assert driver.find_element("id", "nv-pos").text.startswith(f"slice {vox[2] + 1} / 120 ")
    w, h, lit, red, first = driver.execute_script(_SLICE_PIXELS)
    assert w > 300, (w, h)
    assert h > 200, (w, h)
    assert lit > 0.05 * w * h, (w, h, lit)
    assert red > 20, red  # the mask, filled, through the finding

    # mask off, then outline: fewer red pixels; back to fill
    driver.execute_script(
        "const m = document.getElementById('nv-mask-mode'); m.value = 'off';"
        "m.dispatchEvent(new Event('change'))"
    )
    assert driver.execute_script(_SLICE_PIXELS)[3] < red / 10
    driver.execute_script(
        "const m = document.getElementById('nv-mask-mode'); m.value = 'outline';"
        "m.dispatchEvent(new Event('change'))"
    )
    outline = driver.execute_script(_SLICE_PIXELS)[3]
    assert 0 < outline < red, (outline, red)
    driver.execute_script(
        "const m = document.getElementById('nv-mask-mode'); m.value = 'fill';"
        "m.dispatchEvent(new Event('change'))"
    )

    # a window preset changes the picture
    driver.execute_script(
        "const m = document.getElementById('nv-window'); m.value = 'bone';"
        "m.dispatchEvent(new Event('change'))"
    )
    assert driver.execute_script(_SLICE_PIXELS)[4] != first

    # the wheel over the axial pane moves one slice; the planes differ
    c = driver.find_element("id", "nv-slices")
    driver.execute_script(
        "const c = arguments[0], r = c.getBoundingClientRect();"
        "for (let n = 0; n < 20; n++) c.dispatchEvent(new WheelEvent('wheel', {deltaY: 100,"
        " clientX: r.left + r.width / 6, clientY: r.top + r.height / 2, bubbles: true,"
        " cancelable: true}));",
        c,
    )
    moved = driver.execute_script("return window.pacsflowViewer.vox")
    assert moved[2] == max(vox[2] - 20, 0), (moved, vox)
    assert moved[:2] == vox[:2], (moved, vox)
    assert driver.find_element("id", "nv-pos").text.startswith(f"slice {moved[2] + 1} / 120 ")
    other = driver.execute_script(_SLICE_PIXELS)[4]
    driver.find_element("id", "nv-centre").click()
    assert driver.execute_script("return window.pacsflowViewer.vox") == vox
    assert driver.execute_script(_SLICE_PIXELS)[4] != other

    # zoom changes the picture, reset brings it back; a click in the axial pane moves the
    # crosshair within the slice; a right drag changes the window
    centred = driver.execute_script(_SLICE_PIXELS)[4]
    driver.find_element("id", "nv-zoom-in").click()
    assert driver.execute_script(_SLICE_PIXELS)[4] != centred
    driver.find_element("id", "nv-reset").click()
    assert driver.execute_script(_SLICE_PIXELS)[4] == centred
    pointer = (
        "const c = arguments[0], r = c.getBoundingClientRect(), b = arguments[1];"
        "const at = (x, y) => ({clientX: r.left + x * r.width, clientY: r.top + y * r.height,"
        " button: b, pointerId: 1, bubbles: true});"
        "c.dispatchEvent(new PointerEvent('pointerdown', at(arguments[2], arguments[3])));"
        "c.dispatchEvent(new PointerEvent('pointermove', at(arguments[4], arguments[5])));"
        "c.dispatchEvent(new PointerEvent('pointerup', at(arguments[4], arguments[5])));"
        "return [window.pacsflowViewer.vox, window.pacsflowViewer.slices.window];"
    )
    before_window = driver.execute_script("return window.pacsflowViewer.slices.window")
    clicked, same_window = driver.execute_script(pointer, c, 0, 0.1, 0.3, 0.1, 0.3)
    assert clicked[2] == vox[2], (clicked, vox)  # the axial pane: same slice
    assert clicked[:2] != vox[:2], (clicked, vox)
    assert same_window == before_window
    _, dragged = driver.execute_script(pointer, c, 2, 0.5, 0.5, 0.6, 0.45)
    assert dragged != before_window, (dragged, before_window)
    driver.find_element("id", "nv-centre").click()
    driver.execute_script(  # the preset again (the screenshot below)
        "document.getElementById('nv-window').dispatchEvent(new Event('change'))"
    )
    assert driver.execute_script("return window.pacsflowViewer.slices.window") == before_window

    # planes turned by the affine: radiological axial (patient's left on the right, anterior
    # up), coronal (left on the right, head up), sagittal (anterior on the left, head up); an
    # axial series stored feet first and a sagittal MR stored as slices keep that convention
    orient = driver.execute_async_script(
        _ORIENTATION,
        {
            "axial": [0.7, 0, 0, 0, 0, 0.7, 0, 0, 0, 0, 2.5, 0, 0, 0, 0, 1],
            "feet_first": [-0.7, 0, 0, 0, 0, -0.7, 0, 0, 0, 0, -2.5, 0, 0, 0, 0, 1],
            "sagittal_slices": [0, 0, 1, 0, 1, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 1],
        },
    )
    assert "error" not in orient, orient
    axial = [["axial", "R", "L", "A", "P"], ["coronal", "R", "L", "S", "I"],
             ["sagittal", "A", "P", "S", "I"]]  # fmt: skip
    assert orient["axial"] == axial
    assert orient["feet_first"] == axial
    assert sorted(p[0] for p in orient["sagittal_slices"]) == ["axial", "coronal", "sagittal"]
    assert orient["sagittal_slices"][0] == ["sagittal", "A", "P", "S", "I"]
    driver.execute_script("document.getElementById('nv').scrollIntoView()")
    _screenshot(driver, "review-slices.png")

    urls = _only_from_the_app(driver, server)
    assert any("plane=" in u for u in urls), urls

    # the probe ran once the first page had loaded; this tab's next pages skip it
    driver.refresh()
    _viewer_ready(driver)
    again = driver.execute_script(
        "const v = window.pacsflowViewer; return [v.renderer, v.rendererWhy, v.timings]"
    )
    assert again[0] == "slices"
    assert again[1] == why
    assert "probe" not in again[2], again[2]

    # the 3-D layout switches to NiiVue, which loads the same volume
    driver.execute_script(
        "const m = document.getElementById('nv-layout'); m.value = '3-D';"
        "m.dispatchEvent(new Event('change'))"
    )
    WebDriverWait(driver, 300).until(
        lambda d: d.execute_script(
            "const v = window.pacsflowViewer; return v.error || (v.nv && v.nv.volumes.length"
            " && v.nv.back && v.nv.back.dims[3] === 120 && v.timings.frame > v.timings.first)"
        )
    )
    assert driver.execute_script("return window.pacsflowViewer.error") is None
    assert driver.execute_script("return window.pacsflowViewer.renderer") == "niivue"
    assert not driver.find_element("id", "nv-slices").is_displayed()
    assert driver.find_element("id", "nv-canvas").is_displayed()
