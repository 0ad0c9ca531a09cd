"""The ``dask_cluster`` fixture: a real scheduler and two worker processes on loopback."""

from __future__ import annotations

import os
import socket

import pytest
from distributed import Client

import pipeline
from pipeline import _deps

pytestmark = pytest.mark.integration


def _worker_identity() -> tuple[int, str]:
    """Run on a worker: its process ID and the file ``pipeline`` was imported from."""
    import pipeline as worker_pipeline

    return os.getpid(), str(worker_pipeline.__file__)


def test_client_sees_two_workers_on_loopback(dask_client: Client, dask_cluster: str) -> None:
    """The scheduler listens on 127.0.0.1 and has exactly two single-thread workers."""
    assert dask_cluster.startswith("tcp://127.0.0.1:")
    assert dask_client.scheduler.address == dask_cluster
    workers = dask_client.scheduler_info(n_workers=-1)["workers"]
    assert len(workers) == 2
    for address, info in workers.items():
        assert address.startswith("tcp://127.0.0.1:")
        assert info["nthreads"] == 1
    assert sorted(info["name"] for info in workers.values()) == ["worker-0", "worker-1"]


def test_work_runs_in_two_separate_worker_processes(dask_client: Client) -> None:
    """Each worker is its own OS process, distinct from the test process and from each other."""
    pids = dask_client.run(os.getpid)
    assert len(pids) == 2
    assert len(set(pids.values())) == 2
    assert os.getpid() not in pids.values()

    # a task pinned to each worker runs in that worker's process
    for address, pid in pids.items():
        future = dask_client.submit(os.getpid, workers=[address], pure=False)
        assert future.result(timeout=30) == pid

    # an ordinary map spreads over the cluster and returns correct results
    squares = dask_client.gather(dask_client.map(pow, range(20), [2] * 20))
    assert squares == [i * i for i in range(20)]
    assert dask_client.run(socket.gethostname).keys() == pids.keys()


def test_workers_import_pipeline_from_this_checkout(dask_client: Client) -> None:
    """Workers import ``pipeline`` from the same files as the test process and can run it."""
    identities = dask_client.run(_worker_identity)
    assert {path for _, path in identities.values()} == {str(pipeline.__file__)}

    versions = dask_client.submit(_deps.library_versions, pure=False).result(timeout=30)
    assert isinstance(versions, dict)
    assert versions == _deps.library_versions()
    assert versions["distributed"] is not None
    assert versions["pydicom"] is not None
