"""A PACS over DICOMweb: QIDO-RS to enumerate, WADO-RS metadata for headers, WADO-RS to fetch.

The crawl never downloads pixel data: a study's headers come from one WADO-RS *metadata*
request per series (bulk data such as Pixel Data only as references). A study is a crawl unit;
its watermark is the number of series and instances QIDO-RS reports for it, so an unchanged
study is skipped without a request beyond the paged study query.

Credentials are never in the URI: the config names environment variables holding a user and
password (HTTP basic) or a bearer token, read where the request is made (on Dask workers too,
so set them there). A CA bundle (PEM) verifies HTTPS.

Two timeouts: ``connect_timeout_s`` for the TCP (and TLS) connection, ``timeout_s`` for each
answer. :meth:`DicomwebSource.check` probes the server once, without retries, before a crawl:
a refused, unroutable or silent server, or refused credentials, fail within those timeouts
with a one-line reason (the requests of the crawl itself are retried, as dicomweb-client
does, against transient failures).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

from pipeline.config.env import secret
from pipeline.connectors.base import RawObject, StoreResult, Unit
from pipeline.enums import QuarantineReason, SourceKind
from pipeline.errors import ConfigError, InputError, SourceError

if TYPE_CHECKING:
    from pipeline.config import SourceConfig

logger = logging.getLogger(__name__)

__all__ = ["DicomwebSource"]

_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_SOP_UID = "00080018"
_N_SERIES = "00201206"
_N_INSTANCES = "00201208"


def _first(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


@dataclass(frozen=True)
class DicomwebSource:
    """A DICOMweb archive at ``base_url`` (``http(s)://host:port/root``).

    Holds no connection and no secret: each call builds a session from the environment
    variables the config names.
    """

    base_url: str
    username_env: str | None = None
    password_env: str | None = None
    token_env: str | None = None
    ca_bundle: str | None = None
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    page_size: int = 500
    study_filters: dict[str, str] = field(default_factory=dict)
    retries: bool = True

    @property
    def kind(self) -> SourceKind:
        """Always :attr:`SourceKind.DICOMWEB`."""
        return SourceKind.DICOMWEB

    @property
    def source_id(self) -> str:
        """``dicomweb+<base_url>`` (never with credentials)."""
        return f"dicomweb+{self.base_url}"

    @classmethod
    def from_uri(cls, uri: str, cfg: SourceConfig) -> DicomwebSource:
        """Build from ``dicomweb+http(s)://host:port/root`` and the ``source`` config.

        Raises
        ------
        ConfigError
            For a URI that is not of that form or carries credentials.
        """
        if not uri.lower().startswith(("dicomweb+http://", "dicomweb+https://")):
            raise ConfigError(f"not a DICOMweb URI: {uri!r} (dicomweb+http(s)://host:port/root)")
        url = uri[len("dicomweb+") :].rstrip("/")
        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigError(f"no host in the DICOMweb URI {uri!r}")
        if parts.username or parts.password:
            raise ConfigError(
                "credentials in the source URI are refused: name environment variables in "
                "source.auth (username_env/password_env or token_env)"
            )
        return cls(
            base_url=url,
            username_env=cfg.auth.username_env,
            password_env=cfg.auth.password_env,
            token_env=cfg.auth.token_env,
            ca_bundle=str(cfg.ca_bundle) if cfg.ca_bundle else None,
            timeout_s=cfg.timeout_s,
            connect_timeout_s=cfg.connect_timeout_s,
            page_size=cfg.page_size,
            study_filters=dict(cfg.study_filters),
        )

    # ---------------------------------------------------------------------------- client

    @property
    def timeouts(self) -> tuple[float, float]:
        """``(connect, read)`` seconds, as requests takes them."""
        return min(self.connect_timeout_s, self.timeout_s), self.timeout_s

    @property
    def _where(self) -> str:
        parts = urlsplit(self.base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.hostname}:{port}"

    def _session(self) -> Any:
        """A requests session with the configured credentials and CA bundle."""
        import requests

        session = requests.Session()
        token = secret(self.token_env)
        user, password = secret(self.username_env), secret(self.password_env)
        if self.token_env and not token:
            raise SourceError(f"the bearer token variable {self.token_env} is not set")
        if self.username_env and not (user and password):
            raise SourceError(
                f"the credentials variables {self.username_env}/{self.password_env} are not set"
            )
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        elif user and password:
            session.auth = (user, password)
        if self.ca_bundle:
            # REQUESTS_CA_BUNDLE in the environment would override session.verify otherwise
            session.trust_env = False
            session.verify = self.ca_bundle
        return session

    def _client(self) -> Any:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(self.base_url, session=self._session(), timeout=self.timeouts)
        if not self.retries:
            client.set_http_retry_params(retry=False)
        return client

    def _call(self, what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one request; network and HTTP failures become :class:`SourceError`."""
        import requests

        try:
            return func(*args, **kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            raise SourceError(self._http_error(what, status)) from None
        except requests.RequestException as exc:
            raise SourceError(self._network_error(what, exc)) from None

    def _http_error(self, what: str, status: int | None) -> str:
        if status in (401, 403):
            return f"{self.base_url} refused {what} (HTTP {status}): check source.auth"
        if status == 404:
            return (
                f"{self.base_url}: {what} failed (HTTP 404): no DICOMweb service at this path "
                "(check the root in the source URI)"
            )
        return f"{self.base_url}: {what} failed (HTTP {status or '?'})"

    def _network_error(self, what: str, exc: BaseException) -> str:
        """One line on why ``exc`` (a requests exception) happened, in the operator's terms."""
        import requests

        connect, read = self.timeouts
        text = str(exc)
        if isinstance(exc, requests.ConnectTimeout):
            why = (
                f"no connection to {self._where} within {connect:g} s "
                "(source.connect_timeout_s): the host is down or unroutable, or a firewall "
                "drops the packets"
            )
        elif isinstance(exc, requests.ReadTimeout):
            why = (
                f"{self._where} accepted the connection but sent no answer within {read:g} s "
                "(source.timeout_s)"
            )
        elif isinstance(exc, requests.exceptions.SSLError):
            why = f"the TLS handshake with {self._where} failed (check source.ca_bundle)"
        elif "refused" in text.lower():
            why = f"connection refused by {self._where}: nothing listens there (PACS down? port?)"
        elif "resolution" in text.lower() or "not known" in text.lower():
            why = f"the host name of {self._where} does not resolve"
        else:
            why = f"{self._where} cannot be reached ({type(exc).__name__})"
        return f"cannot reach {self.base_url} for {what}: {why}"

    # ---------------------------------------------------------------------------- Source

    def check(self) -> None:
        """Probe the server once: one QIDO-RS request for a single study, no retries, within
        the connect and read timeouts; :class:`SourceError` with the reason when it fails
        (refused, unroutable, silent, TLS, credentials, not a DICOMweb path)."""
        import requests

        connect, read = self.timeouts
        logger.info(
            "checking %s (connect timeout %g s, answer timeout %g s)",
            self.source_id,
            connect,
            read,
        )
        t0 = time.monotonic()
        session = self._session()
        try:
            response = session.get(
                f"{self.base_url}/studies",
                params={"limit": "1"},
                headers={"Accept": "application/dicom+json"},
                timeout=self.timeouts,
            )
        except requests.RequestException as exc:
            raise SourceError(self._network_error("a study query", exc)) from None
        finally:
            session.close()
        if response.status_code >= 400:
            raise SourceError(self._http_error("a study query", response.status_code))
        logger.info("%s answered in %.1f s", self.source_id, time.monotonic() - t0)

    def list_units(self) -> Iterator[Unit]:
        """Page through QIDO-RS studies; one unit per study, watermarked by its counts."""
        client = self._client()
        offset = 0
        last_log = time.monotonic()
        while True:
            page = self._call(
                "a study query",
                client.search_for_studies,
                limit=self.page_size,
                offset=offset,
                fields=["NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"],
                search_filters=dict(self.study_filters) or None,
            )
            for item in page:
                uid = _first(item, _STUDY_UID)
                if not uid:
                    continue
                n_series, n_inst = _first(item, _N_SERIES), _first(item, _N_INSTANCES)
                yield Unit(f"studies/{uid}", f"{n_series}:{n_inst}")
            if len(page) < self.page_size:
                return
            offset += len(page)
            if time.monotonic() - last_log >= 5:  # progress while a large PACS is listed
                logger.info("listing %s: %d studies so far", self.source_id, offset)
                last_log = time.monotonic()

    def read_unit(self, unit: Unit) -> Iterator[RawObject]:
        """Each series' WADO-RS metadata, one raw object (a header dataset) per instance."""
        from pydicom import Dataset

        study = unit.key.split("/", 1)[1]
        client = self._client()
        series_list = self._call(
            "a series query", client.search_for_series, study_instance_uid=study
        )
        for series_item in series_list:
            series = _first(series_item, _SERIES_UID)
            if not series:
                continue
            metadata = self._call("series metadata", client.retrieve_series_metadata, study, series)
            for item in metadata:
                sop = _first(item, _SOP_UID) or "unknown"
                location = f"studies/{study}/series/{series}/instances/{sop}"
                try:
                    ds = Dataset.from_json(item, bulk_data_uri_handler=lambda *_a: b"")
                except Exception as exc:
                    yield RawObject(
                        location,
                        unit.key,
                        error=InputError(
                            f"metadata cannot be parsed ({type(exc).__name__})",
                            reason=QuarantineReason.UNREADABLE,
                        ),
                    )
                    continue
                yield RawObject(location, unit.key, dataset=ds)

    def open(self, location: str) -> BinaryIO:
        """Fetch one instance by WADO-RS, in its stored transfer syntax, as a Part 10 stream."""
        parts = location.split("/")
        if len(parts) != 6 or parts[0] != "studies":
            raise SourceError(f"not a DICOMweb instance location: {location}")
        client = self._client()
        ds = self._call("an instance", client.retrieve_instance, parts[1], parts[3], parts[5])
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        buf.seek(0)
        return buf

    # ---------------------------------------------------------------- as a write-back destination

    def store(self, files: list[Path]) -> list[StoreResult]:
        """STOW-RS, one request per study (``POST /studies/{uid}``); the response's Referenced
        and Failed SOP Sequences say what was stored (a Warning Reason still counts as stored).

        Raises:
            SourceError: the request failed as a whole (``transient`` in the message when it is
                worth retrying: connection errors and HTTP 5xx/429).
        """
        import pydicom
        import requests

        datasets = [pydicom.dcmread(f) for f in files]
        by_study: dict[str, list[Any]] = {}
        for ds in datasets:
            by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
        client = self._client()
        answers: dict[str, StoreResult] = {}
        for study_uid, group in by_study.items():
            try:
                response = client.store_instances(group, study_instance_uid=study_uid)
            except requests.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                transient = code >= 500 or code == 429
                for ds in group:
                    uid = str(ds.SOPInstanceUID)
                    answers[uid] = StoreResult(uid, False, f"HTTP {code}", transient)
                continue
            except requests.RequestException as exc:
                raise SourceError(
                    f"cannot reach {self.base_url} to store (transient: {type(exc).__name__})"
                ) from None
            for item in response.get("ReferencedSOPSequence", []) or []:
                uid = str(item.ReferencedSOPInstanceUID)
                warning = item.get("WarningReason")
                status = f"stored (warning 0x{int(warning):04X})" if warning else "stored"
                answers[uid] = StoreResult(uid, True, status)
            for item in response.get("FailedSOPSequence", []) or []:
                uid = str(item.ReferencedSOPInstanceUID)
                reason = item.get("FailureReason")
                answers[uid] = StoreResult(
                    uid, False, f"failed 0x{int(reason):04X}" if reason else "failed"
                )
        return [
            answers.get(str(ds.SOPInstanceUID))
            or StoreResult(str(ds.SOPInstanceUID), False, "not in the STOW-RS response", True)
            for ds in datasets
        ]

    def confirm(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """QIDO-RS for the instance in its study and series."""
        client = self._client()
        found = self._call(
            "an instance query",
            client.search_for_instances,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            search_filters={"SOPInstanceUID": sop_uid},
        )
        return any(_first(item, "00080018") == sop_uid for item in found or [])
