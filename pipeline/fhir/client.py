"""A small FHIR R4 RESTful client: transaction, read, search (``requests``).

What pacsflow needs of a FHIR server and nothing more: ``POST [base]`` of a transaction
Bundle, ``GET [base]/[type]/[id]`` and ``GET [base]/[type]?params`` (following ``next`` pages).
A bearer token from the environment (the config names the variable, never the token), TLS
verified (or a CA bundle), a timeout per request, retries of transient failures (connection
refused or reset, timeouts, 429 and 5xx) with exponential backoff. Every failure is one line
(:class:`pipeline.errors.FhirError`) naming the status or the network error; no resource
content and no server diagnostics (which may echo identifiers) are put in it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from pipeline.errors import ConfigError, FhirError

logger = logging.getLogger(__name__)

__all__ = ["FhirClient", "is_server"]

FHIR_JSON: Final = "application/fhir+json"
_LOOPBACK: Final = {"127.0.0.1", "localhost", "::1"}
_WHY: Final = {
    400: "400 Bad Request (the server found the Bundle invalid)",
    401: "401 Unauthorized: the server refused the bearer token (check the variable "
    "fhir.token_env names)",
    403: "403 Forbidden: the token may not write these resources",
    404: "404 Not Found (is the base URL the FHIR root?)",
    409: "409 Conflict (a concurrent update; rerun)",
    412: "412 Precondition Failed: a conditional reference matched no resource, or several "
    "(is the patient in the EHR under fhir.patient_identifier_system?)",
    422: "422 Unprocessable Entity (the server's profile rejected a resource)",
}


def is_server(dest: str) -> bool:
    """True when ``dest`` is a FHIR server's base URL (http or https), False for a folder."""
    return dest.startswith(("https://", "http://"))


class FhirClient:
    """A FHIR server at ``base_url``.

    Parameters
    ----------
    base_url:
        The FHIR root, e.g. ``https://ehr.example.org/fhir``; ``http://`` only on loopback.
    token:
        The bearer token, or None for no ``Authorization`` header.
    verify:
        TLS verification: True, False, or a CA bundle path.
    timeout_s, retries, backoff_s, backoff_max_s:
        Per request; transient failures are retried ``retries`` times, the delay doubling
        from ``backoff_s`` up to ``backoff_max_s``.

    Raises
    ------
    ConfigError
        A URL that is neither https nor http on loopback, or that carries credentials.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        verify: bool | str = True,
        timeout_s: float = 30.0,
        retries: int = 4,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        import requests

        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"fhir.dest: not a FHIR base URL: {base_url!r}")
        if parts.username or parts.password:
            raise ConfigError("fhir.dest: no credentials in the URL; use fhir.token_env")
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            raise ConfigError(
                f"fhir.dest: {parts.hostname} over plain http; use https (http only on loopback)"
            )
        self.base = base_url.rstrip("/")
        self.timeout = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._session = requests.Session()
        self._session.verify = verify
        self._session.headers.update({"Accept": FHIR_JSON})
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kw: Any) -> Any:
        """One request with retries; the response of a status < 400, or of 404 for a GET."""
        import requests

        delay = self.backoff_s
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._session.request(method, url, timeout=self.timeout, **kw)
            except requests.exceptions.SSLError:
                raise FhirError(
                    f"TLS to {self.base} failed: the server's certificate is not trusted "
                    "(fhir.verify_tls: a CA bundle file)"
                ) from None
            except requests.exceptions.ConnectTimeout:
                error = FhirError(
                    f"no connection to {self.base} within {self.timeout:g} s", transient=True
                )
            except requests.exceptions.Timeout:
                error = FhirError(
                    f"no answer from {self.base} within {self.timeout:g} s", transient=True
                )
            except requests.exceptions.ConnectionError as exc:
                refused = "refused" in str(exc).lower()
                why = "connection refused" if refused else "connection failed"
                error = FhirError(f"cannot reach {self.base} ({why})", transient=True)
            else:
                if resp.status_code < 400 or (resp.status_code == 404 and method == "GET"):
                    return resp
                transient = resp.status_code == 429 or resp.status_code >= 500
                why = _WHY.get(resp.status_code, f"HTTP {resp.status_code}")
                error = FhirError(
                    f"{self.base} answered {why}{_issue_codes(resp)}",
                    transient=transient,
                    status=resp.status_code,
                )
            if not error.transient or attempt > self.retries:
                raise error
            logger.warning("%s; retry %d of %d in %.1f s", error, attempt, self.retries, delay)
            time.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)

    def transaction(self, bundle: str | Mapping[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle (JSON text or a mapping); the server's response Bundle.

        Raises
        ------
        FhirError
            The server refused the transaction, or could not be reached after the retries.
        """
        body = bundle if isinstance(bundle, str) else json.dumps(bundle)
        resp = self._request(
            "POST",
            self.base,
            data=body.encode("utf-8"),
            headers={"Content-Type": f"{FHIR_JSON}; charset=utf-8"},
        )
        answer = resp.json()
        if answer.get("resourceType") != "Bundle":
            raise FhirError(f"{self.base} answered the transaction with no Bundle")
        return dict(answer)

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The resource ``resource_type/resource_id``, or None when the server has none."""
        resp = self._request("GET", f"{self.base}/{resource_type}/{resource_id}")
        if resp.status_code == 404:
            return None
        return dict(resp.json())

    def search(self, resource_type: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """Every resource of ``resource_type`` matching ``params`` (search parameters, e.g.
        ``{"identifier": "urn:dicom:uid|urn:oid:1.2.3"}`` or ``{"subject": "Patient/x"}``),
        all pages followed.

        Raises
        ------
        FhirError
            The server refused the search or could not be reached.
        """
        out: list[dict[str, Any]] = []
        url: str | None = f"{self.base}/{resource_type}"
        query: Mapping[str, str] | None = params
        while url is not None:
            resp = self._request("GET", url, params=query)
            if resp.status_code == 404:
                raise FhirError(f"{self.base} has no {resource_type} endpoint (404)")
            page = resp.json()
            for entry in page.get("entry") or ():
                resource = entry.get("resource")
                if resource and entry.get("search", {}).get("mode", "match") == "match":
                    out.append(dict(resource))
            url = next(
                (link["url"] for link in page.get("link") or () if link.get("relation") == "next"),
                None,
            )
            query = None  # the next link carries the query
        return out


def _issue_codes(resp: Any) -> str:
    """`` (issues: invalid, not-found)`` from an OperationOutcome: the codes only."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    codes = sorted({str(i.get("code")) for i in body.get("issue") or () if i.get("code")})
    return f" (issues: {', '.join(codes)})" if codes else ""
