"""The same synthetic archive crawled from a folder and from Orthanc over DICOMweb."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dicom_factory import with_file_meta
from pydicom import dcmread

from pipeline.config import load_config
from pipeline.connectors import FolderSource, open_source
from pipeline.connectors.dicomweb import DicomwebSource
from pipeline.crawl import current_index
from pipeline.crawl import run as crawl_run
from pipeline.errors import SourceError
from pipeline.lake import LakePaths, read_table

pytestmark = pytest.mark.integration

SEED = 31337  # this module's own UIDs in the shared PACS


@pytest.fixture(scope="module")
def stored_archive(
    tmp_path_factory: pytest.TempPathFactory, orthanc
) -> tuple[Path, dict[str, object]]:  # type: ignore[no-untyped-def]
    from pipeline.synth import synthesize

    out = tmp_path_factory.mktemp("sources") / "archive"
    result = synthesize(out, patients=2, seed=SEED, ct_slices=8, rows=64, columns=64)
    truth = json.loads(result.ground_truth.read_text())
    client = orthanc.dicomweb_client()
    for series in truth["series"]:
        batch = [with_file_meta(dcmread(out / f, force=True)) for f in series["files"]]
        response = client.store_instances(batch)
        assert len(response.get("FailedSOPSequence", [])) == 0
    return out, truth


def _cfg(monkeypatch: pytest.MonkeyPatch, orthanc) -> object:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TEST_PACS_USER", orthanc.username)
    monkeypatch.setenv("TEST_PACS_PASSWORD", orthanc.password)
    return load_config(
        overrides={
            "source": {
                "uri": f"dicomweb+{orthanc.dicomweb_url}",
                "auth": {"username_env": "TEST_PACS_USER", "password_env": "TEST_PACS_PASSWORD"},
                "page_size": 3,  # forces QIDO-RS paging
            },
            "compute": {"partition_size": 2},
        },
        environ={},
    )


def test_folder_and_dicomweb_crawls_find_the_same_instances(
    stored_archive, orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    archive, truth = stored_archive
    cfg = _cfg(monkeypatch, orthanc)
    studies = {s["StudyInstanceUID"] for s in truth["series"]}  # type: ignore[index]
    expected = {uid for s in truth["series"] for uid in s["sop_instance_uids"]}  # type: ignore[index]

    folder_lake = LakePaths(tmp_path / "folder")
    crawl_run(cfg, folder_lake, FolderSource(archive), run_id="f")
    folder_uids = set(current_index(folder_lake).column("SOPInstanceUID").to_pylist())
    assert folder_uids == expected

    web_lake = LakePaths(tmp_path / "web")
    source = open_source(cfg.source.uri, cfg.source)
    assert isinstance(source, DicomwebSource)
    assert "PASSWORD" not in source.source_id
    assert orthanc.password not in source.source_id
    result = crawl_run(cfg, web_lake, source, run_id="w1")
    assert result.counts.reconciles
    index = current_index(web_lake).to_pylist()
    ours = [r for r in index if r["StudyInstanceUID"] in studies]
    assert {r["SOPInstanceUID"] for r in ours} == expected
    assert all(r["location"].startswith("studies/") for r in ours)
    assert all(r["has_pixel_data"] for r in ours)  # known from the metadata, never downloaded
    by_uid = {r["SOPInstanceUID"]: r for r in current_index(folder_lake).to_pylist()}
    for r in ours:
        assert r["SeriesInstanceUID"] == by_uid[r["SOPInstanceUID"]]["SeriesInstanceUID"]
        assert r["PatientID"] == by_uid[r["SOPInstanceUID"]]["PatientID"]

    # unchanged PACS: every study is skipped by its watermark, nothing is fetched or written
    again = crawl_run(cfg, web_lake, source, run_id="w2").counts
    assert again.out == 0
    assert again.extra["units_read"] == 0
    assert again.skipped == again.seen


def test_dicomweb_without_credentials_is_a_clear_source_error(orthanc) -> None:  # type: ignore[no-untyped-def]
    cfg = load_config(overrides={"source": {"uri": f"dicomweb+{orthanc.dicomweb_url}"}}, environ={})
    source = open_source(cfg.source.uri, cfg.source)
    with pytest.raises(SourceError, match="HTTP 401"):
        source.check()


def test_dicomweb_refuses_credentials_in_the_uri() -> None:
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        load_config(overrides={"source": {"uri": "dicomweb+http://u:p@h:1/x"}}, environ={})
    cfg = load_config(environ={})
    with pytest.raises(ConfigError, match="credentials"):
        DicomwebSource.from_uri("dicomweb+http://user@h:1/x", cfg.source)


def test_dicomweb_dead_server_is_a_source_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = DicomwebSource(f"http://127.0.0.1:{port}/dicom-web", retries=False, timeout_s=2)
    with pytest.raises(SourceError, match="cannot reach"):
        source.check()


def test_dimse_crawl_finds_the_same_instances(stored_archive, orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _archive, truth = stored_archive
    studies = {s["StudyInstanceUID"] for s in truth["series"]}  # type: ignore[index]
    expected = {uid for s in truth["series"] for uid in s["sop_instance_uids"]}  # type: ignore[index]
    # Orthanc 1.10.1 cannot send HTJ2K over DIMSE: those instances must be quarantined as
    # unretrievable, named by location, and everything else indexed
    htj2k = {
        uid
        for s in truth["series"]  # type: ignore[index]
        if s["TransferSyntaxUID"].startswith("1.2.840.10008.1.2.4.20")
        for uid in s["sop_instance_uids"]
    }
    cfg = load_config(
        overrides={
            "source": {
                "uri": f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                "calling_aet": orthanc.scu_aet,
                "dimse": {"retrieve": "get"},
            },
            "compute": {"partition_size": 1},
        },
        environ={},
    )
    lake = LakePaths(tmp_path / "dimse")
    source = open_source(cfg.source.uri, cfg.source, cache_dir=lake.restricted / "cache")
    result = crawl_run(cfg, lake, source, run_id="d1")
    assert result.counts.reconciles
    index = [r for r in current_index(lake).to_pylist() if r["StudyInstanceUID"] in studies]
    indexed = {r["SOPInstanceUID"] for r in index}
    quarantined = {
        row["location"].rsplit("/", 1)[1]
        for row in read_table(lake, "quarantine").to_pylist()
        if row["reason"] == "unretrievable"
    }
    assert indexed | (quarantined & expected) == expected
    assert indexed == expected - htj2k
    assert quarantined & expected == htj2k
    # the cache lives in the restricted zone, named by hashes only
    cached = [p for p in (lake.restricted / "cache").rglob("*") if p.is_file()]
    assert cached
    assert not any(uid in str(p) for p in cached for uid in studies)
