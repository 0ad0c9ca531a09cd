"""A DICOM PACS over DIMSE (pynetdicom): C-FIND to list, C-GET or C-MOVE to retrieve.

A unit is one study, ``studies/<StudyInstanceUID>``, listed by a Study Root C-FIND at STUDY
level with the watermark ``"<NumberOfStudyRelatedSeries>:<NumberOfStudyRelatedInstances>"``.
Reading a unit retrieves the whole study into a local cache, ``<cache_dir>/<sha256 of the
study UID>/<sha256 of the SOP Instance UID>.dcm`` (files written atomically, exactly as the
PACS sent them), and yields one :class:`~pipeline.connectors.base.RawObject` per instance. A
study retrieved in full is marked in the cache with its watermark, so reading it again (a
resumed crawl) costs no network at all.

Retrieval (``source.dimse.retrieve``):

- ``get``: one C-GET of the study. The association proposes a presentation context for each
  storage SOP class of the study (from ``SOPClassesInStudy``, else an IMAGE-level C-FIND, else
  a broad default list), each with the SCP role, and one context per transfer syntax, so the
  PACS sends every instance in the syntax it stored it in (one context listing all syntaxes
  makes the PACS pick one and transcode, which fails for syntaxes it cannot transcode). An
  association holds at most 128 contexts, so when a study has many SOP classes, each gets
  fewer single-syntax contexts and a last one listing the remaining syntaxes.
- ``move``: C-MOVE to pacsflow's own Storage SCP (AE ``source.calling_aet`` on
  ``source.dimse.storage_port``), started for the retrieval and shut down after. When a
  study-level C-MOVE fails, the missing instances are moved again series by series.
- ``get-then-move`` (default): C-GET, then C-MOVE for the instances C-GET did not bring.

Instances the PACS could not send become raw objects whose ``error`` is an
:class:`~pipeline.errors.InputError` with reason ``unretrievable``; a :class:`SourceError`
means the PACS is unreachable, refuses us, or dropped an association (retry later).

Gentleness: at most ``source.dimse.max_associations`` associations at once, across all Dask
workers (a ``distributed.Semaphore`` named after the PACS) or within the process (no Dask),
and optionally only inside a local-time window such as ``19:00-07:00``.

Logs name AE titles, counts and hashes only, never patient identifiers. pynetdicom itself logs
C-FIND identifiers at DEBUG level (its ``LOG_REQUEST_IDENTIFIERS``); keep the ``pynetdicom``
logger at INFO or above in production.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as dtime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, Literal

from pipeline.config.models import DimseTlsConfig, SourceConfig
from pipeline.connectors.base import RawObject, StoreResult, Unit
from pipeline.dicom.atomic import atomic_write_bytes
from pipeline.enums import QuarantineReason, SourceKind
from pipeline.errors import ConfigError, InputError, SourceError

if TYPE_CHECKING:
    from pydicom import Dataset
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.events import Event

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_STORAGE_CLASSES", "MAX_CONTEXTS", "DimseSource", "get_contexts", "in_window"]

Retrieve = Literal["get", "move", "get-then-move"]

#: Most presentation contexts one association may propose (PS3.8 §9.3.2.2: context IDs 1-255,
#: odd). The C-GET association spends one on the Query/Retrieve model itself.
MAX_CONTEXTS: Final = 128

_SUCCESS: Final = 0x0000
_WARNING: Final = 0xB000
_PENDING: Final = frozenset({0xFF00, 0xFF01})
#: Statuses a Storage SCP handler returns: success, out of resources, cannot understand.
_STORE_OK: Final = 0x0000
_STORE_OUT_OF_RESOURCES: Final = 0xA700
_STORE_REFUSED: Final = 0xC000

#: Transfer syntaxes in the order they are offered when a SOP class cannot have one
#: presentation context per syntax: the common ones in real archives first.
_TS_PRIORITY: Final = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)

#: Storage SOP classes proposed for C-GET when the PACS says nothing about a study's classes
#: (no SOPClassesInStudy, no SOPClassUID at IMAGE level): CT, MR, PET, NM, US, CR, DX, MG,
#: XA/RF, SC, SEG, SR, RT, presentation states and the enhanced and legacy-converted classes.
DEFAULT_STORAGE_CLASSES: Final = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.20",  # NM Image
    "1.2.840.10008.5.1.4.1.1.6.1",  # US Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # US Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX Image, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX Image, For Processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG Image, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # MG Image, For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA Image
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image
    "1.2.840.10008.5.1.4.1.1.12.2",  # XRF Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
    "1.2.840.10008.5.1.4.1.1.481.8",  # RT Ion Plan
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
)

_URI = re.compile(
    r"^dimse://(?P<aet>[^@/\\]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)"
    r":(?P<port>\d{1,5})/?$",
    re.IGNORECASE,
)
_LOCATION = re.compile(
    r"^studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/instances/(?P<sop>[0-9.]+)$"
)
_STUDY_KEY = re.compile(r"^studies/(?P<study>[0-9.]+)$")
_UNKNOWN_SERIES: Final = "unknown"
_VERIFICATION: Final = "1.2.840.10008.1.1"
_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model
_MOVE: Final = "1.2.840.10008.5.1.4.1.2.2.2"
_GET: Final = "1.2.840.10008.5.1.4.1.2.2.3"
#: Transfer syntaxes of the non-storage contexts (Verification, Query/Retrieve).
_UNCOMPRESSED: Final = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
_MARKER: Final = "study.json"
#: Studies listed per batch before the ones without counts get a SERIES-level C-FIND.
_LISTING_BATCH: Final = 256
#: Keys of our own C-FIND identifiers, which ``study_filters`` may not override.
_RESERVED_KEYS: Final = frozenset(
    {"QueryRetrieveLevel", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"}
)


def _local_now() -> datetime:
    """The local wall-clock time (the default clock of the crawl window)."""
    return datetime.now()


def _sha256(text: str) -> str:
    """Hex SHA-256 of a UID: the pseudonymous name of a cache folder or file."""
    return hashlib.sha256(text.encode("ascii", "replace")).hexdigest()


def _parse_window(window: str) -> tuple[dtime, dtime]:
    """``"19:00-07:00"`` -> ``(19:00, 07:00)`` (validated by :class:`DimseConfig`)."""
    start, end = window.split("-")
    h1, m1 = start.split(":")
    h2, m2 = end.split(":")
    return dtime(int(h1), int(m1)), dtime(int(h2), int(m2))


def in_window(window: str | None, now: datetime) -> bool:
    """Whether ``now`` (local time) lies in ``window``, which may wrap midnight.

    The start is inside the window and the end is not: ``19:00-07:00`` allows 19:00 to
    06:59:59.

    Parameters
    ----------
    window:
        ``HH:MM-HH:MM`` or None (always inside).
    now:
        The local time to test.

    Returns
    -------
    bool
        True inside the window.
    """
    if window is None:
        return True
    start, end = _parse_window(window)
    t = now.time()
    if start < end:
        return start <= t < end
    return t >= start or t < end


def get_contexts(sop_classes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The storage presentation contexts a C-GET proposes for ``sop_classes``.

    Each class gets an equal share of the 127 contexts left beside the Query/Retrieve one:
    one context per transfer syntax while the share lasts (so the PACS can send each instance
    as stored), then one context listing every remaining syntax.

    Parameters
    ----------
    sop_classes:
        Storage SOP Class UIDs, without repeats.

    Returns
    -------
    list of (str, list of str)
        ``(abstract syntax, transfer syntaxes)`` per context, at most 127.

    Raises
    ------
    ValueError
        For no class, or more classes than contexts.
    """
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    budget = MAX_CONTEXTS - 1
    if not sop_classes or len(sop_classes) > budget:
        raise ValueError(f"C-GET needs 1 to {budget} SOP classes; got {len(sop_classes)}")
    syntaxes = list(_TS_PRIORITY) + [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _TS_PRIORITY]
    share = budget // len(sop_classes)
    contexts: list[tuple[str, list[str]]] = []
    for sop_class in sop_classes:
        if share >= len(syntaxes):
            contexts.extend((sop_class, [ts]) for ts in syntaxes)
        else:
            contexts.extend((sop_class, [ts]) for ts in syntaxes[: share - 1])
            contexts.append((sop_class, syntaxes[share - 1 :]))
    return contexts


