"""Shared pytest fixtures: a real Orthanc PACS, a real Dask cluster, paths and ports.

Servers run as real processes on loopback, started once per test session and stopped by PID in
teardown (``shared/recipes/orthanc.md``; STYLE.md §9). Nothing here mocks a PACS or a cluster.

Fixtures:

- ``orthanc`` (session): a running Orthanc with the DICOMweb plugin and HTTP auth; yields an
  :class:`OrthancServer`. Skipped when Orthanc is not installed, except on CI (``CI`` set),
  where it fails.
- ``dicomweb`` (function): a ``DICOMwebClient`` for ``orthanc`` whose HTTP session is closed
  after the test.
- ``dask_cluster`` (session): a scheduler and two worker processes; yields the scheduler
  address ``tcp://127.0.0.1:PORT``.
- ``dask_client`` (function): a ``distributed.Client`` connected to ``dask_cluster``.
- ``shared_data`` (session): the real DICOM corpus: ``../shared/data``, else a complete
  ``make test-data`` cache (``$PACSFLOW_TEST_DATA`` or ``~/.cache/pacsflow-test-data``, laid
  out the same way); skips when neither exists. The run's summary counts those skips.
- ``tmp_lake`` (function): ``tmp_path / "lake"`` (not created).
- ``unused_tcp_port`` (function): a TCP port free on 127.0.0.1 (see :func:`free_port`).
- ``synth_archive`` (session): a small synthetic archive from ``pipeline.synth``, with the
  series its ground truth lists.

Test modules should not ``from conftest import ...`` at run time (several ``conftest`` modules
share that name); import the types only under ``TYPE_CHECKING``, and use the fixtures.

The servers listen on loopback ports picked by :func:`free_port`. Orthanc itself listens on
all interfaces (it has no bind-address option); run the suite inside ``unshare -n`` to keep it
strictly on loopback (``tools/run-tests.sh``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    import requests
    from dicomweb_client.api import DICOMwebClient
    from distributed import Client

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
SHARED_DATA: Final = Path(
    os.environ.get("PACSFLOW_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data"
)
#: The skip reason of every test that needs the real corpus (counted in the run's summary).
NO_SHARED_DATA: Final = "real DICOM corpus absent"

ORTHANC_BIN: Final = Path(os.environ.get("PACSFLOW_TEST_ORTHANC", "/usr/sbin/Orthanc"))
ORTHANC_DICOMWEB_PLUGIN: Final = Path(
    os.environ.get(
        "PACSFLOW_TEST_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
    )
)
ORTHANC_AET: Final = "TESTPACS"
ORTHANC_USER: Final = "pacsflow-test"
#: A test-only password for a PACS that lives for one test session on loopback.
ORTHANC_PASSWORD: Final = "pacsflow-test-password"
#: The calling AE of the tests' own DICOM clients; registered in Orthanc's DicomModalities
#: (so C-FIND/C-GET/C-MOVE are allowed) with ``scu_port`` as its C-MOVE destination port.
SCU_AET: Final = "PACSFLOW"
#: A second registered calling AE, at the same host and port as ``SCU_AET``.
ALT_SCU_AET: Final = "TESTSCU"

SERVER_START_TIMEOUT_S: Final = 60.0
SERVER_STOP_TIMEOUT_S: Final = 30.0
LOG_TAIL_CHARS: Final = 4000

_NOT_INSTALLED = "Orthanc not installed: run `make test` or tools/install-orthanc.sh"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now (bind to port 0, read, close).

    The port can be taken by someone else before the caller binds it; servers started with it
    are retried with fresh ports when they fail to start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _on_ci() -> bool:
    """True when the ``CI`` environment variable is set to a true-ish value."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no", "off"}


def _log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """Return the last ``chars`` characters of a log file, or a note when it is unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text[-chars:] if text else f"<{path} is empty>"


def _libc_prctl() -> Callable[..., int] | None:
    """Linux ``prctl(2)`` from the C library, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# looked up once here: the child must not dlopen() between fork and exec
