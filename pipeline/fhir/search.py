"""Search a FHIR R4 server for the orders and reports of crawled studies (issue #25, read side).

The other source of :mod:`pipeline.fhir.context` beside a Bulk Data export folder: for each
crawled study, by its original accession number and Study Instance UID (held in memory only,
sent to the EHR that issued them, never logged),

1. ``ServiceRequest?identifier=<accession>`` and ``DiagnosticReport?identifier=<accession>``;
2. ``ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>``, and a read of each ServiceRequest
   an ImagingStudy is ``basedOn`` that step 1 did not find;
3. ``DiagnosticReport?based-on=ServiceRequest/<id>`` for every ServiceRequest found.

Pages are followed through the Bundle's ``next`` link, only while it stays under the base URL
(the bearer token goes nowhere else). A bearer token comes from the environment variable the
configuration names. Failures are :class:`pipeline.errors.SourceError` with the resource type
and HTTP status, never the query. A plain ``requests`` client, enough for search and read; the
export direction's client (transactions, retries, outbox) is
``pipeline.fhir.client``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.errors import SourceError
from pipeline.fhir.ndjson import ExportFile, NdjsonLine

__all__ = ["FhirSearch", "study_resources"]

_FHIR_JSON = "application/fhir+json"
#: statuses worth another try (the server busy or restarting)
_TRANSIENT = frozenset({429, 502, 503, 504})


class FhirSearch:
    """Search and read on one FHIR server.

    Parameters
    ----------
    base_url
        The server's base, ``https://ehr.example/fhir``.
    token
        A bearer token, or None.
    ca_bundle
        A CA bundle (PEM) verifying the server, or None (the system's).
    timeout_s
        Per request.
    page_size
        ``_count`` of each search.
    retries
        Further tries of a request that failed to connect or got 429/502/503/504.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        ca_bundle: Path | None = None,
        timeout_s: float = 30.0,
        page_size: int = 100,
        retries: int = 2,
    ) -> None:
        import requests

        self.base = base_url.rstrip("/")
        self.timeout_s, self.page_size, self.retries = timeout_s, page_size, retries
        self.session = requests.Session()
        self.session.headers["Accept"] = _FHIR_JSON
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        if ca_bundle is not None:
            self.session.trust_env = False  # REQUESTS_CA_BUNDLE would win over verify
            self.session.verify = str(ca_bundle)

    def close(self) -> None:
        """Close the connections."""
        self.session.close()

    def _get(self, url: str, what: str, params: dict[str, str] | None = None) -> Any:
        import requests

        for attempt in range(self.retries + 1):
            try:
                response = self.session.get(url, params=params, timeout=self.timeout_s)
            except requests.RequestException as exc:
                if attempt < self.retries:
                    time.sleep(0.2 * 2**attempt)
                    continue
                raise SourceError(
                    f"FHIR server {self.base} unreachable ({type(exc).__name__}) during {what}"
                ) from None
            if response.status_code in _TRANSIENT and attempt < self.retries:
                time.sleep(0.2 * 2**attempt)
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, response: Any, what: str) -> dict[str, Any]:
        if response.status_code in (401, 403):
            raise SourceError(
                f"FHIR server {self.base} refused {what} ({response.status_code}): check the "
                "bearer token (fhir_context.token_env)"
            )
        if response.status_code != 200:
            raise SourceError(f"FHIR server {self.base} answered {response.status_code} to {what}")
        try:
            data = response.json()
        except ValueError:
            raise SourceError(f"FHIR server {self.base} answered {what} with no JSON") from None
        if not isinstance(data, dict):
            raise SourceError(f"FHIR server {self.base} answered {what} with no resource")
        return data

    def search(self, kind: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        """The resources of type ``kind`` that a search with ``params`` matches, page by page
        (included resources and OperationOutcomes left out)."""
        what = f"a {kind} search"
        url: str | None = f"{self.base}/{kind}"
        query: dict[str, str] | None = {**params, "_count": str(self.page_size)}
        while url is not None:
            bundle = self._json(self._get(url, what, query), what)
            for entry in bundle.get("entry") or []:
                if not isinstance(entry, dict):
                    continue
                resource = entry.get("resource")
                mode = (entry.get("search") or {}).get("mode", "match")
                if (
                    isinstance(resource, dict)
                    and resource.get("resourceType") == kind
                    and mode == "match"
                ):
                    yield resource
            url, query = self._next(bundle), None

    def _next(self, bundle: dict[str, Any]) -> str | None:
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next":
                target = str(link.get("url") or "")
                if target.startswith(self.base + "/") or target.startswith(self.base + "?"):
                    return target
                raise SourceError(
                    f"FHIR server {self.base} sent a next page outside its base URL: not followed"
                )
        return None

    def read(self, kind: str, rid: str) -> dict[str, Any] | None:
        """The resource ``kind/rid``, or None where the server has none (404, 410)."""
        what = f"a {kind} read"
        response = self._get(f"{self.base}/{kind}/{quote(rid, safe='')}", what)
        if response.status_code in (404, 410):
            return None
        data = self._json(response, what)
        return data if data.get("resourceType") == kind else None


def study_resources(
    client: FhirSearch, studies: Iterable[tuple[Iterable[str], Iterable[str]]]
) -> list[NdjsonLine]:
    """The ServiceRequests, ImagingStudies and DiagnosticReports of ``studies`` (each the
    original accession numbers and Study Instance UIDs of one study), one line each as an
    export would hold them (each version once), named ``search/<type>:<n>``."""
    found: dict[tuple[str, str, str], dict[str, Any]] = {}

    def keep(resource: dict[str, Any]) -> None:
        version = str((resource.get("meta") or {}).get("versionId") or "")
        found.setdefault((resource["resourceType"], str(resource.get("id")), version), resource)

    for accessions, uids in studies:
        orders: set[str] = set()
        based_on: set[str] = set()
        for accession in accessions:
            for resource in client.search("ServiceRequest", {"identifier": accession}):
                keep(resource)
                orders.add(str(resource.get("id")))
            for resource in client.search("DiagnosticReport", {"identifier": accession}):
                keep(resource)
        for uid in uids:
            query = {"identifier": f"urn:dicom:uid|urn:oid:{uid}"}
            for resource in client.search("ImagingStudy", query):
                keep(resource)
                for ref in resource.get("basedOn") or []:
                    target = str((ref or {}).get("reference") or "")
                    if target.startswith("ServiceRequest/"):
                        based_on.add(target.split("/")[1])
        for rid in sorted(based_on - orders):
            order = client.read("ServiceRequest", rid)
            if order is not None:
                keep(order)
                orders.add(rid)
        for rid in sorted(orders):
            query = {"based-on": f"ServiceRequest/{rid}"}
            for resource in client.search("DiagnosticReport", query):
                keep(resource)
    lines = []
    counts: dict[str, int] = {}
    for (kind, _, _), resource in found.items():
        counts[kind] = counts.get(kind, 0) + 1
        name = f"search/{kind}"
        file = ExportFile(Path(name), kind, 0, 0)
        lines.append(NdjsonLine(file, name, counts[kind], json.dumps(resource)))
    return lines
