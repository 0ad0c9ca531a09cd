"""Write-back end to end into a real Orthanc: SEG and SR over STOW-RS and C-STORE land in the
original study, are found again by QIDO-RS and C-FIND, parse with highdicom and equal what
the findings say (every voxel of every source frame, the volumes); dciodvfy finds no error;
a rerun adds nothing; a PACS that is away leaves objects pending until a rerun delivers them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from bundle_factory import make_bundle, write_registry

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.infer.stage import run as infer_run
from pipeline.lake import LakePaths, read_table
from pipeline.lake.arrays import load_tensor
from pipeline.lake.identity import open_lake
from pipeline.lake.keys import LakeKeys
from pipeline.tensors.stage import run as tensors_run
from pipeline.writeback.stage import dciodvfy_errors
from pipeline.writeback.stage import run as writeback_run

pytestmark = pytest.mark.integration

KEY = b"w" * 32
SEED = 7170


def _cfg(root: Path, **source: Any) -> Any:
    return load_config(
        overrides={
            "compute": {"partition_size": 8, "device": "cpu"},
            "infer": {"model": "tiny", "registry": str(root / "models.yaml")},
            "writeback": {"backoff_s": 0.05, "backoff_max_s": 0.1, "retries": 2},
            **({"source": source} if source else {}),
        },
        environ={},
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LakePaths]:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("writeback-it")
    synthesize(
        root / "archive", patients=1, seed=SEED, ct_slices=8, rows=40, columns=40,
        include_bad=False, include_mr=False,
    )  # fmt: skip
    bundle = make_bundle(root / "bundles" / "tiny", seed=4)
    write_registry(root / "models.yaml", bundle)
    cfg = _cfg(root)
    lake = LakePaths(root / "lake")
    open_lake(lake, LakeKeys(KEY), create=True)  # the CLI tests below open it as a lake
    crawl_run(cfg, lake, FolderSource(root / "archive"), run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    infer_run(cfg, lake, run_id="i")
    return root, lake


def _copy(lake: LakePaths, to: Path) -> LakePaths:
    shutil.copytree(lake.root, to)
    return LakePaths(to)


def _originals(lake: LakePaths) -> dict[str, dict[str, Any]]:
    return {r["sop_pseudonym"]: r for r in read_table(lake, "vault").to_pylist()}


def _check_objects(lake: LakePaths, seg_ds: pydicom.Dataset, sr_ds: pydicom.Dataset) -> None:
    """The SEG's frames equal the finding's mask on each source frame; the SR's volumes equal
    the findings table's."""
    import highdicom as hd

    findings = read_table(lake, "findings").to_pylist()
    tensors = {t["tensor_key"]: t for t in read_table(lake, "tensors").to_pylist()}
    originals = _originals(lake)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    source_series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    mine = [
        f
        for f in findings
        if originals[tensors[f["tensor_key"]]["sop_instance_uids"][0]]["SeriesInstanceUID"]
        == source_series
    ]
    assert mine
    tensor = tensors[mine[0]["tensor_key"]]
    mask = load_tensor(lake, mine[0]["mask_path"])
    sources = [originals[s]["SOPInstanceUID"] for s in tensor["sop_instance_uids"]]
    # the SEG study is the original study, never the pseudonym
    assert seg_ds.StudyInstanceUID == originals[tensor["sop_instance_uids"][0]]["StudyInstanceUID"]
    by_label = {d.SegmentLabel: d.SegmentNumber for d in seg.SegmentSequence}
    for f in mine:
        if f["label"] not in by_label:
            assert f["voxel_count"] == 0  # an empty label gets no segment
            continue
        number = by_label[f["label"]]
        planes = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=sources,
            segment_numbers=[number],
            combine_segments=True,
            skip_overlap_checks=True,
        )
        np.testing.assert_array_equal(planes > 0, mask == f["label_value"], err_msg=f["label"])
    volumes = {}
    for item in sr_ds.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for group in item.ContentSequence:
            label = measurement = None
            for entry in group.ContentSequence:
                code = entry.ConceptNameCodeSequence[0].CodeValue
                if code == "112039":  # Tracking Identifier
                    label = entry.TextValue
                if code == "118565006":  # Volume
                    measurement = float(entry.MeasuredValueSequence[0].NumericValue)
            volumes[label] = measurement
    for f in mine:
        if f["label"] in by_label:
            assert volumes[f["label"]] == pytest.approx(f["volume_ml"], rel=1e-6)


