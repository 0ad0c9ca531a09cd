"""A FHIR R4 **test server** on loopback: exactly the parts of the RESTful API pacsflow uses.

Not a FHIR server for real use. PyPI, Debian and npm ship no complete FHIR server that runs
here (HAPI FHIR and Medplum are not there; ``dfhir`` needs PostgreSQL and has no
transactions, ``fhirsnake`` serves files read-only), so the tests talk to this one:

- ``POST [base]`` of a ``transaction`` Bundle: entries ``PUT Type/id`` (update or create),
  ``PUT Type?query`` (conditional update), ``POST Type`` with ``ifNoneExist`` (conditional
  create); conditional references (``Patient?identifier=s|v``) and ``urn:uuid`` full URLs
  resolved; all or nothing (a 412 for a conditional reference that matches no resource or
  several, nothing stored);
- ``GET [base]/Type/id`` (read); search as ``GET [base]/Type?params`` or ``POST
  [base]/Type/_search`` with a form body: ``_id``, ``identifier`` as ``system|value`` or
  ``value`` (an accession number is found by its value, whatever its ``ACSN`` type), ``subject``,
  ``patient``, ``status``, ``based-on``, ``subject:identifier``/``patient:identifier`` on the
  reference's logical identifier; ``_count`` pages, each with a ``next`` link (a GET that
  repeats the parameters, as many servers' links do);
- every resource (and the Bundle) validated by ``fhir.resources`` (R4B models): 400 with an
  OperationOutcome otherwise; a bearer token checked (401); storage on disk, one JSON file per
  resource, written atomically, so a stopped and restarted server keeps its data; an update
  with unchanged content keeps its version (as HAPI does).

Run: ``python tests/fhir_server.py --port P --data DIR [--token T]``; in tests,
:class:`FhirTestServer` runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fhir.resources.R4B import get_fhir_model_class

_LOCK = threading.Lock()


class Refused(Exception):
    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status, self.code, self.text = status, code, text


def _outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


def _validate(resource: dict[str, Any]) -> None:
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except Exception as exc:  # pydantic's ValidationError, KeyError
        raise Refused(400, "invalid", f"invalid {resource.get('resourceType')}: {exc}") from None


class Store:
    """Resources as files ``DIR/<type>/<id>.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, rtype: str, rid: str) -> Path:
        if not rtype.isalnum() or not all(c.isalnum() or c in "-." for c in rid):
            raise Refused(400, "invalid", "bad type or id")
        return self.root / rtype / f"{rid}.json"

    def read(self, rtype: str, rid: str) -> dict[str, Any] | None:
        p = self.path(rtype, rid)
        return json.loads(p.read_text()) if p.is_file() else None

    def all(self, rtype: str) -> list[dict[str, Any]]:
        folder = self.root / rtype
        if not rtype.isalnum() or not folder.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]

    def write(self, resource: dict[str, Any]) -> str:
        """Store; '200 OK' (updated or unchanged) or '201 Created'."""
        p = self.path(resource["resourceType"], resource["id"])
        have = json.loads(p.read_text()) if p.is_file() else None
        body = {k: v for k, v in resource.items() if k != "meta"}
        if have is not None and {k: v for k, v in have.items() if k != "meta"} == body:
            return "200 OK"
        version = int((have or {}).get("meta", {}).get("versionId", "0")) + 1
        stored = {**body, "meta": {"versionId": str(version)}}
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(stored))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(p)
        return "201 Created" if have is None else "200 OK"


def _identifiers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    out = list(resource.get("identifier") or [])
    if resource.get("masterIdentifier"):
        out.append(resource["masterIdentifier"])
    return out


def _match_identifier(ids: list[dict[str, Any]], token: str) -> bool:
    if "|" in token:
        system, value = token.split("|", 1)
        return any(i.get("system") == system and i.get("value") == value for i in ids)
    return any(i.get("value") == token for i in ids)


