"""Orders and reports searched on a FHIR server: ``pacsflow fhir-import --server``.

The server is the loopback FHIR test server of the export tests (tests/fhir_server.py, a real
HTTP server in a subprocess), seeded with the valid resources of the synthetic export as the
EHR holds them, behind a bearer token. pacsflow searches it by ``POST [type]/_search``
(``identifier``, ``_id``, ``based-on``) and follows ``_count`` pages by their ``next`` links.
The rows it yields are those the export folder yields for the same resources; no search
parameter reaches a log, even at DEBUG.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir_context_factory import (
    ACC_1,
    ACC_2,
    PHI,
    STUDY_1,
    STUDY_2,
    invoke,
    lake_paths,
    make_export,
    make_lake,
)
from fhir_server import FhirTestServer, seed
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.fhir.client import FhirClient
from pipeline.fhir.search import study_resources
from pipeline.lake import read_table

pytestmark = pytest.mark.integration

TOKEN = "test-bearer-token"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FhirTestServer]:
    export = make_export(tmp_path / "served")
    resources: list[dict[str, Any]] = []
    for f in sorted(export.glob("*.ndjson")):
        for line in f.read_text().splitlines():
            try:
                resources.append(json.loads(line))
            except ValueError:
                continue  # the export's bad lines: a server holds valid resources only
    # an addendum to sr-1's report, so that the based-on search has two pages
    resources.append(
        {
            "resourceType": "DiagnosticReport",
            "id": "dr-3",
            "status": "final",
            "basedOn": [{"reference": "ServiceRequest/sr-1"}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2"}]},
        }
    )
    srv = FhirTestServer(tmp_path / "fhir-data", token=TOKEN)
    assert seed(srv.data, resources) >= 7
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _rows(lake: Path, table: str) -> list[dict[str, Any]]:
    rows = read_table(lake_paths(lake), table).to_pylist()
    for row in rows:
        del row["run_id"], row["imported_at"]
    return sorted(rows, key=lambda r: str(r["StudyInstanceUID"]))


def test_search_import_matches_the_export_import(
    tmp_path: Path, server: FhirTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.url
    monkeypatch.setenv("PACSFLOW__FHIR_CONTEXT__TOKEN_ENV", "TEST_FHIR_TOKEN")
    monkeypatch.setenv("PACSFLOW__FHIR_CONTEXT__PAGE_SIZE", "1")  # every search pages
    lake = make_lake(tmp_path / "a")

    # no token: a one-line refusal naming the setting, no query, no identifier
    refused = CliRunner().invoke(app, ["fhir-import", "--server", url, "--lake", str(lake)])
    assert refused.exit_code == 2, refused.output
    assert "fhir_context.token_env names TEST_FHIR_TOKEN" in refused.output
    assert "TEST_FHIR_TOKEN is not set" in refused.output
    monkeypatch.setenv("TEST_FHIR_TOKEN", "wrong")
    refused = CliRunner().invoke(app, ["fhir-import", "--server", url, "--lake", str(lake)])
    assert refused.exit_code == 1, refused.output
    assert "401 Unauthorized" in refused.output
    assert "fhir_context.token_env" in refused.output
    assert len(refused.output.strip().splitlines()) == 1, refused.output
    for needle in PHI:
        assert needle not in refused.output, needle

    monkeypatch.setenv("TEST_FHIR_TOKEN", TOKEN)
    out = invoke("fhir-import", "--server", url, "--lake", str(lake))
    # sr-1 by accession, dr-1 and dr-3 based-on sr-1 (two pages of one), sr-2 by _id through
    # the ImagingStudy found by Study Instance UID; dr-2 names only its ImagingStudy, which
    # R4 cannot search DiagnosticReports by: an export brings it, a search does not
    assert "orders +2, reports +2" in out
    assert "quarantined 0" in out
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


def test_a_debug_log_of_a_search_holds_no_identifier(
    server: FhirTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "urllib3.connectionpool"):
        caplog.set_level(logging.DEBUG, logger=name)
    with FhirClient(server.url, token=TOKEN, page_size=1, section="fhir_context") as client:
        lines = study_resources(client, [({ACC_1}, {STUDY_1}), ({ACC_2}, {STUDY_2})])
    kinds = sorted(line.file.resource_type for line in lines)
    assert kinds.count("DiagnosticReport") == 2  # dr-1 and dr-3: the second page was read
    assert "ServiceRequest" in kinds
    assert "ImagingStudy" in kinds
    requests = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")]
    assert any("/_search" in m for m in requests), requests  # urllib3 did log at DEBUG
    assert any("<query not logged>" in m for m in requests), requests  # a next link
    for needle in PHI:
        assert needle not in caplog.text, needle
