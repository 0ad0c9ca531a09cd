"""Orders and reports searched on a FHIR server (issue #25, read side): ``pacsflow fhir-import
--server``.

The server is a small loopback FHIR R4 search server started here (no complete FHIR server
installs from the registries these machines reach): it holds the valid resources of the
synthetic export and answers exactly what pacsflow asks, ``GET [base]/[type]?identifier=``,
``?based-on=`` (with ``_count`` paging and next links) and ``GET [base]/[type]/[id]``, behind a
bearer token. The rows it yields are those the export folder yields for the same resources.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from fhir_context_factory import PHI, invoke, lake_paths, make_export, make_lake
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.lake import read_table

pytestmark = pytest.mark.integration

TOKEN = "test-bearer-token"


class _Search(BaseHTTPRequestHandler):
    resources: ClassVar[list[dict[str, Any]]] = []
    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._send(401, {"resourceType": "OperationOutcome"})
            return
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p][1:]  # under /fhir
        if len(parts) == 2:
            found = [r for r in self.resources if [r["resourceType"], r["id"]] == parts]
            if found:
                self._send(200, found[0])
            else:
                self._send(404, {"resourceType": "OperationOutcome"})
            return
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        hits = [r for r in self.resources if r["resourceType"] == parts[0] and _match(r, query)]
        count, offset = int(query.get("_count", "50")), int(query.get("_offset", "0"))
        page = hits[offset : offset + count]
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(hits),
            "entry": [{"resource": r, "search": {"mode": "match"}} for r in page],
            "link": [],
        }
        if offset + count < len(hits):
            base = f"http://{self.headers['Host']}{url.path}"
            nxt = urlencode({**query, "_offset": str(offset + count)})
            bundle["link"].append({"relation": "next", "url": f"{base}?{nxt}"})
        self._send(200, bundle)


def _match(resource: dict[str, Any], query: dict[str, str]) -> bool:
    if "identifier" in query:
        system, _, value = query["identifier"].rpartition("|")
        if not any(
            i.get("value") == value and (not system or i.get("system") == system)
            for i in resource.get("identifier") or []
        ):
            return False
    if "based-on" in query:
        refs = [r.get("reference") for r in resource.get("basedOn") or []]
        if query["based-on"] not in refs:
            return False
    return True


@pytest.fixture
def fhir_server(tmp_path: Path) -> Iterator[tuple[str, type[_Search]]]:
    export = make_export(tmp_path / "served")
    resources = []
    for f in sorted(export.glob("*.ndjson")):
        for line in f.read_text().splitlines():
            try:
                resources.append(json.loads(line))
            except ValueError:
                continue  # the export's bad lines: a server stores valid resources only
    # an addendum to sr-1's report, so that the based-on search has two pages
    addendum = {
        "resourceType": "DiagnosticReport",
        "id": "dr-3",
        "status": "final",
        "basedOn": [{"reference": "ServiceRequest/sr-1"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2"}]},
    }
    resources.append(addendum)
    handler = type("Search", (_Search,), {"resources": resources, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _rows(lake: Path, table: str) -> list[dict[str, Any]]:
    rows = read_table(lake_paths(lake), table).to_pylist()
    for row in rows:
        del row["run_id"], row["imported_at"]
    return sorted(rows, key=lambda r: str(r["StudyInstanceUID"]))


def test_search_import_matches_the_export_import(
    tmp_path: Path, fhir_server: tuple[str, type[_Search]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, handler = fhir_server
    monkeypatch.setenv("PACSFLOW__FHIR_CONTEXT__TOKEN_ENV", "TEST_FHIR_TOKEN")
    monkeypatch.setenv("PACSFLOW__FHIR_CONTEXT__PAGE_SIZE", "1")  # every search pages
    lake = make_lake(tmp_path / "a")

    # no token: a one-line refusal naming the setting, no query, no identifier
    refused = CliRunner().invoke(app, ["fhir-import", "--server", url, "--lake", str(lake)])
    assert refused.exit_code == 2, refused.output
    assert "TEST_FHIR_TOKEN is not set" in refused.output
    monkeypatch.setenv("TEST_FHIR_TOKEN", "wrong")
    refused = CliRunner().invoke(app, ["fhir-import", "--server", url, "--lake", str(lake)])
    assert refused.exit_code == 1, refused.output
    assert "refused a ServiceRequest search (401)" in refused.output
    for needle in PHI:
        assert needle not in refused.output, needle

    monkeypatch.setenv("TEST_FHIR_TOKEN", TOKEN)
    out = invoke("fhir-import", "--server", url, "--lake", str(lake))
    # sr-1 by accession, dr-1 and dr-3 based-on sr-1, sr-2 read through the ImagingStudy
    # found by Study Instance UID; dr-2 names only its ImagingStudy, which R4 cannot search
    # DiagnosticReports by: an export brings it, a search does not
    assert "orders +2, reports +2" in out
    assert "quarantined 0" in out
    assert any("_offset=" in r for r in handler.requests)  # next links followed
    again = invoke("fhir-import", "--server", url, "--lake", str(lake))
    assert "orders +0, reports +0, superseded 0" in again

    # the same rows as the export of the same resources gives
    other = make_lake(tmp_path / "b")
    invoke("fhir-import", str(make_export(tmp_path / "export")), "--lake", str(other))
    assert _rows(lake, "orders") == _rows(other, "orders")
    searched = _rows(lake, "reports")
    exported = [r for r in _rows(other, "reports") if r["order_key"] is not None]
    assert len(exported) == 1
    assert exported[0] in searched