def matches(resource: dict[str, Any], params: list[tuple[str, str]]) -> bool:
    for name, value in params:
        if name.startswith("_") and name != "_id":
            continue
        if name == "_id":
            ok = resource.get("id") == value
        elif name == "identifier":
            ok = _match_identifier(_identifiers(resource), value)
        elif name in ("subject", "patient"):
            ref = (resource.get("subject") or {}).get("reference", "")
            ok = ref == value or ref == f"Patient/{value}" or ref.endswith(f"/{value}")
            ok = ok and (name == "subject" or ref.startswith("Patient/"))
        elif name in ("subject:identifier", "patient:identifier"):
            ref = resource.get("subject") or {}
            ok = _match_identifier([ref.get("identifier") or {}], value)
        elif name == "status":
            ok = resource.get("status") == value
        elif name == "based-on":
            refs = [str((r or {}).get("reference")) for r in resource.get("basedOn") or []]
            ok = value in refs
        else:
            raise Refused(400, "not-supported", f"search parameter {name!r} not supported")
        if not ok:
            return False
    return True


class Server:
    def __init__(self, store: Store) -> None:
        self.store = store

    def search(self, rtype: str, query: str) -> list[dict[str, Any]]:
        params = parse_qsl(query, keep_blank_values=True)
        return [r for r in self.store.all(rtype) if matches(r, params)]

    def searchset(self, rtype: str, query: str, base: str) -> dict[str, Any]:
        """One page of a search (``_count``, ``_offset``), with a ``next`` link if more."""
        found = self.search(rtype, query)
        params = dict(parse_qsl(query, keep_blank_values=True))
        count = int(params.get("_count") or 50)
        offset = int(params.get("_offset") or 0)
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "entry": [
                {"resource": r, "search": {"mode": "match"}} for r in found[offset : offset + count]
            ],
        }
        if offset + count < len(found):
            after = urlencode({**params, "_offset": str(offset + count)})
            bundle["link"] = [{"relation": "next", "url": f"{base}/{rtype}?{after}"}]
        return bundle

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise Refused(400, "invalid", "POST [base] takes a transaction Bundle")
        _validate(bundle)
        entries = bundle.get("entry") or []
        # 1. the id of every entry (PUT id, conditional update/create matches, or new)
        planned: list[tuple[dict[str, Any], str, bool]] = []  # (resource, outcome, write)
        urls: dict[str, str] = {}
        for entry in entries:
            resource = dict(entry.get("resource") or {})
            req = entry.get("request") or {}
            method, url = req.get("method"), str(req.get("url", ""))
            rtype = resource.get("resourceType")
            if method == "PUT" and "?" not in url:
                t, _, rid = url.partition("/")
                if t != rtype or not rid or resource.get("id") not in (None, rid):
                    raise Refused(400, "invalid", f"PUT {url}: type or id differs")
                resource["id"] = rid
                planned.append((resource, "", True))
            elif method == "PUT":
                found = self.search(rtype, url.split("?", 1)[1])
                if len(found) > 1:
                    raise Refused(412, "multiple-matches", f"PUT {url}: several matches")
                resource["id"] = (
                    found[0]["id"] if found else resource.get("id") or str(uuid.uuid4())
                )
                planned.append((resource, "", True))
            elif method == "POST":
                found = self.search(rtype, req["ifNoneExist"]) if req.get("ifNoneExist") else []
                if len(found) > 1:
                    raise Refused(412, "multiple-matches", "ifNoneExist: several matches")
                if found:
                    resource = found[0]
                    planned.append((resource, "200 OK", False))
                else:
                    resource["id"] = str(uuid.uuid4())
                    planned.append((resource, "201 Created", True))
            else:
                raise Refused(400, "not-supported", f"request method {method} not supported")
            if entry.get("fullUrl"):
                urls[entry["fullUrl"]] = f"{rtype}/{resource['id']}"

        # 2. references: urn:uuid full URLs and conditional references
        def resolve(node: Any) -> Any:
            if isinstance(node, dict):
                out = {k: resolve(v) for k, v in node.items()}
                ref = out.get("reference")
                if isinstance(ref, str):
                    if ref in urls:
                        out["reference"] = urls[ref]
                    elif "?" in ref:
                        t, _, q = ref.partition("?")
                        found = self.search(t, q)
                        if len(found) != 1:
                            raise Refused(
                                412,
                                "not-found" if not found else "multiple-matches",
                                f"conditional reference to {t}: {len(found)} matches",
                            )
                        out["reference"] = f"{t}/{found[0]['id']}"
                return out
            if isinstance(node, list):
                return [resolve(v) for v in node]
            return node

        resolved = [(resolve(r), o, w) for r, o, w in planned]
        for resource, _, write in resolved:
            if write:
                _validate(resource)
        # 3. all or nothing: every check passed, now store
        answers = []
        for resource, outcome, write in resolved:
            status = self.store.write(resource) if write else outcome
            answers.append(
                {
                    "response": {
                        "status": status,
                        "location": f"{resource['resourceType']}/{resource['id']}",
                    }
                }
            )
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}


