"""An unreachable DICOMweb source fails fast and says why (issue #24: it was silent for 34 s).

Real sockets on loopback: a closed port, a server that accepts and never answers, one whose
accept queue is full (SYNs dropped: a connect timeout, as for an unroutable host) and an HTTP
server that refuses the credentials. The crawl probes the server once, without retries,
before any Dask cluster starts: one line within the configured timeouts.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app

runner = CliRunner()
CONNECT_S, READ_S = 1.0, 2.0
#: what the CLI may add to the timeout in-process (config, lake, manifest, audit)
MARGIN_S = 6.0


def _crawl(tmp_path: Path, url: str, *extra: str) -> tuple[str, int, float]:
    cfg = tmp_path / "source.yaml"
    cfg.write_text(
        f"source:\n  uri: {url}\n  timeout_s: {READ_S}\n  connect_timeout_s: {CONNECT_S}\n"
    )
    t0 = time.monotonic()
    result = runner.invoke(app, ["crawl", "-c", str(cfg), "--lake", str(tmp_path / "lake"), *extra])
    return result.output, result.exit_code, time.monotonic() - t0


def _error_line(output: str) -> str:
    errors = [ln for ln in output.splitlines() if ln.startswith("pacsflow: ")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts connections (the kernel completes the handshake) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield int(s.getsockname()[1])
    s.close()


@pytest.fixture
def full_queue() -> Iterator[int]:
    """A listener whose accept queue is full: the kernel drops further SYNs, as a firewall
    or an unroutable address would (the client's connect times out)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    port = int(s.getsockname()[1])
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.2)
    yield port
    for c in fillers:
        c.close()
    s.close()


@pytest.fixture
def refusing_server() -> Iterator[int]:
    """An HTTP server answering 401 to everything."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="pacs"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_closed_port_is_refused_at_once(tmp_path: Path, closed_port: int) -> None:
    # --workers 2: the probe comes before the Dask cluster would start
    out, code, took = _crawl(
        tmp_path, f"dicomweb+http://127.0.0.1:{closed_port}/dicom-web", "--workers", "2"
    )
    assert code == 1, out
    line = _error_line(out)
    assert f"connection refused by 127.0.0.1:{closed_port}" in line
    assert took < CONNECT_S + MARGIN_S, took


def test_server_that_never_answers_fails_after_the_read_timeout(
    tmp_path: Path, silent_server: int
) -> None:
    out, code, took = _crawl(tmp_path, f"dicomweb+http://127.0.0.1:{silent_server}/dicom-web")
    assert code == 1, out
    line = _error_line(out)
    assert "accepted the connection but sent no answer within 2 s (source.timeout_s)" in line
    assert READ_S <= took < READ_S + MARGIN_S, took  # one try: no retries with backoff


def test_dropped_connection_fails_after_the_connect_timeout(
    tmp_path: Path, full_queue: int
) -> None:
    out, code, took = _crawl(tmp_path, f"dicomweb+http://127.0.0.1:{full_queue}/dicom-web")
    assert code == 1, out
    line = _error_line(out)
    assert f"no connection to 127.0.0.1:{full_queue} within 1 s" in line
    assert "source.connect_timeout_s" in line
    assert CONNECT_S <= took < CONNECT_S + MARGIN_S, took


def test_refused_credentials_fail_at_once(tmp_path: Path, refusing_server: int) -> None:
    out, code, took = _crawl(tmp_path, f"dicomweb+http://127.0.0.1:{refusing_server}/dicom-web")
    assert code == 1, out
    line = _error_line(out)
    assert "(HTTP 401): check source.auth" in line
    assert took < MARGIN_S, took


def test_the_probe_is_announced_first(tmp_path: Path, silent_server: int) -> None:
    out, _, _ = _crawl(tmp_path, f"dicomweb+http://127.0.0.1:{silent_server}/dicom-web")
    checking = next(ln for ln in out.splitlines() if "checking dicomweb+http" in ln)
    assert "connect timeout 1 s, answer timeout 2 s" in checking
    assert out.index(checking) < out.index("pacsflow: ")