_PRCTL: Final = _libc_prctl()
_PR_SET_PDEATHSIG: Final = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when the test process dies, so no server outlives it.

    Only the test session's main thread starts servers, so the parent-death signal is tied to
    the life of the pytest process itself.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _popen(
    argv: Sequence[str],
    *,
    log_path: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, stdout and stderr appended to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )


def _stop(
    *procs: subprocess.Popen[bytes], timeout: float = SERVER_STOP_TIMEOUT_S
) -> list[int | None]:
    """Stop servers started by :func:`_popen`: SIGTERM each by PID, wait, then SIGKILL.

    All are signalled first and then waited for together, so a slow one does not delay the
    others. A process still alive after ``timeout`` gets SIGKILL on its process group, and so
    does whatever a stopped leader left behind in its group. Returns the exit statuses.
    """
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, _left(deadline)))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return [proc.returncode for proc in procs]


def _left(deadline: float) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic`` value)."""
    return deadline - time.monotonic()


def _http_session(auth: tuple[str, str] | None) -> requests.Session:
    """A requests session for a loopback server: basic auth, and no proxies or netrc from env."""
    import requests

    session = requests.Session()
    session.trust_env = False  # never send loopback traffic through an HTTP(S)_PROXY
    if auth is not None:
        session.auth = auth
    return session


# --------------------------------------------------------------------------------------------
# Orthanc
# --------------------------------------------------------------------------------------------


def orthanc_config(
    workdir: Path,
    *,
    http_port: int,
    dicom_port: int,
    scu_port: int,
    aet: str = ORTHANC_AET,
    users: Mapping[str, str] | None = None,
    plugins: Sequence[Path] = (ORTHANC_DICOMWEB_PLUGIN,),
) -> dict[str, Any]:
    """Build the JSON configuration of a test Orthanc (``shared/recipes/orthanc.md`` §2).

    Args:
        workdir: folder for the storage and the SQLite index (absolute paths).
        http_port: REST and DICOMweb port.
        dicom_port: DICOM port; its called AE title is ``aet`` and is checked.
        scu_port: port of the tests' own Storage SCP, the C-MOVE destination of ``SCU_AET``
            and ``ALT_SCU_AET``.
        aet: Orthanc's AE title.
        users: HTTP basic-auth users; authentication is on.
        plugins: plugin ``.so`` files, listed one by one (recipe §8.4).
    """
    users = dict(users) if users is not None else {ORTHANC_USER: ORTHANC_PASSWORD}
    modality = {"Host": "127.0.0.1", "Port": scu_port}
    return {
        "Name": "PACSFLOW-TEST",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "Plugins": [str(p) for p in plugins],
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": users,
        "DicomModalities": {
            SCU_AET.lower(): {"AET": SCU_AET, **modality},
            ALT_SCU_AET.lower(): {"AET": ALT_SCU_AET, **modality},
        },
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "SaveJobs": False,
        "OverwriteInstances": True,
        "DicomScuTimeout": 10,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
            "Ssl": False,
            # dicomweb-client sends a Host header without the port (recipe §8.8)
            "Host": f"127.0.0.1:{http_port}",
        },
    }


@dataclass(frozen=True)
class OrthancServer:
    """A running test Orthanc, as yielded by the ``orthanc`` fixture.

    The server is shared by the whole test session: keep each test's data apart with fresh
    UIDs, and never assert on global counts (all studies, all patients).
    """

    http_port: int
    dicom_port: int
    aet: str
    username: str
    password: str
    base_url: str
    dicomweb_url: str
    scu_aet: str
    scu_port: int
    log_path: Path
    workdir: Path
    pid: int

    @property
    def auth(self) -> tuple[str, str]:
        """HTTP basic-auth credentials as a ``(username, password)`` tuple."""
        return (self.username, self.password)

    def dicomweb_client(self, session: requests.Session | None = None) -> DICOMwebClient:
        """A DICOMweb client for this server, authenticated, with HTTP retries off.

        Pass a ``session`` you close yourself, or use the ``dicomweb`` fixture, which does; without
        one, the client gets its own session that is never closed.
        """
        from dicomweb_client.api import DICOMwebClient

        if session is None:
            session = _http_session(self.auth)
        else:
            session.auth = self.auth
        client = DICOMwebClient(self.dicomweb_url, session=session)
        client.set_http_retry_params(retry=False)  # fail fast (recipe §8.13)
        return client

    def rest(self, method: str, path: str, **kw: Any) -> requests.Response:
        """Call Orthanc's REST API, authenticated; ``path`` starts with ``/``.

        Keyword arguments go to :meth:`requests.Session.request` (``timeout`` defaults to 30 s;
        pass ``auth=None`` to send no credentials).
        """
        kw.setdefault("timeout", 30)
        auth = kw.pop("auth", self.auth)
        with _http_session(auth) as session:
            return session.request(method, f"{self.base_url}{path}", **kw)


class _PortTakenError(RuntimeError):
    """A server could not bind a port picked by :func:`free_port` (someone took it first)."""


def _start_orthanc(workdir: Path) -> tuple[subprocess.Popen[bytes], OrthancServer]:
    """Start Orthanc from a fresh config in ``workdir`` and wait until ``GET /system`` is 200.

    Raises:
        RuntimeError: the process died; the message holds the tail of its log
            (:class:`_PortTakenError` when a port was taken between picking and binding).
        TimeoutError: not ready within ``SERVER_START_TIMEOUT_S``.
    """
    http_port, dicom_port, scu_port = free_port(), free_port(), free_port()
    config_path = workdir / "orthanc.json"
    log_path = workdir / "orthanc.log"
    config = orthanc_config(workdir, http_port=http_port, dicom_port=dicom_port, scu_port=scu_port)
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    # DCMTK (Orthanc's DICOM stack) turns Nagle's algorithm off only when TCP_NODELAY is set;
    # without it every DIMSE round trip waits ~40 ms for a delayed ACK (C-ECHO 45 ms vs 3 ms)
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = _popen(
        [str(ORTHANC_BIN), f"--logfile={log_path}", str(config_path)],
        log_path=workdir / "orthanc.stdout.log",
        cwd=workdir,
        env=env,
    )
    base_url = f"http://127.0.0.1:{http_port}"
    server = OrthancServer(
        http_port=http_port,
        dicom_port=dicom_port,
        aet=ORTHANC_AET,
        username=ORTHANC_USER,
        password=ORTHANC_PASSWORD,
        base_url=base_url,
        dicomweb_url=f"{base_url}/dicom-web",
        scu_aet=SCU_AET,
        scu_port=scu_port,
        log_path=log_path,
        workdir=workdir,
        pid=proc.pid,
    )
    import requests

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        with _http_session(server.auth) as session:
            while True:
                if proc.poll() is not None:
                    port_taken = "already in use" in _log_tail(log_path)
                    raise (_PortTakenError if port_taken else RuntimeError)(
                        f"Orthanc exited with status {proc.returncode} while starting; "
                        f"log tail ({log_path}):\n{_log_tail(log_path)}"
                    )
                with contextlib.suppress(requests.RequestException):
                    if session.get(f"{base_url}/system", timeout=2).status_code == 200:
                        return proc, server
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"Orthanc not ready after {SERVER_START_TIMEOUT_S:.0f} s; "
                        f"log tail ({log_path}):\n{_log_tail(log_path)}"
                    )
                time.sleep(0.05)
    except BaseException:
        _stop(proc)
        raise


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """A real Orthanc on loopback for the whole session (DICOMweb plugin, HTTP auth on).

    Skips when Orthanc or its DICOMweb plugin is not installed, but fails on CI, which must
    install them (``tools/install-orthanc.sh``).
    """
    missing = [p for p in (ORTHANC_BIN, ORTHANC_DICOMWEB_PLUGIN) if not p.exists()]
    if missing:
        reason = f"{_NOT_INSTALLED} (missing: {', '.join(map(str, missing))})"
        if _on_ci():
            pytest.fail(f"CI must install Orthanc. {reason}", pytrace=False)
        pytest.skip(reason)

    attempts = 3  # a picked port can be taken before Orthanc binds it
    for attempt in range(1, attempts + 1):
        workdir = tmp_path_factory.mktemp("orthanc")
        try:
            proc, server = _start_orthanc(workdir)
        except _PortTakenError:
            if attempt == attempts:
                raise
            continue
        break
    try:
        yield server
    finally:
        died = proc.poll()
        _stop(proc)
    if died is not None:  # a crash during the session: report it even if every test passed
        pytest.fail(
            f"Orthanc (pid {proc.pid}) died during the test session with status {died}; "
            f"log tail ({server.log_path}):\n{_log_tail(server.log_path)}",
            pytrace=False,
        )


@dataclass(frozen=True)
class OrthancControl:
    """Start, stop and restart private Orthanc servers (for tests of a PACS that goes away)."""

    def start(self, workdir: Path) -> tuple[subprocess.Popen[bytes], OrthancServer]:
        """A fresh Orthanc with its own storage in ``workdir``, ready."""
        if not ORTHANC_BIN.exists():
            pytest.skip(_NOT_INSTALLED)
        return _start_orthanc(workdir)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        _stop(proc)

    def restart(self, server: OrthancServer) -> subprocess.Popen[bytes]:
        """The same server again: its config (ports, AE title) and storage, ready."""
        import requests

        workdir = server.workdir
        proc = _popen(
            [
                str(ORTHANC_BIN),
                f"--logfile={workdir / 'orthanc.restart.log'}",
                str(workdir / "orthanc.json"),
            ],
            log_path=workdir / "orthanc.restart.stdout.log",
            cwd=workdir,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        with _http_session(server.auth) as session:
            while True:
                with contextlib.suppress(requests.RequestException):
                    if session.get(f"{server.base_url}/system", timeout=2).status_code == 200:
                        return proc
                if proc.poll() is not None or time.monotonic() > deadline:
                    _stop(proc)
                    raise RuntimeError(
                        f"Orthanc did not come back: {_log_tail(workdir / 'orthanc.restart.log')}"
                    )
                time.sleep(0.05)


@pytest.fixture
def orthanc_control() -> OrthancControl:
    """Private Orthanc servers a test may stop and restart (the session's one stays up)."""
    return OrthancControl()


@pytest.fixture
def dicomweb(orthanc: OrthancServer) -> Iterator[DICOMwebClient]:
    """A DICOMweb client for ``orthanc``; its HTTP session is closed after the test."""
    with _http_session(orthanc.auth) as session:
        yield orthanc.dicomweb_client(session)


# --------------------------------------------------------------------------------------------
# Dask
# --------------------------------------------------------------------------------------------

DASK_WORKERS: Final = 2
DASK_WORKER_MEMORY: Final = "2GiB"


def _subprocess_env() -> dict[str, str]:
    """Environment for server processes: this one, plus the repo root on ``PYTHONPATH``.

    The repo root makes ``pipeline`` importable on workers even when it is not installed
    (with an editable install it resolves to the same files).
    """
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _dask_failure(procs: Mapping[str, subprocess.Popen[bytes]], logs: Mapping[str, Path]) -> str:
    """Describe each process's state and log tail, for an error message."""
    parts = []
    for name, proc in procs.items():
        state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
        parts.append(f"--- {name} (pid {proc.pid}, {state}) {logs[name]}:\n{_log_tail(logs[name])}")
    return "\n".join(parts)


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Dask cluster: a scheduler and two single-thread worker processes on loopback.

    Workers run under a nanny (so ``Client.restart`` works and the memory limit is enforced)
    and import ``pipeline`` from this checkout. Yields the scheduler address
    ``tcp://127.0.0.1:PORT``.
    """
    workdir = tmp_path_factory.mktemp("dask")
    env = _subprocess_env()
    python = sys.executable
    scheduler_file = workdir / "scheduler.json"

    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {"scheduler": workdir / "scheduler.log"}
    try:
        procs["scheduler"] = _popen(
            [
                python,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",  # the OS picks a free port: no race; read it from the file
                "--scheduler-file",
                str(scheduler_file),
                "--no-dashboard",
                "--dashboard-address",  # its HTTP server still starts: loopback, a free port
                "127.0.0.1:0",
            ],
            log_path=logs["scheduler"],
            cwd=workdir,
            env=env,
        )
        for i in range(DASK_WORKERS):
            name = f"worker-{i}"
            local_dir = workdir / name
            local_dir.mkdir()
            logs[name] = workdir / f"{name}.log"
            procs[name] = _popen(
                [
                    python,
                    "-m",
                    "distributed.cli.dask_worker",
                    "--scheduler-file",
                    str(scheduler_file),
                    "--host",
                    "127.0.0.1",
                    "--name",
                    name,
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    DASK_WORKER_MEMORY,
                    "--local-directory",
                    str(local_dir),
                    "--no-dashboard",
                    "--nanny",
                    "--death-timeout",
                    "60",
                ],
                log_path=logs[name],
                cwd=workdir,
                env=env,
            )
        yield _wait_for_dask(scheduler_file, procs, logs)
    finally:
        # workers first, so they do not spend their death-timeout looking for the scheduler
        _stop(*(proc for name, proc in procs.items() if name != "scheduler"))
        if "scheduler" in procs:
            _stop(procs["scheduler"])


def _wait_for_dask(
    scheduler_file: Path,
    procs: Mapping[str, subprocess.Popen[bytes]],
    logs: Mapping[str, Path],
) -> str:
    """Wait until the scheduler has ``DASK_WORKERS`` workers and return its address, or raise."""
    from distributed import Client

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    address = None
    while True:
        dead = [name for name, proc in procs.items() if proc.poll() is not None]
        if dead:
            raise RuntimeError(
                f"Dask process(es) {', '.join(dead)} exited while starting:\n"
                + _dask_failure(procs, logs)
            )
        if address is None:
            with contextlib.suppress(OSError, ValueError, KeyError):  # absent or half-written
                address = str(json.loads(scheduler_file.read_text(encoding="utf-8"))["address"])
        if address is not None:
            with (
                contextlib.suppress(OSError, TimeoutError),
                Client(address, timeout=5, set_as_default=False) as client,
            ):
                client.wait_for_workers(DASK_WORKERS, timeout=max(1.0, _left(deadline)))
                return address
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Dask cluster ({scheduler_file}) did not get {DASK_WORKERS} workers within "
                f"{SERVER_START_TIMEOUT_S:.0f} s:\n" + _dask_failure(procs, logs)
            )
        time.sleep(0.1)


@pytest.fixture
def dask_client(dask_cluster: str, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A ``distributed.Client`` connected to ``dask_cluster``, closed after the test.

    It is the default scheduler for ``dask.compute`` while the test runs. Test modules are not
    importable on workers, so the requesting test module is pickled by value for the duration
    of the test: functions defined in it can be submitted as they are.
    """
    import cloudpickle
    from distributed import Client

    module = request.module
    by_value = module.__name__ not in cloudpickle.list_registry_pickle_by_value()
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        with Client(dask_cluster, timeout=30) as client:
            yield client
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)


