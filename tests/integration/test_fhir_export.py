"""FHIR export end to end: a lake with written-back results -> transaction Bundles -> the
loopback FHIR test server (tests/fhir_server.py, a real HTTP server in a subprocess with its
data on disk) and the folder destination. Read back by search; a rerun adds nothing; a review
decision turns the report final; the server stopped mid-export and restarted: every result
delivered once; a wrong token: one clear line and the Bundles stay pending; no PHI in logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fhir_server
import pytest
from bundle_factory import make_bundle, write_registry

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.fhir.bundle import validate_resource
from pipeline.fhir.client import FhirClient
from pipeline.fhir.stage import default_dest
from pipeline.fhir.stage import run as fhir_run
from pipeline.infer.stage import run as infer_run
from pipeline.lake import LakePaths, read_table
from pipeline.lake.identity import open_lake
from pipeline.lake.keys import LakeKeys
from pipeline.tensors.stage import run as tensors_run
from pipeline.writeback.stage import run as writeback_run

pytestmark = pytest.mark.integration

KEY = b"f" * 32
SEED = 2525
SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1234.1"
TOKEN = "test-token-1"


def _cfg(root: Path, **fhir: Any) -> Any:
    return load_config(
        overrides={
            "compute": {"partition_size": 8, "device": "cpu"},
            "infer": {"model": "tiny", "registry": str(root / "models.yaml")},
            "writeback": {"check_iod": False},
            "fhir": {
                "patient_identifier_system": SYSTEM,
                "token_env": "PACSFLOW_TEST_FHIR_TOKEN",
                "retries": 1,
                "backoff_s": 0.05,
                "backoff_max_s": 0.1,
                "timeout_s": 5,
                **fhir,
            },
        },
        environ={},
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LakePaths]:
    """A lake whose findings were written back (SEG + SR confirmed in a folder PACS)."""
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("fhir-it")
    synthesize(
        root / "archive", patients=2, seed=SEED, ct_slices=8, rows=40, columns=40,
        include_bad=False, include_mr=False,
    )  # fmt: skip
    write_registry(root / "models.yaml", make_bundle(root / "bundles" / "tiny", seed=4))
    cfg = _cfg(root)
    lake = LakePaths(root / "lake").with_keys(LakeKeys(KEY))
    open_lake(lake, LakeKeys(KEY), create=True, encrypted=True)  # the default of a new lake
    crawl_run(cfg, lake, FolderSource(root / "archive"), run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    infer_run(cfg, lake, run_id="i")
    result = writeback_run(cfg, lake, run_id="w", dest=str(root / "pacs"), key=KEY)
    assert result.counts.extra["confirmed"] >= 2
    return root, lake


def _copy(lake: LakePaths, to: Path) -> LakePaths:
    import shutil

    shutil.copytree(lake.root, to)
    return LakePaths(to).with_keys(lake.keys)


class FhirTestServer(fhir_server.FhirTestServer):
    """The test server with this module's token and a client of it."""

    def __init__(self, data: Path) -> None:
        super().__init__(data, token=TOKEN)

    def client(self) -> FhirClient:
        return FhirClient(self.url, token=TOKEN, retries=0)


@pytest.fixture
def server(tmp_path: Path, built: tuple[Path, LakePaths]) -> Iterator[FhirTestServer]:
    """A running test server that knows the lake's patients (as the EHR does)."""
    srv = FhirTestServer(tmp_path / "fhir-data")
    srv.start()
    _root, lake = built
    patients = {r["PatientID"] for r in read_table(lake, "vault").to_pylist()}
    with srv.client() as c:
        for n, pid in enumerate(sorted(patients)):
            c.transaction(
                {
                    "resourceType": "Bundle",
                    "type": "transaction",
                    "entry": [
                        {
                            "resource": {
                                "resourceType": "Patient",
                                "id": f"p{n}",
                                "identifier": [{"system": SYSTEM, "value": pid}],
                            },
                            "request": {"method": "PUT", "url": f"Patient/p{n}"},
                        }
                    ],
                }
            )
    yield srv
    srv.stop()


def _rows(lake: LakePaths) -> list[dict[str, Any]]:
    return read_table(lake, "fhir_outbox").to_pylist()


