"""Issue #18, section 3: encryption in transit of `pacsflow review`, through the real CLI.

- ``--host 0.0.0.0`` without TLS is refused (one line, exit 2) unless ``--insecure-http``,
  which serves with a warning;
- ``--certfile/--keyfile`` (or ``review.certfile/keyfile``) serve HTTPS with the test's own CA
  and server certificate: the session cookie is ``Secure`` (``__Host-`` prefixed) and every
  response carries HSTS;
- headless Chromium over that TLS (the server key pinned with
  ``--ignore-certificate-errors-spki-list``, no certificate check turned off): log in, use the
  worklist, the finding view's script (slider, arrow keys, window) and the metrics page under
  the Content-Security-Policy with no violation in the console.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from review_factory import headless_chromium
from test_review_support import (
    PASSWORDS,
    WAIT_S,
    Tls,
    finding_rows,
    free_port,
    logged_in,
    make_tls,
    review_settings,
    serve_cli,
    shared_lake,
)
from typer.testing import CliRunner

from pipeline.lake import LakePaths

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, session_key_file: Path) -> LakePaths:
    return shared_lake(tmp_path_factory, session_key_file)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


def _config(path: Path, lake: LakePaths, key_file: Path, **review: Any) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "lake": str(lake.root),
                "key_file": str(key_file),
                "review": review_settings(**review),
            }
        )
    )
    return path


def _cli(*args: str) -> Any:
    from pipeline.cli.main import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_plain_http_on_a_network_address_is_refused(
    lake: LakePaths, session_key_file: Path, tmp_path: Path, host: str
) -> None:
    cfg = _config(tmp_path / "c.yaml", lake, session_key_file)
    result = _cli("review", "--config", str(cfg), "--host", host, "--port", str(free_port()))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert f"refusing to serve plain HTTP on {host}" in lines[0]
    assert "--certfile" in lines[0]
    assert "--insecure-http" in lines[0]


def test_certfile_without_keyfile_is_refused(
    lake: LakePaths, session_key_file: Path, tmp_path: Path, tls: Tls
) -> None:
    cfg = _config(tmp_path / "c.yaml", lake, session_key_file)
    result = _cli("review", "--config", str(cfg), "--certfile", str(tls.cert))
    assert result.exit_code == 2
    assert "--certfile and --keyfile go together" in result.output


def test_insecure_http_serves_with_a_warning(
    lake: LakePaths, session_key_file: Path, tmp_path: Path
) -> None:
    cfg = _config(tmp_path / "c.yaml", lake, session_key_file)
    port = free_port()
    args = ["review", "--config", str(cfg), "--host", "0.0.0.0", "--port", str(port)]
    with serve_cli([*args, "--insecure-http"], url=f"http://127.0.0.1:{port}") as server:
        r = requests.get(server.url + "/login", timeout=WAIT_S)
        assert r.status_code == 200
        assert "Strict-Transport-Security" not in r.headers
        assert "secure" not in r.headers["set-cookie"].lower()
        out = server.stop()
    assert "warning: serving plain HTTP on 0.0.0.0" in out


def test_tls_from_the_command_line(
    lake: LakePaths, session_key_file: Path, tmp_path: Path, tls: Tls
) -> None:
    cfg = _config(tmp_path / "c.yaml", lake, session_key_file)
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    args = ["review", "--config", str(cfg), "--port", str(port)]
    args += ["--certfile", str(tls.cert), "--keyfile", str(tls.key)]
    with serve_cli(args, url=base, verify=str(tls.ca)) as server:
        # the certificate chains to the test's CA, and to nothing else
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(base + "/login", timeout=WAIT_S)
        with pytest.raises((requests.ConnectionError, requests.Timeout)):  # no plain HTTP
            requests.get(f"http://127.0.0.1:{port}/login", timeout=3)
        page = requests.get(base + "/login", timeout=WAIT_S, verify=str(tls.ca))
        assert page.headers["Strict-Transport-Security"] == "max-age=31536000"
        cookie = page.headers["set-cookie"]
        assert cookie.startswith("__Host-pacsflow_review=")
        assert "; secure" in cookie.lower()
        assert "httponly" in cookie.lower()
        with logged_in(base, "lena", verify=str(tls.ca)) as s:
            work = s.get(base + "/", timeout=WAIT_S, verify=str(tls.ca))
            assert work.status_code == 200
            assert 'id="worklist"' in work.text
            assert work.headers["Strict-Transport-Security"] == "max-age=31536000"
            assert work.headers["Cache-Control"] == "no-store"
        out = server.stop()
    assert f"serving https://127.0.0.1:{port}/" in out


@pytest.fixture
def browser(tls: Tls) -> Iterator[Any]:
    # trust exactly the test server's key (Chromium has no CA file option)
    with headless_chromium(f"--ignore-certificate-errors-spki-list={tls.spki_sha256}") as driver:
        yield driver


def _wait(driver: Any, condition: Any) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition)


def _loaded(driver: Any, element: Any) -> bool:
    return bool(
        driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", element
        )
    )


def csp_violations(driver: Any) -> list[str]:
    """Console messages of the Content-Security-Policy blocking something."""
    return [
        str(e.get("message"))
        for e in driver.get_log("browser")
        if "Content Security Policy" in str(e.get("message"))
        or "Refused to" in str(e.get("message"))
    ]


def test_browser_over_tls_under_the_csp(
    lake: LakePaths, session_key_file: Path, tmp_path: Path, tls: Tls, browser: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    cfg = _config(
        tmp_path / "c.yaml",
        lake,
        session_key_file,
        certfile=str(tls.cert),
        keyfile=str(tls.key),
    )
    port = free_port()
    base = f"https://localhost:{port}"
    args = ["review", "--config", str(cfg), "--port", str(port)]
    with serve_cli(args, url=base, verify=str(tls.ca)):
        browser.get(base + "/login")
        assert browser.execute_script("return window.isSecureContext") is True
        # the stylesheet is served as a file and applies under the policy
        header = browser.find_element(By.TAG_NAME, "header")
        assert header.value_of_css_property("background-color") == "rgba(31, 43, 61, 1)"
        browser.find_element(By.ID, "username").send_keys("lena")
        browser.find_element(By.ID, "password").send_keys(PASSWORDS["lena"])
        browser.find_element(By.ID, "login-submit").click()
        _wait(browser, lambda d: d.find_elements(By.ID, "worklist"))
        # the session cookie is Secure and HttpOnly: scripts cannot read it
        cookies = {c["name"]: c for c in browser.get_cookies()}
        assert cookies["__Host-pacsflow_review"]["secure"] is True
        assert cookies["__Host-pacsflow_review"]["httpOnly"] is True
        assert "pacsflow_review" not in browser.execute_script("return document.cookie")
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.finding-row")
        assert len(rows) == len(finding_rows(lake))

        # the finding view's script (a file under the policy): arrow keys and the window
        rows[0].find_element(By.CSS_SELECTOR, "a.open").click()
        img = _wait(browser, lambda d: d.find_element(By.ID, "slice"))
        _wait(browser, lambda d: _loaded(d, img))
        k0 = int(browser.find_element(By.ID, "k-label").text)
        browser.find_element(By.TAG_NAME, "body").send_keys(
            Keys.ARROW_LEFT if k0 > 0 else Keys.ARROW_RIGHT
        )
        _wait(browser, lambda d: d.find_element(By.ID, "k-label").text != str(k0))
        _wait(
            browser,
            lambda d: (
                # the counter says slices from 1, the image URL indexes from 0
                f"k={int(d.find_element(By.ID, 'k-label').text) - 1}&" in img.get_attribute("src")
            ),
        )
        _wait(browser, lambda d: _loaded(d, img))
        windows = Select(browser.find_element(By.ID, "w"))
        if len(windows.options) > 1:
            windows.select_by_visible_text(windows.options[-1].text)
            _wait(browser, lambda d: "w=" + windows.options[-1].text in img.get_attribute("src"))
            _wait(browser, lambda d: _loaded(d, img))

        # the metrics page: its plots are data: images, allowed by the policy
        browser.get(base + "/metrics")
        card = _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".metrics-version"))
        assert card.value_of_css_property("margin-bottom") == "16px"
        for plot in card.find_elements(By.TAG_NAME, "img"):
            _wait(browser, lambda d, p=plot: _loaded(d, p))

        # nothing was blocked by the policy on the way
        assert csp_violations(browser) == []
        # and the policy is enforced: an injected inline script is refused, and seen here
        browser.execute_script(
            "var s = document.createElement('script'); s.textContent = 'window.x = 1';"
            "document.body.appendChild(s);"
        )
        assert browser.execute_script("return window.x === undefined") is True
        violations = _wait(browser, lambda d: csp_violations(d))
        assert any("inline script" in v for v in violations), violations