# --------------------------------------------------------------------------------------------
# synthetic archive
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSeries:
    """One series of the synthetic archive, as its ``ground_truth.json`` lists it."""

    study_uid: str
    series_uid: str
    modality: str
    #: the generator's series kind, e.g. ``ct_scout``, ``ct_axial``, ``mr_t1_axial``
    kind: str
    transfer_syntax: str
    #: False for a series written as bare datasets (no preamble or file meta)
    part10: bool
    sop_instance_uids: tuple[str, ...]
    #: absolute paths, in InstanceNumber order (the order of ``sop_instance_uids``)
    files: tuple[Path, ...]


@dataclass(frozen=True)
class SynthArchive:
    """A synthetic archive on disk and the valid series its ground truth lists."""

    root: Path
    series: tuple[SynthSeries, ...]
    #: the parsed ``ground_truth.json``
    truth: Mapping[str, Any]

    def of_kind(self, kind: str) -> list[SynthSeries]:
        """The series of one kind (e.g. ``ct_axial``), in ground-truth order."""
        return [s for s in self.series if s.kind == kind]

    def of_modality(self, modality: str) -> list[SynthSeries]:
        """The series of one modality, in ground-truth order."""
        return [s for s in self.series if s.modality == modality]


def load_archive(root: Path) -> SynthArchive:
    """Read ``root/ground_truth.json`` (written by ``pipeline.synth``) into a SynthArchive."""
    truth = json.loads((root / "ground_truth.json").read_text(encoding="utf-8"))
    series = tuple(
        SynthSeries(
            study_uid=entry["StudyInstanceUID"],
            series_uid=entry["SeriesInstanceUID"],
            modality=entry["Modality"],
            kind=entry["kind"],
            transfer_syntax=entry["TransferSyntaxUID"],
            part10=entry["part10"],
            sop_instance_uids=tuple(entry["sop_instance_uids"]),
            files=tuple(root / f for f in entry["files"]),
        )
        for entry in truth["series"]
    )
    return SynthArchive(root=root, series=series, truth=truth)


