"""The DIMSE connector: a PACS reached by C-FIND, C-GET/C-MOVE and C-STORE (pynetdicom).

See :mod:`pipeline.connectors.dimse` for the whole picture; this module holds the source
class, which validates its settings once and delegates to the layers below it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Final, Literal

from pipeline.config.models import DimseTlsConfig, SourceConfig
from pipeline.connectors.base import RawObject, StoreResult, Unit
from pipeline.connectors.dimse.association import open_association
from pipeline.connectors.dimse.cache import (
    cached_instances,
    instance_location,
    raw_object,
    sha256,
    study_folder,
    trim_cache,
    write_marker,
)
from pipeline.connectors.dimse.presentation import UNCOMPRESSED, VERIFICATION
from pipeline.connectors.dimse.query import (
    Target,
    check_filters,
    check_window,
    dimse_confirm,
    list_studies,
    local_now,
    parse_window,
)
from pipeline.connectors.dimse.retrieve import dimse_store, fetch
from pipeline.connectors.dimse.status import SUCCESS
from pipeline.connectors.dimse.tls import check_tls
from pipeline.enums import QuarantineReason, SourceKind
from pipeline.errors import ConfigError, InputError, SourceError

logger = logging.getLogger(__name__)

__all__ = ["DimseSource", "Retrieve"]

Retrieve = Literal["get", "move", "get-then-move"]

_URI: Final = re.compile(
    r"^dimse://(?P<aet>[^@/\\]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)"
    r":(?P<port>\d{1,5})/?$",
    re.IGNORECASE,
)
_LOCATION: Final = re.compile(
    r"^studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/instances/(?P<sop>[0-9.]+)$"
)
_STUDY_KEY: Final = re.compile(r"^studies/(?P<study>[0-9.]+)$")


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
    clock: Callable[[], datetime] = field(default=local_now, compare=False)

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
                parse_window(self.window)
            except ValueError as exc:
                raise ConfigError(f"dimse.window must be HH:MM-HH:MM; got {self.window!r}") from exc
        check_filters(self.study_filters)
        if self.tls is not None:
            check_tls(self.tls, move=self.retrieve != "get")

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
            clock=clock or local_now,
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
    def peer(self) -> str:
        """``AET@host:port``, the PACS as named in messages."""
        return self.source_id.removeprefix("dimse://")

    # -- public API ---------------------------------------------------------------------------

    def check(self) -> None:
        """C-ECHO the PACS.

        Raises
        ------
        SourceError
            When the PACS cannot be reached, rejects the association or does not answer.
        """
        with open_association(self, [(VERIFICATION, UNCOMPRESSED)], purpose="C-ECHO") as assoc:
            status = assoc.send_c_echo()
        if "Status" not in status or int(status.Status) != SUCCESS:
            got = f"0x{int(status.Status):04X}" if "Status" in status else "no response"
            raise SourceError(f"C-ECHO to {self.peer} failed ({got}); is it a DICOM SCP?")
        logger.info("C-ECHO to %s as %s: success", self.peer, self.calling_aet)

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
        return list_studies(self)

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
        folder = study_folder(self.cache_dir, study_uid)
        cached = cached_instances(folder, unit.watermark)
        if cached is not None:
            logger.debug("study %s complete in the cache: %d instances", folder.name, len(cached))
            yield from (raw_object(study_uid, se, sop, p, unit.key) for se, sop, p in cached)
            return
        check_window(self.window, self.clock)
        started = time.monotonic()
        instances = unit.watermark.rpartition(":")[2]
        received, errors = fetch(
            self, Target(study_uid), folder, int(instances) if instances.isdigit() else None
        )
        for sop_uid, stored in sorted(received.items()):
            yield raw_object(study_uid, stored.series_uid, sop_uid, stored.path, unit.key)
        for (series_uid, sop_uid), message in sorted(errors.items()):
            yield RawObject(
                location=instance_location(study_uid, series_uid, sop_uid),
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
            write_marker(folder, unit.watermark, received)
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
        folder = study_folder(self.cache_dir, match["study"])
        path = folder / f"{sha256(match['sop'])}.dcm"
        if not path.is_file():
            check_window(self.window, self.clock)
            target = Target(match["study"], match["series"], match["sop"])
            _, errors = fetch(self, target, folder)
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
