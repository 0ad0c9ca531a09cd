"""The local Dask cluster of a stage listens on loopback only, on free ports.

Found in CI: with ``dashboard_address=None`` the scheduler's HTTP server (health routes) still
starts, on 0.0.0.0:8787; when another cluster holds 8787 it falls back to another port and
leaks the socket of the failed attempt, a ResourceWarning that failed an unrelated test.
"""

from __future__ import annotations

import gc
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cli._common import dask_client
from pipeline.config import load_config


@pytest.fixture
def port_8787_taken() -> Iterator[None]:
    """Hold 8787 as another Dask cluster's scheduler would (skip where it is in use)."""
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", 8787))
    except OSError:
        s.close()
        pytest.skip("port 8787 is in use on this machine")
    s.listen()
    try:
        yield
    finally:
        s.close()


def test_local_cluster_http_server_is_loopback_on_a_free_port(
    tmp_path: Path, port_8787_taken: None
) -> None:
    cfg = load_config(None, overrides={"lake": str(tmp_path / "lake"), "compute": {"workers": 2}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with dask_client(cfg) as client:
            scheduler = client.cluster.scheduler
            http = [sock.getsockname() for sock in scheduler.http_server._sockets.values()]
        gc.collect()
    assert http
    assert all(host == "127.0.0.1" and port != 8787 for host, port in http), http
    leaked = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked, [str(w.message) for w in leaked]