def test_folder_destination(built: tuple[Path, LakePaths], tmp_path: Path) -> None:
    root, base = built
    lake = _copy(base, tmp_path / "lake")
    dest = tmp_path / "results"
    result = writeback_run(_cfg(root), lake, run_id="w1", dest=str(dest), key=KEY)
    e = result.counts.extra
    assert e["groups"] >= 1
    assert e["confirmed"] == 2 * e["groups"]
    assert not result.pending
    files = sorted(dest.rglob("*.dcm"))
    assert len(files) == 2 * e["groups"]
    for f in files:
        assert dciodvfy_errors(f) == [], f
    seg = next(pydicom.dcmread(f) for f in files if pydicom.dcmread(f).Modality == "SEG")
    sr = next(pydicom.dcmread(f) for f in files if pydicom.dcmread(f).Modality == "SR")
    _check_objects(lake, seg, sr)
    # rerun: nothing new is built or sent, the files are the same
    before = {f: f.read_bytes() for f in files}
    again = writeback_run(_cfg(root), lake, run_id="w2", dest=str(dest), key=KEY)
    assert again.counts.extra["built"] == 0
    assert again.counts.extra["skipped"] == 2 * e["groups"]
    assert {f: f.read_bytes() for f in sorted(dest.rglob("*.dcm"))} == before
    statuses = {r["status"] for r in read_table(lake, "outbox").to_pylist()}
    assert statuses == {"built", "sent", "confirmed"}
    from pipeline.lake.duck import object_states

    assert "written_back" in {r["state"] for r in object_states(lake).to_pylist()}


def _study_count(orthanc: Any, study_uid: str) -> int:
    found = orthanc.rest(
        "POST", "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
    )
    return len(found.json())