def test_export_to_server_read_back_rerun_and_review(
    built: tuple[Path, LakePaths],
    server: FhirTestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, base = built
    lake = _copy(base, tmp_path / "lake")
    monkeypatch.setenv("PACSFLOW_TEST_FHIR_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    r = fhir_run(_cfg(root), lake, run_id="f1", dest=server.url)
    n = r.counts.extra["results"]
    assert n >= 2
    assert r.counts.extra["confirmed"] == n
    assert not r.pending
    assert r.error is None
    assert server.count("DiagnosticReport") == n
    assert server.count("Patient") == 2  # never a new Patient
    # read back by search: by the study's DICOM UID, by subject
    vault = read_table(lake, "vault").to_pylist()
    with server.client() as c:
        for study in {v["StudyInstanceUID"] for v in vault}:
            found = c.search("ImagingStudy", {"identifier": f"urn:dicom:uid|urn:oid:{study}"})
            assert len(found) == 1
            series = {s["modality"]["code"] for s in found[0]["series"]}
            assert {"CT", "SEG", "SR"} <= series
            patient_ref = found[0]["subject"]["reference"]
            assert patient_ref.startswith("Patient/p")  # the conditional reference resolved
            reports = c.search("DiagnosticReport", {"subject": patient_ref})
            assert reports
            assert {d["status"] for d in reports} == {"preliminary"}
            for report in reports:
                assert report["conclusion"].startswith("AI result of tiny")
                for ref in report["result"]:
                    group = c.read(*ref["reference"].split("/"))
                    assert group is not None
                    assert group["derivedFrom"]
                    assert group["device"]["reference"].startswith("Device/")
        observations = c.search(
            "Observation", {"patient:identifier": f"{SYSTEM}|{vault[0]['PatientID']}"}
        )
        assert observations
    counts = {t: server.count(t) for t in ("ImagingStudy", "DiagnosticReport", "Observation")}
    versions = sorted(p.read_text() for p in (server.data / "DiagnosticReport").glob("*.json"))
    # a rerun adds nothing and sends nothing
    again = fhir_run(_cfg(root), lake, run_id="f2", dest=server.url)
    assert again.counts.extra["skipped"] == n
    assert again.counts.extra["sent"] == 0
    assert {t: server.count(t) for t in counts} == counts
    assert (
        sorted(p.read_text() for p in (server.data / "DiagnosticReport").glob("*.json")) == versions
    )
    # a reviewer accepts every finding of the first report: it turns final on the next export
    findings = read_table(lake, "findings").to_pylist()
    report = json.loads(
        next(iter(sorted((server.data / "DiagnosticReport").glob("*.json")))).read_text()
    )
    from pipeline.review.store import record_decision

    target = None
    sealed = lake.file_cipher()
    assert sealed is not None
    for p in (lake.restricted / "fhir" / "bundles").glob("*.json"):
        rec = json.loads(sealed.decrypt(p.read_bytes(), p.name))
        rep = next(
            e["resource"]
            for e in rec["entry"]
            if e["resource"]["resourceType"] == "DiagnosticReport"
        )
        if rep["id"] == report["id"]:
            target = rec
    assert target is not None
    labels = {
        e["resource"]["code"]["text"]
        for e in target["entry"]
        if e["resource"]["resourceType"] == "Observation" and "hasMember" in e["resource"]
    }
    tensor_key = None
    for f in findings:
        if f["label"] in labels and f["voxel_count"]:
            tensor_key = tensor_key or f["tensor_key"]
    for f in findings:
        if f["tensor_key"] == tensor_key and f["voxel_count"]:
            record_decision(lake, f, reviewer="qa", decision="accept")
    third = fhir_run(_cfg(root), lake, run_id="f3", dest=server.url)
    assert third.counts.extra["confirmed"] >= 1
    assert third.counts.extra["final_reports"] >= 1
    with server.client() as c:
        statuses = [d["status"] for d in c.search("DiagnosticReport", {})]
    assert sorted(statuses).count("final") >= 1
    assert len(statuses) == n
    assert {t: server.count(t) for t in counts} == counts
    # no PHI in pacsflow's log: no patient ID, no original UID (urllib3 logs this test's own
    # search URLs at DEBUG, so only pacsflow's records are read)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pipeline"))
    assert "fhir:" in text
    for v in vault:
        assert v["PatientID"] not in text
        assert v["StudyInstanceUID"] not in text
        assert v["SOPInstanceUID"] not in text


def test_wrong_token_is_one_clear_line_and_bundles_stay_pending(
    built: tuple[Path, LakePaths],
    server: FhirTestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, base = built
    lake = _copy(base, tmp_path / "lake")
    monkeypatch.setenv("PACSFLOW_TEST_FHIR_TOKEN", "wrong")
    r = fhir_run(_cfg(root), lake, run_id="f1", dest=server.url)
    assert r.error is not None
    assert "401 Unauthorized" in r.error
    assert "\n" not in r.error
    assert r.counts.extra["confirmed"] == 0
    assert len(r.pending) == r.counts.extra["results"]
    assert not [x for x in _rows(lake) if x["status"] == "confirmed"]
    assert server.count("DiagnosticReport") == 0
    monkeypatch.setenv("PACSFLOW_TEST_FHIR_TOKEN", TOKEN)
    again = fhir_run(_cfg(root), lake, run_id="f2", dest=server.url)
    assert again.counts.extra["confirmed"] == again.counts.extra["results"]


def test_server_stopped_mid_export_then_restarted_delivers_once(
    built: tuple[Path, LakePaths],
    server: FhirTestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server is killed after the first Bundle landed: the export leaves the rest pending
    (one line); the server restarts on its data, the rerun delivers the rest; every result
    is on the server once."""
    root, base = built
    lake = _copy(base, tmp_path / "lake")
    monkeypatch.setenv("PACSFLOW_TEST_FHIR_TOKEN", TOKEN)
    server.stop()
    server.start(die_after=1)  # the real server exits when the second Bundle arrives
    first = fhir_run(_cfg(root), lake, run_id="f1", dest=server.url)
    n = first.counts.extra["results"]
    assert first.error is not None
    assert "connection refused" in first.error
    assert first.counts.extra["confirmed"] == 1
    assert len(first.pending) == n - 1
    server.start()
    second = fhir_run(_cfg(root), lake, run_id="f2", dest=server.url)
    assert second.counts.extra["confirmed"] == n - 1
    assert second.counts.extra["skipped"] == 1
    assert server.count("DiagnosticReport") == n
    with server.client() as c:
        ids = [d["id"] for d in c.search("DiagnosticReport", {})]
    assert len(ids) == len(set(ids)) == n


def test_folder_destination_validates(built: tuple[Path, LakePaths], tmp_path: Path) -> None:
    """The embedded default: Bundles in the lake's restricted zone, sealed like it (the lake
    is encrypted at rest); each opens with the key and validates; a rerun writes nothing."""
    root, base = built
    lake = _copy(base, tmp_path / "lake")
    r = fhir_run(_cfg(root, token_env=None), lake, run_id="f1")
    n = r.counts.extra["results"]
    assert r.counts.extra["confirmed"] == n >= 2
    files = sorted(default_dest(lake).glob("*.json"))
    assert len(files) == n
    cipher = lake.file_cipher()
    for f in files:
        raw = f.read_bytes()
        if cipher is not None:
            assert not raw.startswith(b"{")  # sealed at rest
            raw = cipher.decrypt(raw, f.name)
        bundle = json.loads(raw)
        validate_resource(bundle)
        types = [e["resource"]["resourceType"] for e in bundle["entry"]]
        assert "Patient" not in types
        assert {"ImagingStudy", "DiagnosticReport", "Observation", "Device"} <= set(types)
        urls = [e["fullUrl"] for e in bundle["entry"]]
        assert len(urls) == len(set(urls)), "two resources of one Bundle share an id"
        texts = [
            e["resource"]["code"].get("text") for e in bundle["entry"] if "code" in e["resource"]
        ]
        assert not any(t == "lung_nodule" for t in texts), "a nodule named by its class alone"
    again = fhir_run(_cfg(root, token_env=None), lake, run_id="f2")
    assert again.counts.extra["skipped"] == n
    assert again.counts.extra["sent"] == 0
    # a clear export outside the lake
    out = tmp_path / "clear"
    fhir_run(_cfg(root, token_env=None), lake, run_id="f3", dest=str(out))
    for f in sorted(out.glob("*.json")):
        validate_resource(json.loads(f.read_text()))


def test_sigkill_of_the_command_then_rerun_delivers_each_result_once(
    built: tuple[Path, LakePaths], server: FhirTestServer, tmp_path: Path
) -> None:
    """`pacsflow fhir` killed with SIGKILL as soon as its first Bundle is on the server (no
    cleanup, maybe no outbox row), then run again: every result on the server once, every
    Bundle confirmed, the command's output free of identifiers."""
    import base64
    import os
    import signal

    import yaml

    root, base = built
    lake = _copy(base, tmp_path / "lake")
    key_file = tmp_path / "k.key"
    key_file.write_text(f"pacsflow-key-v1\n{base64.b64encode(KEY).decode()}\n")
    key_file.chmod(0o600)
    config = tmp_path / "fhir.yaml"
    config.write_text(yaml.safe_dump({
        "infer": {"registry": str(root / "models.yaml")},
        "fhir": {"patient_identifier_system": SYSTEM, "token_env": "PACSFLOW_TEST_FHIR_TOKEN",
                 "backoff_s": 0.05},
        "logging": {"level": "INFO"},
    }))  # fmt: skip
    argv = [sys.executable, "-m", "pipeline.cli.main", "fhir", "--lake", str(lake.root),
            "--dest", server.url, "--key-file", str(key_file), "--config", str(config)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PACSFLOW_TEST_FHIR_TOKEN": TOKEN}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (
        proc.poll() is None and not server.count("DiagnosticReport") and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    latest: dict[str, str] = {}
    for row in sorted(_rows(lake), key=lambda r: r["updated_at"]):
        latest[row["bundle_id"]] = row["status"]
    assert latest
    assert set(latest.values()) == {"confirmed"}
    assert server.count("DiagnosticReport") == len(latest)
    with server.client() as c:
        ids = [d["id"] for d in c.search("DiagnosticReport", {})]
    assert len(ids) == len(set(ids)) == len(latest)
    output = rerun.stdout + rerun.stderr
    assert "fhir: seen" in output
    for v in read_table(lake, "vault").to_pylist():
        assert v["PatientID"] not in output
        assert v["StudyInstanceUID"] not in output
