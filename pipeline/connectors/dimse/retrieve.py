"""Retrieval: C-GET, C-MOVE to our own Storage SCP, and C-STORE to the PACS.

``source.dimse.retrieve``:

- ``get``: one C-GET of the study. The association proposes a presentation context for each
  storage SOP class of the study (from ``SOPClassesInStudy``, else an IMAGE-level C-FIND, else
  a broad default list), each with the SCP role, and one context per transfer syntax, so the
  PACS sends every instance in the syntax it stored it in (see
  :func:`~pipeline.connectors.dimse.presentation.get_contexts`).
- ``move``: C-MOVE to pacsflow's own Storage SCP (AE ``source.calling_aet`` on
  ``source.dimse.storage_port``), started for the retrieval and shut down after. When a
  study-level C-MOVE fails, the missing instances are moved again series by series.
- ``get-then-move`` (default): C-GET, then C-MOVE for the instances C-GET did not bring.

Instances arrive by C-STORE into a :class:`Sink`, which writes each one into the study's
cache folder exactly as sent.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.connectors.base import StoreResult
from pipeline.connectors.dimse.association import no_delay, open_association, set_timeouts
from pipeline.connectors.dimse.cache import UNKNOWN_SERIES, Stored, sha256, write_atomic
from pipeline.connectors.dimse.presentation import (
    GET,
    MAX_CONTEXTS,
    MOVE,
    UNCOMPRESSED,
    get_contexts,
    store_contexts,
)
from pipeline.connectors.dimse.query import Target, expected_instances, sop_classes
from pipeline.connectors.dimse.status import (
    PENDING,
    STORE_OK,
    STORE_OUT_OF_RESOURCES,
    STORE_REFUSED,
    STORE_SUCCESS,
    Outcome,
    int_or_none,
    uids,
)
from pipeline.connectors.dimse.tls import server_ssl_context
from pipeline.errors import SourceError

if TYPE_CHECKING:
    from pydicom import Dataset
    from pynetdicom.events import Event

    from pipeline.connectors.dimse.source import DimseSource

logger = logging.getLogger(__name__)

__all__ = ["Sink", "dimse_store", "fetch", "series_specs"]


class Sink:
    """Writes the instances of one study that arrive by C-STORE into its cache folder."""

    def __init__(self, folder: Path, study_uid: str) -> None:
        self.folder = folder
        self.study_uid = study_uid
        self.received: dict[str, Stored] = {}
        self._lock = threading.Lock()

    def on_store(self, event: Event) -> int:
        """``EVT_C_STORE`` handler: write the dataset as sent (atomically) and record it."""
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", None) or "")
        series_uid = UNKNOWN_SERIES
        try:
            ds = event.dataset
            study_uid = str(ds.get("StudyInstanceUID", ""))
            series_uid = str(ds.get("SeriesInstanceUID", "")) or UNKNOWN_SERIES
            sop_uid = sop_uid or str(ds.get("SOPInstanceUID", ""))
        except Exception as exc:  # a dataset pydicom cannot parse is still kept, for the crawl
            logger.debug("received a dataset that does not parse (%s); kept as sent", exc)
            study_uid = self.study_uid
        if not sop_uid:
            logger.warning("a C-STORE without SOP Instance UID was refused")
            return STORE_REFUSED
        if study_uid and study_uid != self.study_uid:
            logger.debug("refused an instance of another study (cache %s)", self.folder.name)
            return STORE_REFUSED
        path = self.folder / f"{sha256(sop_uid)}.dcm"
        try:
            data = event.encoded_dataset(include_meta=True)
            write_atomic(path, data)
        except OSError as exc:
            logger.error("cannot write to the DIMSE cache %s: %s", self.folder, exc.strerror)
            return STORE_OUT_OF_RESOURCES
        with self._lock:
            self.received[sop_uid] = Stored(series_uid, path, len(data))
        return STORE_SUCCESS


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


@contextlib.contextmanager
def _storage_scp(source: DimseSource, sink: Sink) -> Iterator[None]:
    """Run pacsflow's Storage SCP (AE ``calling_aet``, port ``storage_port``) meanwhile."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    ae = AE(ae_title=source.calling_aet)
    ae.require_called_aet = True
    set_timeouts(ae, source.timeout_s)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ssl_context = None
    if source.tls is not None and source.tls.cert is not None:
        ssl_context = server_ssl_context(source.tls.ca, source.tls.cert, source.tls.key)
    with _host_lock(source.storage_port):
        try:
            server = ae.start_server(
                ("", source.storage_port),
                block=False,
                ssl_context=ssl_context,
                evt_handlers=[(evt.EVT_C_STORE, sink.on_store), (evt.EVT_CONN_OPEN, no_delay)],
            )
        except OSError as exc:
            hint = " (in use by another program)" if exc.errno == errno.EADDRINUSE else ""
            raise SourceError(
                f"cannot start our Storage SCP for C-MOVE on port {source.storage_port}"
                f"{hint}: {exc.strerror}; set source.dimse.storage_port, or retrieve: get"
            ) from exc
        assert server is not None  # block=False returns the server
        try:
            yield
        finally:
            server.shutdown()


