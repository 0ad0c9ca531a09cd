"""The FHIR R4 RESTful client of both directions: transaction, read, search (``requests``).

What pacsflow needs of a FHIR server and nothing more: ``POST [base]`` of a transaction
Bundle (``pacsflow fhir``), ``GET [base]/[type]/[id]``, and ``POST [base]/[type]/_search``
with a form body, following the Bundle's ``next`` pages (``pacsflow fhir-import --server``).

- A bearer token from the environment (the config names the variable, never the token); TLS
  verified, or by a CA bundle (which ``REQUESTS_CA_BUNDLE`` does not override).
- A timeout per request; transient failures (connection refused or reset, timeouts, 429 and
  5xx) retried with exponential backoff.
- Every failure is one line (:class:`pipeline.errors.FhirError`) naming the status or the
  network error; no resource content, no search parameter and no server diagnostics (which
  may echo identifiers) are put in it.
- Search parameters (accession numbers, Study Instance UIDs) never reach a log, at any level:
  a search is a POST with the parameters in the body, and while a request of this client
  runs, the query strings of the URLs urllib3 logs (a ``next`` link may repeat the
  parameters) are replaced by ``<query not logged>``.
- ``next`` links are followed only under the base URL: the bearer token goes nowhere else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Final
from urllib.parse import quote, urlsplit

from pipeline.errors import ConfigError, FhirError

logger = logging.getLogger(__name__)

__all__ = ["FhirClient", "is_server"]

FHIR_JSON: Final = "application/fhir+json"
_LOOPBACK: Final = {"127.0.0.1", "localhost", "::1"}
#: the settings each configuration section names the URL, token variable and TLS choice by
_SETTINGS: Final = {
    "fhir": ("fhir.dest", "fhir.token_env", "fhir.verify_tls"),
    "fhir_context": ("fhir_context.url", "fhir_context.token_env", "fhir_context.ca_bundle"),
}
_WHY: Final = {
    400: "400 Bad Request (the server found the request invalid)",
    401: "401 Unauthorized: the server refused the bearer token (check the variable {token} names)",
    403: "403 Forbidden: the token may not {verb} these resources",
    404: "404 Not Found (is the base URL the FHIR root?)",
    409: "409 Conflict (a concurrent update; rerun)",
    412: "412 Precondition Failed: a conditional reference matched no resource, or several "
    "(is the patient in the EHR under fhir.patient_identifier_system?)",
    422: "422 Unprocessable Entity (the server's profile rejected a resource)",
}

#: True while a request of a FhirClient runs (in this thread or task)
_IN_REQUEST: ContextVar[bool] = ContextVar("pacsflow_fhir_request", default=False)
_NOT_LOGGED: Final = "<query not logged>"


class _NoQueries(logging.Filter):
    """Drops the query strings from urllib3's records of a FhirClient request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _IN_REQUEST.get():
            if isinstance(record.args, tuple):
                record.args = tuple(_no_query(a) for a in record.args)
            record.msg = _no_query(record.msg)
        return True


def _no_query(value: Any) -> Any:
    if isinstance(value, str) and "?" in value:
        return f"{value.partition('?')[0]}?{_NOT_LOGGED}"
    return value