# ---------------------------------------------------------------------------------------------
# association cap
# ---------------------------------------------------------------------------------------------

_LOCAL_SEMAPHORES: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_LOCAL_SEMAPHORES_LOCK = threading.Lock()


def _local_semaphore(name: str, max_leases: int) -> threading.BoundedSemaphore:
    """The process-wide semaphore of one PACS (created once per name and cap)."""
    with _LOCAL_SEMAPHORES_LOCK:
        sem = _LOCAL_SEMAPHORES.get((name, max_leases))
        if sem is None:
            sem = _LOCAL_SEMAPHORES[(name, max_leases)] = threading.BoundedSemaphore(max_leases)
        return sem


def _dask_semaphore(name: str, max_leases: int) -> Any | None:
    """A ``distributed.Semaphore`` when this runs on a Dask worker or beside a default client.

    Returns None outside Dask (``distributed`` is never imported just to find out).
    """
    if "distributed" not in sys.modules:
        return None
    from distributed import Semaphore, get_client, get_worker

    try:
        get_worker()
    except ValueError:
        try:
            get_client()
        except ValueError:
            return None
    return Semaphore(max_leases=max_leases, name=name)


@contextlib.contextmanager
def _lease(name: str, max_leases: int) -> Iterator[None]:
    """Hold one of ``max_leases`` leases named ``name`` for the duration of the block."""
    dask_sem = _dask_semaphore(name, max_leases)
    if dask_sem is None:
        with _local_semaphore(name, max_leases):
            yield
        return
    dask_sem.acquire()
    try:
        yield
    finally:
        dask_sem.release()
        refresh = getattr(dask_sem, "refresh_callback", None)
        if refresh is not None and dask_sem.loop is not None:
            dask_sem.loop.add_callback(refresh.stop)


# ---------------------------------------------------------------------------------------------
# receiving instances (C-GET handler and C-MOVE Storage SCP)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    """One instance received into the cache."""

    series_uid: str
    path: Path
    size_bytes: int


class _Sink:
    """Writes the instances of one study that arrive by C-STORE into its cache folder."""

    def __init__(self, folder: Path, study_uid: str) -> None:
        self.folder = folder
        self.study_uid = study_uid
        self.received: dict[str, _Stored] = {}
        self._lock = threading.Lock()

    def on_store(self, event: Event) -> int:
        """``EVT_C_STORE`` handler: write the dataset as sent (atomically) and record it."""
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", None) or "")
        series_uid = _UNKNOWN_SERIES
        try:
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID", ""))
            series_uid = str(ds.get("SeriesInstanceUID", "")) or _UNKNOWN_SERIES
            sop_uid = sop_uid or str(ds.get("SOPInstanceUID", ""))
        except Exception as exc:  # a dataset pydicom cannot parse is still kept, for the crawl
            logger.debug("received a dataset that does not parse (%s); kept as sent", exc)
            study_uid = self.study_uid
        if not sop_uid:
            logger.warning("a C-STORE without SOP Instance UID was refused")
            return _STORE_REFUSED
        if study_uid and study_uid != self.study_uid:
            logger.debug("refused an instance of another study (cache %s)", self.folder.name)
            return _STORE_REFUSED
        path = self.folder / f"{_sha256(sop_uid)}.dcm"
        try:
            data = event.encoded_dataset(include_meta=True)
            _write_atomic(path, data)
        except OSError as exc:
            logger.error("cannot write to the DIMSE cache %s: %s", self.folder, exc.strerror)
            return _STORE_OUT_OF_RESOURCES
        with self._lock:
            self.received[sop_uid] = _Stored(series_uid, path, len(data))
        return _STORE_OK


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file and a rename (the cache is
    rebuilt from the PACS when lost: no fsync)."""
    atomic_write_bytes(path, data, durable=False)


def _no_delay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: turn Nagle's algorithm off (else ~40 ms per DIMSE round trip)."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextlib.contextmanager
def _host_lock(port: int) -> Iterator[None]:
    """Serialise our Storage SCP on ``port`` among the threads and processes of this host."""
    path = Path(tempfile.gettempdir()) / f"pacsflow-dimse-scp-{port}.lock"
    with path.open("a+b") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: one process at a time is on the user
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@lru_cache(maxsize=16)
def _client_ssl_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """The TLS context of our associations: verifies the PACS, presents our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