def test_stow_rs_and_c_store_into_orthanc(
    built: tuple[Path, LakePaths], tmp_path: Path, orthanc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, base = built
    monkeypatch.setenv("WB_USER", orthanc.username)
    monkeypatch.setenv("WB_PASSWORD", orthanc.password)
    auth = {"username_env": "WB_USER", "password_env": "WB_PASSWORD"}
    web = _cfg(root, auth=auth)
    dimse = _cfg(root, calling_aet=orthanc.scu_aet)
    for name, cfg, dest in (
        ("stow", web, f"dicomweb+{orthanc.dicomweb_url}"),
        ("cstore", dimse, f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"),
    ):
        lake = _copy(base, tmp_path / name)
        # a fresh key per transport: other UIDs, so the two runs do not see each other's objects
        key = (name * 32).encode()[:32]
        result = writeback_run(cfg, lake, run_id="w1", dest=dest, key=key)
        assert not result.pending, name
        rows = read_table(lake, "outbox").to_pylist()
        confirmed = [r for r in rows if r["status"] == "confirmed"]
        assert len(confirmed) == 2 * result.counts.extra["groups"]
        study = confirmed[0]["StudyInstanceUID"]
        assert study in {r["StudyInstanceUID"] for r in _originals(lake).values()}
        n = _study_count(orthanc, study)
        # found again by QIDO-RS, retrieved and checked
        client = orthanc.dicomweb_client()
        seg_row = next(r for r in confirmed if r["kind"] == "SEG")
        sr_row = next(
            r for r in confirmed if r["kind"] == "SR" and r["tensor_key"] == seg_row["tensor_key"]
        )
        seg = client.retrieve_instance(study, seg_row["SeriesInstanceUID"], seg_row["result_uid"])
        sr = client.retrieve_instance(study, sr_row["SeriesInstanceUID"], sr_row["result_uid"])
        _check_objects(lake, seg, sr)
        # twice = once
        again = writeback_run(cfg, lake, run_id="w2", dest=dest, key=key)
        assert again.counts.extra["built"] == 0
        assert _study_count(orthanc, study) == n


#: pynetdicom leaks the socket of a failed connection (see tests/integration/test_dimse_source.py)
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_pacs_stopped_then_back_delivers_everything_once(
    built: tuple[Path, LakePaths], tmp_path: Path, orthanc_control: Any
) -> None:
    """A private Orthanc is stopped: the stage retries, reports what is pending and exits;
    the same Orthanc (same storage, same ports) comes back: a rerun delivers everything,
    each object once, reusing the objects built the first time."""
    root, base = built
    lake = _copy(base, tmp_path / "lake")
    workdir = tmp_path / "pacs"
    workdir.mkdir()
    proc, server = orthanc_control.start(workdir)
    cfg = _cfg(root, calling_aet=server.scu_aet, timeout_s=2)
    dest = f"dimse://{server.aet}@127.0.0.1:{server.dicom_port}"
    try:
        orthanc_control.stop(proc)  # the PACS goes away
        away = writeback_run(cfg, lake, run_id="w1", dest=dest, key=b"p" * 32)
        assert away.pending
        statuses = [r["status"] for r in read_table(lake, "outbox").to_pylist()]
        assert "failed" in statuses
        assert "confirmed" not in statuses
        proc = orthanc_control.restart(server)  # back, same configuration and storage
        back = writeback_run(cfg, lake, run_id="w2", dest=dest, key=b"p" * 32)
        assert not back.pending
        assert back.counts.extra["built"] == 0  # built in the first run, reused
        uids = {r["result_uid"] for r in read_table(lake, "outbox").to_pylist()}
        for uid in uids:
            found = server.rest(
                "POST", "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
            )
            assert len(found.json()) == 1
    finally:
        orthanc_control.stop(proc)


def test_killed_mid_send_then_rerun_leaves_one_copy(
    built: tuple[Path, LakePaths], tmp_path: Path, orthanc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage dies after the first object went out; a rerun sends the rest, and the PACS
    holds each object exactly once (same UIDs, confirmed ones not resent)."""
    from pipeline.writeback import stage

    root, base = built
    lake = _copy(base, tmp_path / "lake")
    cfg = _cfg(root, calling_aet=orthanc.scu_aet)
    dest = f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    key = b"k" * 32
    real = stage._send
    calls = {"n": 0}

    def dies(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as a kill between two objects
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "_send", dies)
    with pytest.raises(KeyboardInterrupt):
        writeback_run(cfg, lake, run_id="w1", dest=dest, key=key)
    monkeypatch.setattr(stage, "_send", real)
    first = [r for r in read_table(lake, "outbox").to_pylist() if r["status"] == "confirmed"]
    assert len(first) == 1
    again = writeback_run(cfg, lake, run_id="w2", dest=dest, key=key)
    assert not again.pending
    rows = read_table(lake, "outbox").to_pylist()
    uids = {r["result_uid"] for r in rows}
    resent = [r for r in rows if r["run_id"] == "w2" and r["status"] == "sent"]
    assert first[0]["result_uid"] not in {r["result_uid"] for r in resent}
    for uid in uids:
        found = orthanc.rest(
            "POST", "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
        )
        assert len(found.json()) == 1


def test_sigkill_of_the_command_then_rerun_leaves_one_copy(
    built: tuple[Path, LakePaths], tmp_path: Path, orthanc: Any
) -> None:
    """`pacsflow writeback` killed with SIGKILL as soon as its first object is in the PACS (no
    cleanup runs, no outbox row is written), then run again: every object exactly once."""
    import base64
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    _root, base = built
    lake = _copy(base, tmp_path / "lake")
    key = KEY  # the lake's own key: another one is refused (one key per lake)
    key_file = tmp_path / "k.key"
    key_file.write_text(f"pacsflow-key-v1\n{base64.b64encode(key).decode()}\n")
    key_file.chmod(0o600)
    config = tmp_path / "wb.yaml"
    config.write_text(yaml.safe_dump({
        "source": {"calling_aet": orthanc.scu_aet},
        "writeback": {"backoff_s": 0.05},
        "logging": {"level": "WARNING"},
    }))  # fmt: skip
    dest = f"dimse://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    argv = [sys.executable, "-m", "pipeline.cli.main", "writeback", "--lake", str(lake.root),
            "--dest", dest, "--key-file", str(key_file), "--config", str(config)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    study = read_table(lake, "vault").to_pylist()[0]["StudyInstanceUID"]

    def in_pacs() -> int:
        found = orthanc.rest(
            "POST", "/tools/find",
            json={"Level": "Instance", "Query": {"StudyInstanceUID": study, "Modality": "SEG\\SR"}},
        )  # fmt: skip
        return len(found.json())

    before = in_pacs()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and in_pacs() == before and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = read_table(lake, "outbox").to_pylist()
    uids = {r["result_uid"] for r in rows if r["status"] == "confirmed"}
    assert uids
    for uid in uids:
        found = orthanc.rest(
            "POST", "/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
        )
        assert len(found.json()) == 1