_FILTER: Final = _NoQueries()
for _name in ("urllib3.connectionpool", "urllib3.util.retry"):
    logging.getLogger(_name).addFilter(_FILTER)


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
    page_size:
        ``_count`` of each search; None: the server's default.
    section:
        The configuration section the client serves (``fhir`` or ``fhir_context``): errors
        name its settings.

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
        page_size: int | None = None,
        section: str = "fhir",
    ) -> None:
        import requests

        self._url_setting, self._token_setting, self._tls_setting = _SETTINGS[section]
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{self._url_setting}: not a FHIR base URL: {base_url!r}")
        if parts.username or parts.password:
            raise ConfigError(
                f"{self._url_setting}: no credentials in the URL; use {self._token_setting}"
            )
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            raise ConfigError(
                f"{self._url_setting}: {parts.hostname} over plain http; use https (http only "
                "on loopback)"
            )
        self.base = base_url.rstrip("/")
        self.timeout = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.page_size = page_size
        self.verify = verify
        self._session = requests.Session()
        self._session.headers.update({"Accept": FHIR_JSON})
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    @classmethod
    def from_env(
        cls,
        base_url: str,
        *,
        token_env: str | None,
        section: str = "fhir",
        environ: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> FhirClient:
        """A client whose bearer token is read from the variable ``token_env`` (None: no
        token).

        Raises
        ------
        ConfigError
            ``token_env`` names a variable that is not set, or a bad ``base_url``.
        """
        from pipeline.config.env import secret

        token = secret(token_env, environ)
        if token_env and token is None:
            raise ConfigError(
                f"{_SETTINGS[section][1]} names {token_env}, but {token_env} is not set: "
                "export the bearer token in it"
            )
        return cls(base_url, token=token, section=section, **kw)

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kw: Any) -> Any:
        """One request with retries; the response of a status < 400, or of 404/410 to a
        GET."""
        mark = _IN_REQUEST.set(True)
        try:
            return self._retrying(method, url, **kw)
        finally:
            _IN_REQUEST.reset(mark)

    def _retrying(self, method: str, url: str, **kw: Any) -> Any:
        import requests

        delay = self.backoff_s
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._session.request(
                    method, url, timeout=self.timeout, verify=self.verify, **kw
                )
            except requests.exceptions.SSLError:
                raise FhirError(
                    f"TLS to {self.base} failed: the server's certificate is not trusted "
                    f"({self._tls_setting}: a CA bundle file)"
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
                if resp.status_code < 400 or (resp.status_code in (404, 410) and method == "GET"):
                    return resp
                transient = resp.status_code == 429 or resp.status_code >= 500
                why = _WHY.get(resp.status_code, f"HTTP {resp.status_code}").format(
                    token=self._token_setting,
                    verb="write" if self._url_setting == "fhir.dest" else "read",
                )
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

    def _json(self, resp: Any, what: str) -> dict[str, Any]:
        """The JSON object of ``resp``; a one-line FhirError when it is none."""
        try:
            body = resp.json()
        except ValueError:
            raise FhirError(f"{self.base} answered {what} with no JSON") from None
        if not isinstance(body, dict):
            raise FhirError(f"{self.base} answered {what} with no resource")
        return body

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
        answer = self._json(resp, "the transaction")
        if answer.get("resourceType") != "Bundle":
            raise FhirError(f"{self.base} answered the transaction with no Bundle")
        return answer

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The resource ``resource_type/resource_id``, or None when the server has none
        (404, 410).

        Raises
        ------
        FhirError
            The server refused the read or could not be reached.
        """
        rid = quote(resource_id, safe="")
        resp = self._request("GET", f"{self.base}/{resource_type}/{rid}")
        if resp.status_code in (404, 410):
            return None
        got = self._json(resp, f"a {resource_type} read")
        return got if got.get("resourceType") == resource_type else None

    def search(self, resource_type: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """Every resource of ``resource_type`` matching ``params`` (search parameters, e.g.
        ``{"identifier": "urn:dicom:uid|urn:oid:1.2.3"}`` or ``{"subject": "Patient/x"}``),
        all pages followed; included resources and OperationOutcomes left out.

        The first page is ``POST [base]/[type]/_search`` with the parameters as a form body
        (so no URL holds them); further pages are the ``next`` links the server sends, each
        followed only while it stays under the base URL.

        Raises
        ------
        FhirError
            The server refused the search, could not be reached, or sent a ``next`` link
            outside its base URL.
        """
        what = f"a {resource_type} search"
        form = dict(params)
        if self.page_size is not None:
            form["_count"] = str(self.page_size)
        out: list[dict[str, Any]] = []
        resp = self._request(
            "POST",
            f"{self.base}/{resource_type}/_search",
            data=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        while True:
            page = self._json(resp, what)
            for entry in page.get("entry") or ():
                if not isinstance(entry, dict):
                    continue
                resource = entry.get("resource")
                mode = (entry.get("search") or {}).get("mode", "match")
                if (
                    isinstance(resource, dict)
                    and resource.get("resourceType") == resource_type
                    and mode == "match"
                ):
                    out.append(resource)
            url = self._next(page)
            if url is None:
                return out
            resp = self._request("GET", url)
            if resp.status_code in (404, 410):
                raise FhirError(f"{self.base} lost the next page of {what} ({resp.status_code})")

    def _next(self, page: dict[str, Any]) -> str | None:
        """The ``next`` link of a search page under the base URL, None on the last page."""
        for link in page.get("link") or ():
            if isinstance(link, dict) and link.get("relation") == "next":
                target = str(link.get("url") or "")
                if target.startswith((self.base + "/", self.base + "?")):
                    return target
                raise FhirError(f"{self.base} sent a next page outside its base URL: not followed")
        return None


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