@lru_cache(maxsize=16)
def _server_ssl_context(ca: Path | None, cert: Path, key: Path | None) -> ssl.SSLContext:
    """The TLS context of our C-MOVE Storage SCP: same material, server side, client certs."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca) if ca else None)
    ctx.load_cert_chain(str(cert), str(key) if key else None)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# ---------------------------------------------------------------------------------------------
# outcomes of C-GET / C-MOVE
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    """The final response of a C-GET or C-MOVE."""

    service: str
    status: int
    completed: int
    failed: int
    warning: int
    failed_uids: tuple[str, ...]
    #: the standard's words for ``status`` (PS3.4 C.4.2.1.5 / C.4.3.1.4), e.g. "Move
    #: destination unknown"
    meaning: str = ""

    @property
    def ok(self) -> bool:
        """Every sub-operation succeeded (or warned)."""
        return self.status in (_SUCCESS, _WARNING) and self.failed == 0

    def describe(self) -> str:
        """E.g. ``C-GET status 0xB000, 8 of 18 sub-operations failed``."""
        total = self.completed + self.failed + self.warning
        meaning = f" ({self.meaning})" if self.meaning and self.status != _WARNING else ""
        counts = f", {self.failed} of {total} sub-operations failed" if total else ""
        return f"{self.service} status 0x{self.status:04X}{meaning}{counts}"


def _int_or_none(ds: Dataset | None, keyword: str) -> int | None:
    """An integer attribute of a response (IS, US), or None when absent, empty or bad."""
    if ds is None:
        return None
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _uids(value: Any) -> tuple[str, ...]:
    """The UIDs of a UI attribute value (one, a list, a backslash-joined string, or none)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split("\\") if v)
    return tuple(str(v) for v in value if v)


