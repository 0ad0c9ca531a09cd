"""Associations with the PACS: the cap on concurrent associations, opening and closing.

Gentleness: at most ``source.dimse.max_associations`` associations at once, across all Dask
workers (a ``distributed.Semaphore`` named after the PACS) or within the process (no Dask).
Each association is opened under one lease, released on success and aborted on any error.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pipeline.connectors.dimse.presentation import FIND, UNCOMPRESSED
from pipeline.connectors.dimse.tls import client_ssl_context
from pipeline.errors import SourceError

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.events import Event

    from pipeline.connectors.dimse.source import DimseSource

logger = logging.getLogger(__name__)

__all__ = ["find_association", "lease", "no_delay", "open_association", "set_timeouts"]

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
def lease(name: str, max_leases: int) -> Iterator[None]:
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


def no_delay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: turn Nagle's algorithm off (else ~40 ms per DIMSE round trip)."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_timeouts(ae: AE, timeout_s: float) -> None:
    """Give every timeout of ``ae`` (ACSE, DIMSE, network, connection) the same value."""
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s


def _why_not(assoc: Association) -> str:
    """Why an association was not established, in words."""
    if assoc.is_rejected:
        return "the association was rejected"
    if assoc.is_aborted:
        return "the association was aborted"
    return "no connection (refused, unreachable or timed out)"


def _cannot_associate(source: DimseSource, why: str) -> SourceError:
    return SourceError(
        f"cannot associate with {source.peer}: {why}. Check the host and port, and that the "
        f"PACS lists our calling AE title {source.calling_aet!r} (and accepts called AE title "
        f"{source.called_aet!r})"
    )


@contextlib.contextmanager
def open_association(
    source: DimseSource,
    contexts: Iterable[tuple[str, list[str]]],
    *,
    purpose: str,
    ext_neg: list[Any] | None = None,
    handlers: list[tuple[Any, Callable[..., Any]]] | None = None,
) -> Iterator[Association]:
    """Open one association with ``source``'s PACS under the cap, yield it, release it (abort
    on errors).

    Raises
    ------
    SourceError
        When the association is not established.
    """
    from pynetdicom import AE, evt

    ae = AE(ae_title=source.calling_aet)
    set_timeouts(ae, source.timeout_s)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    tls_args = None
    if source.tls is not None:
        ctx = client_ssl_context(source.tls.ca, source.tls.cert, source.tls.key)
        tls_args = (ctx, source.host)
    waited = time.monotonic()
    with lease(f"pacsflow-dimse-{source.host}:{source.port}", source.max_associations):
        waited = time.monotonic() - waited
        try:
            assoc = ae.associate(
                source.host,
                source.port,
                ae_title=source.called_aet,
                ext_neg=ext_neg,
                tls_args=tls_args,
                evt_handlers=[(evt.EVT_CONN_OPEN, no_delay), *(handlers or [])],
            )
        except (OSError, ssl.SSLError) as exc:
            raise _cannot_associate(source, str(exc)) from exc
        if not assoc.is_established:
            raise _cannot_associate(source, _why_not(assoc))
        logger.debug(
            "association to %s opened for %s (waited %.3f s for a lease)",
            source.peer,
            purpose,
            waited,
        )
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            logger.debug("association to %s aborted", source.peer)
            raise
        else:
            assoc.release()
            logger.debug("association to %s released", source.peer)
        finally:
            ae.shutdown()


@contextlib.contextmanager
def find_association(source: DimseSource, purpose: str) -> Iterator[Association]:
    """An association proposing only Study Root C-FIND (see :func:`open_association`)."""
    with open_association(source, [(FIND, UNCOMPRESSED)], purpose=purpose) as assoc:
        yield assoc