@pytest.fixture(scope="session")
def synth_archive(tmp_path_factory: pytest.TempPathFactory) -> SynthArchive:
    """A one-patient synthetic archive: CT and MR studies, 16 CT slices of 128×128, no bad files.

    Made once per session (under a second). Its UIDs derive from the seed, so tests that send
    it to the session-wide Orthanc give the copies they send fresh UIDs first.
    """
    from pipeline.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, patients=1, seed=7, ct_slices=16, rows=128, columns=128, include_bad=False)
    archive = load_archive(out)
    assert archive.series, f"{out}/ground_truth.json lists no series"
    return archive


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------


def _test_data_tool() -> Any:
    """``tools/fetch_test_data.py`` as a module (tools/ is not a package)."""
    name = "pacsflow_fetch_test_data"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO_ROOT / "tools" / "fetch_test_data.py"
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real DICOM corpus: ``../shared/data`` or the ``make test-data`` cache; else skip."""
    root = _test_data_tool().data_root(SHARED_DATA)
    if root is None:
        pytest.skip(
            f"{NO_SHARED_DATA}: neither {SHARED_DATA} nor a complete cache at "
            f"{_test_data_tool().cache_dir()} (run `make test-data`)"
        )
    return Path(root)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: Any) -> Iterator[None]:
    """Say how many tests skipped for want of the real corpus, and how to get it (last)."""
    yield
    skipped = terminalreporter.stats.get("skipped", [])
    n = 0
    for report in skipped:
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and NO_SHARED_DATA in str(longrepr[-1]):
            n += 1
    if n:
        terminalreporter.write_line(
            f"{n} test{'s' if n != 1 else ''} skipped: {NO_SHARED_DATA}; run `make test-data`",
            yellow=True,
            bold=True,
        )


@pytest.fixture
def unused_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server a test starts itself)."""
    return free_port()