def make_handler(
    server: Server, token: str | None, die_after: int | None = None
) -> type[BaseHTTPRequestHandler]:
    """The request handler; ``die_after``: once that many transactions are answered, the
    process exits at once (as if killed) when the next one arrives, storing nothing of it."""
    answered = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if token is None or self.headers.get("Authorization") == f"Bearer {token}":
                return True
            self._send(401, _outcome("security", "bad or missing bearer token"))
            return False

        def _base(self) -> str:
            return f"http://{self.headers.get('Host')}"

        def do_GET(self) -> None:
            if not self._authorised():
                return
            parts = urlsplit(self.path)
            segs = [s for s in parts.path.split("/") if s]
            try:
                with _LOCK:
                    if len(segs) == 2:
                        got = server.store.read(segs[0], segs[1])
                        if got is None:
                            self._send(404, _outcome("not-found", "no such resource"))
                        else:
                            self._send(200, got)
                        return
                    if len(segs) == 1 and segs[0] == "metadata":
                        self._send(200, {"resourceType": "CapabilityStatement"})
                        return
                    if len(segs) == 1:
                        self._send(200, server.searchset(segs[0], parts.query, self._base()))
                        return
                self._send(404, _outcome("not-found", "unknown path"))
            except Refused as exc:
                self._send(exc.status, _outcome(exc.code, exc.text))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self._authorised():
                return
            segs = [s for s in urlsplit(self.path).path.split("/") if s]
            if len(segs) == 2 and segs[1] == "_search":
                try:
                    with _LOCK:
                        page = server.searchset(segs[0], raw.decode(), self._base())
                    self._send(200, page)
                except Refused as exc:
                    self._send(exc.status, _outcome(exc.code, exc.text))
                return
            if segs:
                self._send(404, _outcome("not-supported", "POST [base] or [base]/Type/_search"))
                return
            try:
                bundle = json.loads(raw)
                if die_after is not None and answered[0] >= die_after:
                    os._exit(0)  # gone before the next Bundle, its answers all read back
                with _LOCK:
                    self._send(200, server.transaction(bundle))
                    answered[0] += 1
            except json.JSONDecodeError:
                self._send(400, _outcome("invalid", "not JSON"))
            except Refused as exc:
                self._send(exc.status, _outcome(exc.code, exc.text))

    return Handler


def seed(data: Path, resources: Iterable[dict[str, Any]]) -> int:
    """Store ``resources`` in the data folder ``data`` as they are (their ids and ``meta``
    kept, as the EHR holds them), skipping those ``fhir.resources`` finds invalid (a server
    holds valid resources only); how many were stored. Call it while the server is stopped."""
    store = Store(data)
    n = 0
    for resource in resources:
        try:
            _validate(resource)
        except Refused:
            continue
        p = store.path(resource["resourceType"], resource["id"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(resource))
        n += 1
    return n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FhirTestServer:
    """This server in a subprocess on loopback, its data in ``data``; ``stop()`` and
    ``start()`` keep the data."""

    def __init__(self, data: Path, token: str | None = None) -> None:
        self.data, self.token, self.port = data, token, _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, die_after: int | None = None) -> None:
        """Start it; ``die_after``: it exits by itself at the transaction after that many."""
        import requests

        self.stop()  # reap an earlier process (one that exited by itself too)
        token = ["--token", self.token] if self.token else []
        if die_after is not None:
            token += ["--die-after-transactions", str(die_after)]
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--port", str(self.port), "--data", str(self.data),
             *token],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/metadata", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the FHIR test server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def count(self, rtype: str) -> int:
        folder = self.data / rtype
        return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--token", default=None)
    ap.add_argument("--die-after-transactions", type=int, default=None)
    args = ap.parse_args(argv)
    handler = make_handler(Server(Store(args.data)), args.token, args.die_after_transactions)
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    print(f"fhir test server on http://127.0.0.1:{args.port}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