def _collect(
    source: DimseSource, service: str, responses: Iterable[tuple[Dataset, Dataset | None]]
) -> Outcome:
    """Read a C-GET/C-MOVE response stream to its final status."""
    from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

    meanings = QR_GET_SERVICE_CLASS_STATUS if service == "C-GET" else QR_MOVE_SERVICE_CLASS_STATUS
    last: Outcome | None = None
    for status, identifier in responses:
        if "Status" not in status:
            raise SourceError(
                f"{service} on {source.peer} got no final status (association aborted or "
                "timed out); rerun: instances already received are kept"
            )
        code = int(status.Status)
        outcome = Outcome(
            service=service,
            status=code,
            completed=int_or_none(status, "NumberOfCompletedSuboperations") or 0,
            failed=int_or_none(status, "NumberOfFailedSuboperations") or 0,
            warning=int_or_none(status, "NumberOfWarningSuboperations") or 0,
            failed_uids=uids(identifier.get("FailedSOPInstanceUIDList"))
            if identifier is not None
            else (),
            meaning=meanings.get(code, ("", ""))[1],
        )
        if code not in PENDING:
            logger.debug("%s on %s: %s", service, source.peer, outcome.describe())
            return outcome
        last = outcome
    raise SourceError(
        f"{service} on {source.peer} ended without a final status"
        f"{'' if last is None else ' after ' + str(last.completed) + ' sub-operations'}"
    )


def _c_get(source: DimseSource, target: Target, classes: Sequence[str], sink: Sink) -> Outcome:
    """C-GET ``target`` with SCP-role contexts for ``classes``; instances go to ``sink``."""
    from pynetdicom import build_role, evt

    contexts = [(GET, UNCOMPRESSED), *get_contexts(classes)]
    roles = [build_role(c, scp_role=True) for c in classes]
    with open_association(
        source,
        contexts,
        purpose="C-GET",
        ext_neg=roles,
        handlers=[(evt.EVT_C_STORE, sink.on_store)],
    ) as assoc:
        return _collect(source, "C-GET", assoc.send_c_get(target.query(), GET))


def _c_move(source: DimseSource, specs: Sequence[Target], sink: Sink) -> Outcome:
    """C-MOVE each of ``specs`` to our own Storage SCP, started for the purpose.

    Returns the outcome of the last C-MOVE, with the failures of all of them.
    """
    outcomes: list[Outcome] = []
    with (
        _storage_scp(source, sink),
        open_association(source, [(MOVE, UNCOMPRESSED)], purpose="C-MOVE") as assoc,
    ):
        for spec in specs:
            responses = assoc.send_c_move(spec.query(), source.calling_aet, MOVE)
            outcomes.append(_collect(source, "C-MOVE", responses))
    failed = sum(o.failed for o in outcomes)
    worst = next((o for o in outcomes if not o.ok), outcomes[-1])
    return Outcome(
        service="C-MOVE",
        status=worst.status,
        meaning=worst.meaning,
        completed=sum(o.completed for o in outcomes),
        failed=failed,
        warning=sum(o.warning for o in outcomes),
        failed_uids=tuple(u for o in outcomes for u in o.failed_uids),
    )


def series_specs(target: Target, missing: dict[str, str]) -> list[Target]:
    """IMAGE-level targets, one per series, listing the missing instances (PS3.4 C.4.2.2.1)."""
    by_series: dict[str, list[str]] = {}
    for sop, series in missing.items():
        by_series.setdefault(series, []).append(sop)
    return [
        Target(target.study_uid, series, sop_uids=tuple(sorted(sops)))
        for series, sops in sorted(by_series.items())
        if series != UNKNOWN_SERIES
    ]


def fetch(
    source: DimseSource, target: Target, folder: Path, expected_count: int | None = None
) -> tuple[dict[str, Stored], dict[tuple[str, str], str]]:
    """Fetch a study (or one instance) into ``folder``; return received and failed ones.

    Failed instances are keyed ``(series UID, SOP UID)`` and carry their message. When
    every retrieval succeeded and at least ``expected_count`` instances (the watermark's
    count) arrived, no C-FIND of the instances is needed; otherwise an IMAGE-level C-FIND
    tells which instances are missing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sink = Sink(folder, target.study_uid)
    outcomes: list[Outcome] = []
    expected: dict[str, str] | None = None
    notes: list[str] = []
    ok = False
    if source.retrieve != "move":
        classes, expected = sop_classes(source, target)
        if len(classes) > MAX_CONTEXTS - 1:
            notes.append(f"C-GET impossible: {len(classes)} SOP classes exceed one association")
        else:
            outcomes.append(_c_get(source, target, classes, sink))
            ok = outcomes[-1].ok
    if not ok and source.retrieve != "get":
        whole = not sink.received
        if whole:
            outcomes.append(_c_move(source, [target], sink))
            ok = outcomes[-1].ok
        # what is still missing, series by series (a study-level C-MOVE can fail as a
        # whole for one bad instance: Orthanc stops at the first failed sub-operation)
        if not ok and (not whole or target.sop_uid is None):
            if expected is None:
                expected = expected_instances(source, target)
            missing = {sop: se for sop, se in expected.items() if sop not in sink.received}
            specs = series_specs(target, missing)
            if specs:
                outcomes.append(_c_move(source, specs, sink))
    if ok and len(sink.received) >= max(expected_count or 0, 1):
        return dict(sink.received), {}
    if expected is None:
        expected = expected_instances(source, target)
    failed_listed = {u for o in outcomes for u in o.failed_uids}
    missing = {sop: se for sop, se in expected.items() if sop not in sink.received}
    for sop in failed_listed - sink.received.keys() - missing.keys():
        missing[sop] = UNKNOWN_SERIES
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


def dimse_store(source: DimseSource, files: list[Path]) -> list[StoreResult]:
    """C-STORE ``files`` over one association (see :meth:`DimseSource.store`)."""
    import pydicom

    datasets = [pydicom.dcmread(f) for f in files]
    results = []
    with open_association(source, store_contexts(datasets), purpose="C-STORE") as assoc:
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