@pytest.fixture
def tmp_lake(tmp_path: Path) -> Path:
    """A path for a fresh lake, ``tmp_path / "lake"`` (not created)."""
    return tmp_path / "lake"


@pytest.fixture(scope="session")
def session_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One secret key file (mode 0600) for the lakes tests make through the CLI."""
    from pipeline.lake.keys import generate_key_file

    return generate_key_file(tmp_path_factory.mktemp("key") / "session.key")


@pytest.fixture(autouse=True)
def _key_and_witness_env(session_key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every lake a test makes through the CLI without a key flag is a lake of the session
    key (``PACSFLOW_KEY_FILE``; a ``--key-file`` or ``key_file`` in a config wins), and its
    audit witness is off unless a test sets one (syslog is not read back here). A test of the
    no-key case removes the variable itself."""
    monkeypatch.setenv("PACSFLOW_KEY_FILE", str(session_key_file))
    monkeypatch.setenv("PACSFLOW__AUDIT__WITNESS", "none")


@dataclass(frozen=True)
class PrivateTmpfs:
    """Where a test may mount a small tmpfs in a private mount namespace: run commands through
    ``unshare`` (``[unshare, "-m", ...]``) and mount on ``mount_point``."""

    unshare: str
    mount_point: Path


@pytest.fixture
def private_tmpfs(tmp_path: Path) -> PrivateTmpfs:
    """A private tmpfs is possible here (root, util-linux's ``unshare``, ``mount`` allowed),
    checked by mounting a 1 MiB one once; the test skips with the reason otherwise."""
    import shutil

    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("a private tmpfs needs root and unshare (util-linux)")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    probe = subprocess.run(
        [unshare, "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount_point}"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()[:200]}")
    return PrivateTmpfs(unshare, mount_point)
