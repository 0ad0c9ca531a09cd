"""The tensors stage end to end: the same archive read from a folder, over WADO-RS and over
DIMSE C-GET gives the same volumes; on a Dask cluster it equals the in-process run; a rerun
does nothing; an interrupted run resumes without duplicates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dicom_factory import with_file_meta
from pydicom import dcmread

from pipeline.config import load_config
from pipeline.connectors import FolderSource, open_source
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.lake import LakePaths, read_table
from pipeline.tensors.stage import run as tensors_run

pytestmark = pytest.mark.integration

Built = tuple[Path, dict[str, Any], LakePaths]  # archive, ground truth, folder-source lake

KEY = b"k" * 32
SEED = 5150  # this module's own UIDs in the shared PACS
#: the columns that must agree whatever connector the pixels came through
COLUMNS = (
    "SeriesInstanceUID",
    "status",
    "reason",
    "shape",
    "affine",
    "dtype",
    "checksum",
    "sop_instance_uids",
    "frame_numbers",
)


def _synth(out: Path) -> dict[str, Any]:
    from pipeline.synth import synthesize

    result = synthesize(
        out, patients=1, seed=SEED, ct_slices=12, rows=64, columns=64, include_bad=False
    )
    truth: dict[str, Any] = json.loads(result.ground_truth.read_text())
    return truth


def _cfg(**source: Any) -> Any:
    overrides: dict[str, Any] = {"compute": {"partition_size": 8}}
    if source:
        overrides["source"] = source
    return load_config(overrides=overrides, environ={})


def _rows(lake: LakePaths) -> list[dict[str, Any]]:
    rows = [{c: r.get(c) for c in COLUMNS} for r in read_table(lake, "tensors").to_pylist()]
    return sorted(rows, key=lambda r: (r["SeriesInstanceUID"], r["checksum"] or ""))


def _build(cfg: Any, lake: LakePaths, source: Any, client: Any = None) -> Any:
    crawl_run(cfg, lake, source, run_id="c", client=client)
    deid_run(cfg, lake, key=KEY, run_id="d", client=client)
    return tensors_run(cfg, lake, run_id="t", client=client)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("tensors-it")
    archive = root / "archive"
    truth = _synth(archive)
    lake = LakePaths(root / "folder")
    result = _build(_cfg(), lake, FolderSource(archive))
    assert result.counts.extra["volumes"] >= 2
    assert result.counts.quarantined == 0
    return archive, truth, lake


@pytest.fixture(scope="module")
def stored(folder_run: Built, orthanc: Any) -> dict[str, Any]:
    archive, truth, _lake = folder_run
    client = orthanc.dicomweb_client()
    for series in truth["series"]:
        batch = [with_file_meta(dcmread(archive / f, force=True)) for f in series["files"]]
        response = client.store_instances(batch)
        assert len(response.get("FailedSOPSequence", [])) == 0
    return truth


def _pseudonymised_series(truth: dict[str, Any], lake: LakePaths) -> set[str]:
    """The pseudonyms of the archive's series (the shared PACS holds other tests' too)."""
    ours = {u for s in truth["series"] for u in s["sop_instance_uids"]}
    return {
        r["series_pseudonym"]
        for r in read_table(lake, "vault").to_pylist()
        if r["SOPInstanceUID"] in ours
    }


def test_dicomweb_pixels_give_the_same_volumes(
    folder_run: Built,
    stored: dict[str, Any],
    orthanc: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _archive, truth, folder_lake = folder_run
    monkeypatch.setenv("TEST_PACS_USER", orthanc.username)
    monkeypatch.setenv("TEST_PACS_PASSWORD", orthanc.password)
    cfg = _cfg(
        uri=f"dicomweb+{orthanc.dicomweb_url}",
        auth={"username_env": "TEST_PACS_USER", "password_env": "TEST_PACS_PASSWORD"},
    )
    lake = LakePaths(tmp_path / "web")
    source = open_source(cfg.source.uri, cfg.source)
    crawl_run(cfg, lake, source, run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    result = tensors_run(cfg, lake, run_id="t")
    assert result.counts.quarantined == 0
    ours = _pseudonymised_series(truth, lake)
    assert ours
    web = [r for r in _rows(lake) if r["SeriesInstanceUID"] in ours]
    assert web == _rows(folder_lake)
    index = read_table(lake, "index").to_pylist()
    assert {r["source"] for r in index} == {source.source_id}  # pixels came by WADO-RS
    assert tensors_run(cfg, lake, run_id="t2").counts.seen == 0


def test_dimse_c_get_pixels_give_the_same_volumes(
    folder_run: Built, stored: dict[str, Any], orthanc: Any, tmp_path: Path
) -> None:
    _archive, truth, folder_lake = folder_run
    # Orthanc 1.10.1 cannot send HTJ2K over DIMSE (see test_crawl_sources): those series are
    # quarantined at crawl and have no tensors; every other series must match the folder run
    htj2k = {
        s["SeriesInstanceUID"]
        for s in truth["series"]
        if s["TransferSyntaxUID"].startswith("1.2.840.10008.1.2.4.20")
    }
    cfg = _cfg(
        uri=f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
        calling_aet=orthanc.scu_aet,
        dimse={"retrieve": "get"},
    )
    lake = LakePaths(tmp_path / "dimse")
    source = open_source(cfg.source.uri, cfg.source, cache_dir=lake.restricted / "cache")
    crawl_run(cfg, lake, source, run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    # instances evicted from the cache: the tensors stage C-GETs them again by the connector
    evicted = sorted((lake.restricted / "cache").rglob("*.dcm"))[::8]
    assert evicted
    for path in evicted:
        path.unlink()
    result = tensors_run(cfg, lake, run_id="t")
    assert result.counts.quarantined == 0
    assert all(path.is_file() for path in evicted)
    ours = _pseudonymised_series(truth, lake)
    dimse = [r for r in _rows(lake) if r["SeriesInstanceUID"] in ours]
    folder_vault = read_table(folder_lake, "vault").to_pylist()
    skipped = {r["series_pseudonym"] for r in folder_vault if r["SeriesInstanceUID"] in htj2k}
    expected = [r for r in _rows(folder_lake) if r["SeriesInstanceUID"] not in skipped]
    assert dimse == expected
    assert dimse


def test_on_the_cluster_equals_local_and_reruns_do_nothing(
    folder_run: Built, tmp_path: Path, dask_client: Any
) -> None:
    archive, _truth, folder_lake = folder_run
    cfg = _cfg()
    lake = LakePaths(tmp_path / "cluster")
    result = _build(cfg, lake, FolderSource(archive), client=dask_client)
    assert result.counts.seen > 0
    assert _rows(lake) == _rows(folder_lake)
    again = tensors_run(cfg, lake, run_id="t2", client=dask_client)
    assert again.counts.seen == 0
    assert _rows(lake) == _rows(folder_lake)


def test_an_interrupted_run_resumes_without_duplicates(
    folder_run: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.tensors.volume as volume

    archive, _truth, folder_lake = folder_run
    cfg = load_config(overrides={"compute": {"partition_size": 4}}, environ={})  # 1 obj/batch
    lake = LakePaths(tmp_path / "resume")
    crawl_run(cfg, lake, FolderSource(archive), run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")

    real, calls = volume.build_volumes, {"n": 0}

    def dies_on_the_third_series(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is killed mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(volume, "build_volumes", dies_on_the_third_series)
    with pytest.raises(KeyboardInterrupt):
        tensors_run(cfg, lake, run_id="t1")
    partial = read_table(lake, "tensors").num_rows
    assert 0 < partial < len(_rows(folder_lake))
    monkeypatch.setattr(volume, "build_volumes", real)

    resumed = tensors_run(cfg, lake, run_id="t2")
    assert resumed.counts.seen > 0
    rows = _rows(lake)
    assert len({(r["SeriesInstanceUID"], r["checksum"]) for r in rows}) == len(rows)
    assert rows == _rows(folder_lake)
    assert tensors_run(cfg, lake, run_id="t3").counts.seen == 0