# ---------------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DimseSource:
    """A PACS reached over DIMSE, ``dimse://AET@host:port``, with a local retrieval cache.

    Picklable (it travels to Dask workers) and stateless between calls: every call opens and
    releases its own associations. Build it with :meth:`from_uri`.

    Attributes
    ----------
    called_aet, host, port:
        The PACS.
    cache_dir:
        Where retrieved studies are kept: ``<sha256 of the study UID>/<sha256 of the SOP
        Instance UID>.dcm`` plus a ``study.json`` marker once a study is complete.
    calling_aet:
        Our AE title; the PACS must list it (and, for C-MOVE, our host and ``storage_port``).
    clock:
        Returns the local time for the crawl ``window`` (injectable for tests).
    """

    called_aet: str
    host: str
    port: int
    cache_dir: Path
    calling_aet: str = "PACSFLOW"
    timeout_s: float = 30.0
    study_filters: tuple[tuple[str, str], ...] = ()
    retrieve: Retrieve = "get-then-move"
    storage_port: int = 11113
    max_associations: int = 2
    window: str | None = None
    tls: DimseTlsConfig | None = None
    cache_max_bytes: int | None = None
    clock: Callable[[], datetime] = field(default=_local_now, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        for name, aet in (("called", self.called_aet), ("calling", self.calling_aet)):
            if not 1 <= len(aet.strip()) <= 16 or "\\" in aet or not aet.isprintable():
                raise ConfigError(f"invalid {name} AE title {aet!r}: 1 to 16 printable characters")
        if not 1 <= self.port <= 65535 or not 1 <= self.storage_port <= 65535:
            raise ConfigError(f"invalid port in {self.source_id} or dimse.storage_port")
        if self.max_associations < 1:
            raise ConfigError("dimse.max_associations must be at least 1")
        if self.timeout_s <= 0:
            raise ConfigError("source.timeout_s must be positive")
        if self.retrieve not in ("get", "move", "get-then-move"):
            raise ConfigError(
                f"dimse.retrieve must be get, move or get-then-move; got {self.retrieve!r}"
            )
        if self.window is not None:
            try:
                _parse_window(self.window)
            except ValueError as exc:
                raise ConfigError(f"dimse.window must be HH:MM-HH:MM; got {self.window!r}") from exc
        _check_filters(self.study_filters)
        if self.tls is not None:
            for label, path in (
                ("ca", self.tls.ca),
                ("cert", self.tls.cert),
                ("key", self.tls.key),
            ):
                if path is not None and not Path(path).is_file():
                    raise ConfigError(f"dimse.tls.{label} file not found: {path}")
            if self.retrieve != "get" and self.tls.cert is None:
                raise ConfigError(
                    "C-MOVE over TLS needs dimse.tls.cert and dimse.tls.key: the PACS connects "
                    "to our Storage SCP, which must present a certificate (or set "
                    "dimse.retrieve: get)"
                )
            try:  # load the material now, so a bad file is a config error, not a crawl error
                _client_ssl_context(self.tls.ca, self.tls.cert, self.tls.key)
                if self.tls.cert is not None and self.retrieve != "get":
                    _server_ssl_context(self.tls.ca, self.tls.cert, self.tls.key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the DICOM TLS files in dimse.tls: {exc}") from exc

    @classmethod
    def from_uri(
        cls,
        uri: str,
        cfg: SourceConfig,
        *,
        cache_dir: Path,
        clock: Callable[[], datetime] | None = None,
    ) -> DimseSource:
        """Build a source from ``dimse://AET@host:port`` and the source configuration.

        Parameters
        ----------
        uri:
            ``dimse://AET@host:port`` (an IPv6 host in brackets).
        cfg:
            ``source`` section: ``calling_aet``, ``timeout_s``, ``study_filters``,
            ``ca_bundle`` and ``dimse``.
        cache_dir:
            Folder of the retrieval cache (created when needed).
        clock:
            Local-time clock for the crawl window; default :meth:`datetime.now`.

        Returns
        -------
        DimseSource
            The source; nothing is contacted yet (see :meth:`check`).

        Raises
        ------
        ConfigError
            For a malformed URI, a bad filter key or missing TLS files.
        """
        match = _URI.match(uri.strip())
        if match is None:
            raise ConfigError(
                f"malformed DIMSE source {uri!r}: expected dimse://AET@host:port, e.g. "
                "dimse://PACS@pacs.example.org:104 (the AE title is the PACS's called AE title)"
            )
        tls = cfg.dimse.tls
        if tls is not None and tls.ca is None and cfg.ca_bundle is not None:
            tls = tls.model_copy(update={"ca": cfg.ca_bundle})
        return cls(
            called_aet=match["aet"].strip(),
            host=match["host"].strip("[]"),
            port=int(match["port"]),
            cache_dir=Path(cache_dir),
            calling_aet=cfg.calling_aet,
            timeout_s=cfg.timeout_s,
            study_filters=tuple(sorted(cfg.study_filters.items())),
            retrieve=cfg.dimse.retrieve,
            storage_port=cfg.dimse.storage_port,
            max_associations=cfg.dimse.max_associations,
            window=cfg.dimse.window,
            tls=tls,
            cache_max_bytes=(
                int(cfg.dimse.cache_max_gb * 1e9) if cfg.dimse.cache_max_gb is not None else None
            ),
            clock=clock or _local_now,
        )

    # -- identity -----------------------------------------------------------------------------

    @property
    def kind(self) -> SourceKind:
        """Always :attr:`SourceKind.DIMSE`."""
        return SourceKind.DIMSE

    @property
    def source_id(self) -> str:
        """``dimse://AET@host:port`` (DIMSE carries no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"dimse://{self.called_aet}@{host}:{self.port}"

    @property
    def _peer(self) -> str:
        return self.source_id.removeprefix("dimse://")

    # -- public API ---------------------------------------------------------------------------

    def check(self) -> None:
        """C-ECHO the PACS.

        Raises
        ------
        SourceError
            When the PACS cannot be reached, rejects the association or does not answer.
        """
        with self._association([(_VERIFICATION, _UNCOMPRESSED)], purpose="C-ECHO") as assoc:
            status = assoc.send_c_echo()
        if "Status" not in status or int(status.Status) != _SUCCESS:
            got = f"0x{int(status.Status):04X}" if "Status" in status else "no response"
            raise SourceError(f"C-ECHO to {self._peer} failed ({got}); is it a DICOM SCP?")
        logger.info("C-ECHO to %s as %s: success", self._peer, self.calling_aet)

    def list_units(self) -> Iterator[Unit]:
        """Yield one unit per study the PACS finds (Study Root C-FIND, STUDY level).

        The C-FIND runs to its end into a temporary spill file and its association is released
        before the first unit is yielded, so consumers may open associations of their own
        (under the same cap) while iterating. Studies whose counts the PACS leaves empty are
        counted by a SERIES-level C-FIND, a batch of studies per association.

        Yields
        ------
        Unit
            ``studies/<StudyInstanceUID>`` with watermark ``"<series>:<instances>"``.

        Raises
        ------
        SourceError
            Outside the crawl window, or when the PACS cannot be queried.
        """
        from pydicom import Dataset

        self._check_window()
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.NumberOfStudyRelatedSeries = ""
        query.NumberOfStudyRelatedInstances = ""
        _apply_filters(query, self.study_filters)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        found = skipped = counted = 0
        with tempfile.TemporaryFile("w+", encoding="ascii", dir=self.cache_dir) as spill:
            with self._find_association("C-FIND studies") as assoc:
                for ident in self._find(assoc, query):
                    uid = str(ident.get("StudyInstanceUID", "") or "")
                    if not uid or not re.fullmatch(r"[0-9.]+", uid):
                        skipped += 1
                        continue
                    series = _int_or_none(ident, "NumberOfStudyRelatedSeries")
                    instances = _int_or_none(ident, "NumberOfStudyRelatedInstances")
                    spill.write(f"{uid}\t{_opt(series)}\t{_opt(instances)}\n")
                    found += 1
            logger.info(
                "C-FIND on %s as %s: %d studies%s",
                self._peer,
                self.calling_aet,
                found,
                f" ({skipped} without a valid StudyInstanceUID skipped)" if skipped else "",
            )
            spill.seek(0)
            rows = (line.rstrip("\n").split("\t") for line in spill)
            for batch in _batched(rows, _LISTING_BATCH):
                missing = [uid for uid, s, i in batch if not s or not i]
                counts: dict[str, tuple[int, int]] = {}
                if missing:
                    counted += len(missing)
                    with self._find_association("C-FIND series counts") as assoc:
                        for uid in missing:
                            counts[uid] = self._count_study(assoc, uid)
                for uid, s, i in batch:
                    n_series, n_instances = counts.get(uid) or (int(s), int(i))
                    yield Unit(key=f"studies/{uid}", watermark=f"{n_series}:{n_instances}")
        if counted:
            logger.info("%d studies counted at SERIES level (the PACS left counts empty)", counted)

    def read_unit(self, unit: Unit) -> Iterator[RawObject]:
        """Retrieve one study into the cache and yield one raw object per instance.

        A study already complete in the cache under the same watermark is not fetched again.

        Parameters
        ----------
        unit:
            A unit from :meth:`list_units` (``studies/<StudyInstanceUID>``).

        Yields
        ------
        RawObject
            ``path`` set for each instance received; ``error`` (reason ``unretrievable``) for
            each instance the PACS failed to send.

        Raises
        ------
        SourceError
            Outside the crawl window (for a study not in the cache), or when the PACS cannot
            be reached or drops an association.
        ValueError
            For a unit key that is not ``studies/<uid>``.
        """
        match = _STUDY_KEY.match(unit.key)
        if match is None:
            raise ValueError(f"not a DIMSE unit key: {unit.key!r}")
        study_uid = match["study"]
        folder = self._study_folder(study_uid)
        cached = self._cached(folder, unit.watermark)
        if cached is not None:
            logger.debug("study %s complete in the cache: %d instances", folder.name, len(cached))
            yield from (_raw(study_uid, se, sop, p, unit.key) for se, sop, p in cached)
            return
        self._check_window()
        started = time.monotonic()
        instances = unit.watermark.rpartition(":")[2]
        received, errors = self._retrieve(
            _Target(study_uid), folder, int(instances) if instances.isdigit() else None
        )
        for sop_uid, stored in sorted(received.items()):
            yield _raw(study_uid, stored.series_uid, sop_uid, stored.path, unit.key)
        for (series_uid, sop_uid), message in sorted(errors.items()):
            yield RawObject(
                location=_location(study_uid, series_uid, sop_uid),
                unit_key=unit.key,
                error=InputError(message, reason=QuarantineReason.UNRETRIEVABLE),
            )
        logger.info(
            "study %s: %d instances retrieved, %d unretrievable, %.1f s",
            folder.name[:12],
            len(received),
            len(errors),
            time.monotonic() - started,
        )
        if received and not errors:
            _write_marker(folder, unit.watermark, received)
        if self.cache_max_bytes is not None:
            trim_cache(self.cache_dir, self.cache_max_bytes, keep=folder)

    def open(self, location: str) -> BinaryIO:
        """Open one instance's cached file, retrieving the instance first when not cached.

        Parameters
        ----------
        location:
            ``studies/<uid>/series/<uid>/instances/<uid>``.

        Returns
        -------
        BinaryIO
            The Part 10 file as the PACS sent it.

        Raises
        ------
        InputError
            Reason ``unretrievable``: the PACS could not send the instance.
        SourceError
            Outside the crawl window, or the PACS is unreachable.
        ValueError
            For a location that is not an instance location.
        """
        match = _LOCATION.match(location)
        if match is None:
            raise ValueError(f"not a DIMSE instance location: {location!r}")
        folder = self._study_folder(match["study"])
        path = folder / f"{_sha256(match['sop'])}.dcm"
        if not path.is_file():
            self._check_window()
            target = _Target(match["study"], match["series"], match["sop"])
            _, errors = self._retrieve(target, folder)
            if errors or not path.is_file():
                message = next(iter(errors.values()), "the PACS did not send this instance")
                raise InputError(f"{location}: {message}", reason=QuarantineReason.UNRETRIEVABLE)
            if self.cache_max_bytes is not None:  # the bound holds for later stages' reads too
                trim_cache(self.cache_dir, self.cache_max_bytes, keep=folder)
        return path.open("rb")

    # -- retrieval ----------------------------------------------------------------------------

    def store(self, files: list[Path]) -> list[StoreResult]:
        """C-STORE the files over one association proposing only their SOP classes; a
        warning status counts as stored, a refusal is reported with its status code.

        Raises:
            SourceError: no association (the PACS is down or refuses us).
        """
        return dimse_store(self, files)

    def confirm(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """C-FIND (IMAGE level) for the instance."""
        return dimse_confirm(self, study_uid, series_uid, sop_uid)

    def _retrieve(
        self, target: _Target, folder: Path, expected_count: int | None = None
    ) -> tuple[dict[str, _Stored], dict[tuple[str, str], str]]:
        """Fetch a study (or one instance) into ``folder``; return received and failed ones.

        Failed instances are keyed ``(series UID, SOP UID)`` and carry their message. When
        every retrieval succeeded and at least ``expected_count`` instances (the watermark's
        count) arrived, no C-FIND of the instances is needed; otherwise an IMAGE-level C-FIND
        tells which instances are missing.
        """
        folder.mkdir(parents=True, exist_ok=True)
        sink = _Sink(folder, target.study_uid)
        outcomes: list[_Outcome] = []
        expected: dict[str, str] | None = None
        notes: list[str] = []
        ok = False
        if self.retrieve != "move":
            classes, expected = self._sop_classes(target)
            if len(classes) > MAX_CONTEXTS - 1:
                notes.append(f"C-GET impossible: {len(classes)} SOP classes exceed one association")
            else:
                outcomes.append(self._c_get(target, classes, sink))
                ok = outcomes[-1].ok
        if not ok and self.retrieve != "get":
            whole = not sink.received
            if whole:
                outcomes.append(self._c_move([target], sink))
                ok = outcomes[-1].ok
            # what is still missing, series by series (a study-level C-MOVE can fail as a
            # whole for one bad instance: Orthanc stops at the first failed sub-operation)
            if not ok and (not whole or target.sop_uid is None):
                if expected is None:
                    expected = self._expected(target)
                missing = {sop: se for sop, se in expected.items() if sop not in sink.received}
                specs = _series_specs(target, missing)
                if specs:
                    outcomes.append(self._c_move(specs, sink))
        if ok and len(sink.received) >= max(expected_count or 0, 1):
            return dict(sink.received), {}
        if expected is None:
            expected = self._expected(target)
        failed_listed = {u for o in outcomes for u in o.failed_uids}
        missing = {sop: se for sop, se in expected.items() if sop not in sink.received}
        for sop in failed_listed - sink.received.keys() - missing.keys():
            missing[sop] = _UNKNOWN_SERIES
        if not missing:
            return dict(sink.received), {}
        why = "; ".join([*notes, *(o.describe() for o in outcomes)]) or "nothing was sent"
        message = (
            f"the PACS could not send this instance ({why}); its log names the cause, e.g. a "
            "transfer syntax it cannot send (Orthanc 1.10: HTJ2K)"
        )
        logger.warning(
            "study %s: %d instance(s) unretrievable (%s)", folder.name[:12], len(missing), why
        )
        return dict(sink.received), {(se, sop): message for sop, se in missing.items()}

    def _sop_classes(self, target: _Target) -> tuple[list[str], dict[str, str] | None]:
        """The SOP classes a C-GET of ``target`` must propose, and the instances if learned.

        STUDY-level ``SOPClassesInStudy`` first; else an IMAGE-level C-FIND (which also gives
        every instance's series); else :data:`DEFAULT_STORAGE_CLASSES`.
        """
        from pydicom import Dataset

        with self._find_association("C-FIND SOP classes") as assoc:
            if target.sop_uid is None:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = target.study_uid
                query.SOPClassesInStudy = ""
                classes: list[str] = []
                for ident in self._find(assoc, query):
                    classes.extend(_uids(ident.get("SOPClassesInStudy")))
                if classes:
                    return list(dict.fromkeys(classes)), None
            expected, image_classes = self._find_instances(assoc, target)
        if image_classes:
            return image_classes, expected
        logger.debug("no SOP classes from the PACS; proposing the default storage classes")
        return list(DEFAULT_STORAGE_CLASSES), expected

    def _expected(self, target: _Target) -> dict[str, str]:
        """SOP Instance UID -> Series Instance UID of ``target``'s instances (IMAGE C-FIND)."""
        with self._find_association("C-FIND instances") as assoc:
            expected, _ = self._find_instances(assoc, target)
        return expected

    def _find_instances(
        self, assoc: Association, target: _Target
    ) -> tuple[dict[str, str], list[str]]:
        """IMAGE-level C-FIND: each instance's series, and the SOP classes seen."""
        from pydicom import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = target.study_uid
        query.SeriesInstanceUID = target.series_uid or ""
        query.SOPInstanceUID = target.sop_uid or ""
        query.SOPClassUID = ""
        expected: dict[str, str] = {}
        classes: dict[str, None] = {}
        for ident in self._find(assoc, query):
            sop = str(ident.get("SOPInstanceUID", "") or "")
            if sop:
                expected[sop] = str(ident.get("SeriesInstanceUID", "") or "") or _UNKNOWN_SERIES
            sop_class = str(ident.get("SOPClassUID", "") or "")
            if sop_class:
                classes[sop_class] = None
        return expected, list(classes)

    def _c_get(self, target: _Target, classes: Sequence[str], sink: _Sink) -> _Outcome:
        """C-GET ``target`` with SCP-role contexts for ``classes``; instances go to ``sink``."""
        from pynetdicom import build_role, evt

        contexts = [(_GET, _UNCOMPRESSED), *get_contexts(classes)]
        roles = [build_role(c, scp_role=True) for c in classes]
        with self._association(
            contexts,
            purpose="C-GET",
            ext_neg=roles,
            handlers=[(evt.EVT_C_STORE, sink.on_store)],
        ) as assoc:
            return self._collect("C-GET", assoc.send_c_get(target.query(), _GET))

    def _c_move(self, specs: Sequence[_Target], sink: _Sink) -> _Outcome:
        """C-MOVE each of ``specs`` to our own Storage SCP, started for the purpose.

        Returns the outcome of the last C-MOVE, with the failures of all of them.
        """
        outcomes: list[_Outcome] = []
        with (
            self._storage_scp(sink),
            self._association([(_MOVE, _UNCOMPRESSED)], purpose="C-MOVE") as assoc,
        ):
            for spec in specs:
                responses = assoc.send_c_move(spec.query(), self.calling_aet, _MOVE)
                outcomes.append(self._collect("C-MOVE", responses))
        failed = sum(o.failed for o in outcomes)
        worst = next((o for o in outcomes if not o.ok), outcomes[-1])
        return _Outcome(
            service="C-MOVE",
            status=worst.status,
            meaning=worst.meaning,
            completed=sum(o.completed for o in outcomes),
            failed=failed,
            warning=sum(o.warning for o in outcomes),
            failed_uids=tuple(u for o in outcomes for u in o.failed_uids),
        )

    @contextlib.contextmanager
    def _storage_scp(self, sink: _Sink) -> Iterator[None]:
        """Run pacsflow's Storage SCP (AE ``calling_aet``, port ``storage_port``) meanwhile."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.calling_aet)
        ae.require_called_aet = True
        self._set_timeouts(ae)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ssl_context = None
        if self.tls is not None and self.tls.cert is not None:
            ssl_context = _server_ssl_context(self.tls.ca, self.tls.cert, self.tls.key)
        with _host_lock(self.storage_port):
            try:
                server = ae.start_server(
                    ("", self.storage_port),
                    block=False,
                    ssl_context=ssl_context,
                    evt_handlers=[(evt.EVT_C_STORE, sink.on_store), (evt.EVT_CONN_OPEN, _no_delay)],
                )
            except OSError as exc:
                hint = " (in use by another program)" if exc.errno == errno.EADDRINUSE else ""
                raise SourceError(
                    f"cannot start our Storage SCP for C-MOVE on port {self.storage_port}"
                    f"{hint}: {exc.strerror}; set source.dimse.storage_port, or retrieve: get"
                ) from exc
            assert server is not None  # block=False returns the server
            try:
                yield
            finally:
                server.shutdown()

    # -- DIMSE plumbing -----------------------------------------------------------------------

    def _set_timeouts(self, ae: AE) -> None:
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s

    @contextlib.contextmanager
    def _find_association(self, purpose: str) -> Iterator[Association]:
        with self._association([(_FIND, _UNCOMPRESSED)], purpose=purpose) as assoc:
            yield assoc

    @contextlib.contextmanager
    def _association(
        self,
        contexts: Iterable[tuple[str, list[str]]],
        *,
        purpose: str,
        ext_neg: list[Any] | None = None,
        handlers: list[tuple[Any, Callable[..., Any]]] | None = None,
    ) -> Iterator[Association]:
        """Open one association under the cap, yield it, release it (abort on errors).

        Raises
        ------
        SourceError
            When the association is not established.
        """
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.calling_aet)
        self._set_timeouts(ae)
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, syntaxes)
        tls_args = None
        if self.tls is not None:
            ctx = _client_ssl_context(self.tls.ca, self.tls.cert, self.tls.key)
            tls_args = (ctx, self.host)
        waited = time.monotonic()
        with _lease(f"pacsflow-dimse-{self.host}:{self.port}", self.max_associations):
            waited = time.monotonic() - waited
            try:
                assoc = ae.associate(
                    self.host,
                    self.port,
                    ae_title=self.called_aet,
                    ext_neg=ext_neg,
                    tls_args=tls_args,
                    evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay), *(handlers or [])],
                )
            except (OSError, ssl.SSLError) as exc:
                raise self._cannot_associate(str(exc)) from exc
            if not assoc.is_established:
                raise self._cannot_associate(_why_not(assoc))
            logger.debug(
                "association to %s opened for %s (waited %.3f s for a lease)",
                self._peer,
                purpose,
                waited,
            )
            try:
                yield assoc
            except BaseException:
                assoc.abort()
                logger.debug("association to %s aborted", self._peer)
                raise
            else:
                assoc.release()
                logger.debug("association to %s released", self._peer)
            finally:
                ae.shutdown()

    def _cannot_associate(self, why: str) -> SourceError:
        return SourceError(
            f"cannot associate with {self._peer}: {why}. Check the host and port, and that the "
            f"PACS lists our calling AE title {self.calling_aet!r} (and accepts called AE title "
            f"{self.called_aet!r})"
        )

    def _find(self, assoc: Association, query: Dataset) -> Iterator[Dataset]:
        """Send a Study Root C-FIND and yield its matches; raise unless it ends in success."""
        final: int | None = None
        for status, identifier in assoc.send_c_find(query, _FIND):
            if "Status" not in status:
                break
            code = int(status.Status)
            if code in _PENDING:
                if identifier is not None:
                    yield identifier
            else:
                final = code
        if final is None:
            raise SourceError(
                f"C-FIND on {self._peer} got no final status (association aborted or timed "
                f"out); a PACS that does not list our calling AE title {self.calling_aet!r} "
                "may answer so"
            )
        if final != _SUCCESS:
            raise SourceError(
                f"C-FIND on {self._peer} failed with status 0x{final:04X} "
                f"({query.QueryRetrieveLevel} level); see the PACS log"
            )

    def _collect(
        self, service: str, responses: Iterable[tuple[Dataset, Dataset | None]]
    ) -> _Outcome:
        """Read a C-GET/C-MOVE response stream to its final status."""
        from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

        meanings = (
            QR_GET_SERVICE_CLASS_STATUS if service == "C-GET" else QR_MOVE_SERVICE_CLASS_STATUS
        )
        last: _Outcome | None = None
        for status, identifier in responses:
            if "Status" not in status:
                raise SourceError(
                    f"{service} on {self._peer} got no final status (association aborted or "
                    "timed out); rerun: instances already received are kept"
                )
            code = int(status.Status)
            outcome = _Outcome(
                service=service,
                status=code,
                completed=_int_or_none(status, "NumberOfCompletedSuboperations") or 0,
                failed=_int_or_none(status, "NumberOfFailedSuboperations") or 0,
                warning=_int_or_none(status, "NumberOfWarningSuboperations") or 0,
                failed_uids=_uids(identifier.get("FailedSOPInstanceUIDList"))
                if identifier is not None
                else (),
                meaning=meanings.get(code, ("", ""))[1],
            )
            if code not in _PENDING:
                logger.debug("%s on %s: %s", service, self._peer, outcome.describe())
                return outcome
            last = outcome
        raise SourceError(
            f"{service} on {self._peer} ended without a final status"
            f"{'' if last is None else ' after ' + str(last.completed) + ' sub-operations'}"
        )

    def _count_study(self, assoc: Association, study_uid: str) -> tuple[int, int]:
        """(series, instances) of a study by SERIES-level C-FIND (IMAGE level if needed)."""
        from pydicom import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.NumberOfSeriesRelatedInstances = ""
        n_series = 0
        n_instances: int | None = 0
        for ident in self._find(assoc, query):
            n_series += 1
            count = _int_or_none(ident, "NumberOfSeriesRelatedInstances")
            n_instances = None if count is None or n_instances is None else n_instances + count
        if n_instances is None:
            expected, _ = self._find_instances(assoc, _Target(study_uid))
            n_instances = len(expected)
        return n_series, n_instances

    # -- window and cache ---------------------------------------------------------------------

    def _check_window(self) -> None:
        if not in_window(self.window, self.clock()):
            raise SourceError(
                f"outside the crawl window {self.window} (local time); rerun inside it: "
                "finished studies are kept"
            )

    def _study_folder(self, study_uid: str) -> Path:
        return self.cache_dir / _sha256(study_uid)

    def _cached(self, folder: Path, watermark: str) -> list[tuple[str, str, Path]] | None:
        """The cached instances of a complete study with ``watermark``, else None."""
        try:
            marker = json.loads((folder / _MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(marker, dict) or marker.get("watermark") != watermark:
            return None
        out: list[tuple[str, str, Path]] = []
        for series_uid, sop_uid in marker.get("instances", []):
            path = folder / f"{_sha256(sop_uid)}.dcm"
            if not path.is_file():
                return None
            out.append((series_uid, sop_uid, path))
        return out


@dataclass(frozen=True)
class _Target:
    """What one retrieval asks for: a study, or one instance of it."""

    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_uids: tuple[str, ...] = ()

    def query(self) -> Dataset:
        """The C-GET/C-MOVE identifier: STUDY level, or IMAGE level (a UID list allowed)."""
        from pydicom import Dataset

        ds = Dataset()
        ds.StudyInstanceUID = self.study_uid
        uids = list(self.sop_uids) or ([self.sop_uid] if self.sop_uid else [])
        if not uids:
            ds.QueryRetrieveLevel = "STUDY"
            return ds
        ds.QueryRetrieveLevel = "IMAGE"
        ds.SeriesInstanceUID = self.series_uid or ""
        ds.SOPInstanceUID = uids if len(uids) > 1 else uids[0]
        return ds


def _series_specs(target: _Target, missing: dict[str, str]) -> list[_Target]:
    """IMAGE-level targets, one per series, listing the missing instances (PS3.4 C.4.2.2.1)."""
    by_series: dict[str, list[str]] = {}
    for sop, series in missing.items():
        by_series.setdefault(series, []).append(sop)
    return [
        _Target(target.study_uid, series, sop_uids=tuple(sorted(sops)))
        for series, sops in sorted(by_series.items())
        if series != _UNKNOWN_SERIES
    ]


def _why_not(assoc: Association) -> str:
    """Why an association was not established, in words."""
    if assoc.is_rejected:
        return "the association was rejected"
    if assoc.is_aborted:
        return "the association was aborted"
    return "no connection (refused, unreachable or timed out)"


def _check_filters(filters: Iterable[tuple[str, str]]) -> None:
    """Raise ConfigError for a study filter that is not a DICOM keyword or is reserved."""
    from pydicom.datadict import tag_for_keyword

    for keyword, _value in filters:
        if tag_for_keyword(keyword) is None:
            raise ConfigError(
                f"source.study_filters: {keyword!r} is not a DICOM keyword (e.g. StudyDate, "
                "ModalitiesInStudy, AccessionNumber)"
            )
        if keyword in _RESERVED_KEYS:
            raise ConfigError(f"source.study_filters: {keyword!r} is set by the connector")


def _apply_filters(query: Dataset, filters: Iterable[tuple[str, str]]) -> None:
    """Add the configured study filters as matching keys (backslash-separated: a list)."""
    for keyword, value in filters:
        setattr(query, keyword, value.split("\\") if "\\" in value else value)


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _batched(rows: Iterable[list[str]], n: int) -> Iterator[list[tuple[str, str, str]]]:
    """Rows of the listing spill, ``n`` at a time."""
    it = iter(rows)
    while batch := [(r[0], r[1], r[2]) for r in itertools.islice(it, n)]:
        yield batch


def _location(study_uid: str, series_uid: str, sop_uid: str) -> str:
    return f"studies/{study_uid}/series/{series_uid}/instances/{sop_uid}"


def _raw(study_uid: str, series_uid: str, sop_uid: str, path: Path, unit_key: str) -> RawObject:
    """A raw object for a cached instance file."""
    try:
        size: int | None = path.stat().st_size
    except OSError:
        size = None
    return RawObject(
        location=_location(study_uid, series_uid, sop_uid),
        unit_key=unit_key,
        size_bytes=size,
        mtime_ns=None,
        path=path,
    )


def trim_cache(cache_dir: Path, max_bytes: int, keep: Path | None = None) -> int:
    """Evict whole study folders of the retrieval cache, least recently written first, until
    it holds at most ``max_bytes`` (``keep``, the study in use, is never evicted). Returns the
    bytes freed. An evicted study is retrieved again when next read (a crawl unit, or an
    ``open`` of one of its instances by a later stage)."""
    import shutil

    if not cache_dir.is_dir():
        return 0
    studies = []
    total = 0
    for entry in os.scandir(cache_dir):
        if not entry.is_dir(follow_symlinks=False):
            continue
        size = newest = 0
        for f in os.scandir(entry.path):
            st = f.stat(follow_symlinks=False)
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
        studies.append((newest, size, Path(entry.path)))
        total += size
    freed = 0
    for _newest, size, folder in sorted(studies):
        if total - freed <= max_bytes:
            break
        if keep is not None and folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        freed += size
    if freed:
        logger.info(
            "DIMSE cache: evicted %.1f MB to stay under %.1f MB", freed / 1e6, max_bytes / 1e6
        )
    return freed


def _write_marker(folder: Path, watermark: str, received: dict[str, _Stored]) -> None:
    """Mark a study complete in the cache (atomically): its watermark and instances."""
    marker = {
        "watermark": watermark,
        "instances": sorted([s.series_uid, sop] for sop, s in received.items()),
    }
    _write_atomic(folder / _MARKER, json.dumps(marker).encode("ascii"))


#: C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the warnings (coercion,
#: elements discarded, data set does not match the SOP class)
STORE_OK: Final = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def _store_contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """One presentation context per SOP class being sent, in the files' own transfer syntax
    (and Explicit VR Little Endian as an alternative): nothing else is proposed."""
    contexts: dict[str, list[str]] = {}
    for ds in datasets:
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), [])
        ts = str(ds.file_meta.TransferSyntaxUID)
        for syntax in (ts, _UNCOMPRESSED[0]):
            if syntax not in syntaxes:
                syntaxes.append(syntax)
    return sorted(contexts.items())


def dimse_store(source: DimseSource, files: list[Path]) -> list[StoreResult]:
    """C-STORE ``files`` over one association (see :meth:`DimseSource.store`)."""
    import pydicom

    datasets = [pydicom.dcmread(f) for f in files]
    results = []
    with source._association(_store_contexts(datasets), purpose="C-STORE") as assoc:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            status = assoc.send_c_store(ds)
            if status is None or "Status" not in status:
                results.append(StoreResult(uid, False, "no response (association lost)", True))
                continue
            code = int(status.Status)
            if code in STORE_OK:
                warn = "" if code == 0 else " (warning)"
                results.append(StoreResult(uid, True, f"0x{code:04X}{warn}"))
            else:
                # 0xA7xx out of resources is worth retrying; refusals are not
                results.append(StoreResult(uid, False, f"0x{code:04X}", (code >> 8) == 0xA7))
    return results


def dimse_confirm(source: DimseSource, study_uid: str, series_uid: str, sop_uid: str) -> bool:
    """C-FIND at IMAGE level for the instance in its study and series."""
    from pydicom import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = sop_uid
    with source._find_association("confirm") as assoc:
        return any(str(m.get("SOPInstanceUID", "")) == sop_uid for m in source._find(assoc, query))
