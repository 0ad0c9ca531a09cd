"""Reviewers' corrected masks written back into a real Orthanc as DICOM SEG (issue #23, point 5):
off by default; with ``review.write_back_corrections`` each finding's latest correction arrives
in the original study as a SEG that dciodvfy accepts, whose content creator is the reviewer,
whose segment is SEMIAUTOMATIC with the model as its algorithm, and whose pixels equal the
corrected mask on every source frame; a rerun sends nothing; a new correction version is a new
instance in the same series; an erased finding is refused, counted, and sends nothing."""

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
from pipeline.review.corrections import record_correction
from pipeline.tensors.stage import run as tensors_run
from pipeline.writeback.stage import dciodvfy_errors
from pipeline.writeback.stage import run as writeback_run

pytestmark = pytest.mark.integration

KEY = b"c" * 32
REVIEWER = "rudi.qa"


def _cfg(root: Path, corrections: bool = False, **source: Any) -> Any:
    return load_config(
        overrides={
            "compute": {"partition_size": 8, "device": "cpu"},
            "infer": {"model": "tiny", "registry": str(root / "models.yaml")},
            "writeback": {"backoff_s": 0.05, "backoff_max_s": 0.1, "retries": 2},
            "review": {"write_back_corrections": corrections},
            **({"source": source} if source else {}),
        },
        environ={},
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LakePaths]:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("writeback-corrections")
    synthesize(
        root / "archive", patients=1, seed=7171, ct_slices=8, rows=40, columns=40,
        include_bad=False, include_mr=False,
    )  # fmt: skip
    bundle = make_bundle(root / "bundles" / "tiny", seed=4)
    write_registry(root / "models.yaml", bundle)
    cfg = _cfg(root)
    lake = LakePaths(root / "lake")
    open_lake(lake, LakeKeys(KEY), create=True)  # the CLI test opens it as a lake
    crawl_run(cfg, lake, FolderSource(root / "archive"), run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    infer_run(cfg, lake, run_id="i")
    return root, lake


def _finding(lake: LakePaths) -> tuple[dict[str, Any], dict[str, Any]]:
    """A finding with voxels, as the review app passes it to record_correction, and its
    tensors row."""
    tensors = {t["tensor_key"]: t for t in read_table(lake, "tensors").to_pylist()}
    f = next(f for f in read_table(lake, "findings").to_pylist() if f["voxel_count"])
    t = tensors[f["tensor_key"]]
    return {**f, "shape": t["shape"], "tensor_checksum": t.get("checksum")}, t


def _seg_rows(lake: LakePaths) -> list[dict[str, Any]]:
    """The outbox rows of corrections (their built row names the correction)."""
    rows = read_table(lake, "outbox").to_pylist()
    uids = {
        r["result_uid"]
        for r in rows
        if r["status"] == "built" and "correction" in (r["detail"] or "")
    }
    return [r for r in rows if r["result_uid"] in uids]


def _in_pacs(orthanc: Any, series_uid: str) -> int:
    found = orthanc.rest(
        "POST",
        "/tools/find",
        json={"Level": "Instance", "Query": {"SeriesInstanceUID": series_uid}},
    )
    return len(found.json())


def test_corrections_reach_orthanc_as_seg_with_the_reviewer(
    built: tuple[Path, LakePaths], tmp_path: Path, orthanc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import highdicom as hd

    root, base = built
    lake = LakePaths(tmp_path / "lake")
    shutil.copytree(base.root, lake.root)
    monkeypatch.setenv("WB_USER", orthanc.username)
    monkeypatch.setenv("WB_PASSWORD", orthanc.password)
    auth = {"username_env": "WB_USER", "password_env": "WB_PASSWORD"}
    dest = f"dicomweb+{orthanc.dicomweb_url}"
    finding, tensor = _finding(lake)
    model_mask = load_tensor(lake, finding["mask_path"]) == finding["label_value"]
    corrected = model_mask.astype(np.uint8)
    corrected[:, :, : corrected.shape[2] // 2] = 0  # erase half
    corrected[1, 2:5, 2:5] = 1  # and draw a square
    assert corrected.any()
    assert not np.array_equal(corrected, model_mask)
    record_correction(lake, finding, corrected, reviewer=REVIEWER)

    # off by default: the model's objects go, no correction
    first = writeback_run(_cfg(root, auth=auth), lake, run_id="w1", dest=dest, key=KEY)
    assert not first.pending
    assert first.counts.extra["corrections"] == 0
    assert _seg_rows(lake) == []

    cfg = _cfg(root, corrections=True, auth=auth)
    second = writeback_run(cfg, lake, run_id="w2", dest=dest, key=KEY)
    assert not second.pending
    e = second.counts.extra
    assert (e["corrections"], e["built"], e["confirmed"]) == (1, 1, 1)
    rows = _seg_rows(lake)
    confirmed = [r for r in rows if r["status"] == "confirmed"]
    assert len(confirmed) == 1
    assert confirmed[0]["kind"] == "SEG"
    row = confirmed[0]
    vault = {r["sop_pseudonym"]: r for r in read_table(lake, "vault").to_pylist()}
    originals = [vault[s] for s in tensor["sop_instance_uids"]]
    assert row["StudyInstanceUID"] == originals[0]["StudyInstanceUID"]
    assert _in_pacs(orthanc, row["SeriesInstanceUID"]) == 1

    ds = orthanc.dicomweb_client().retrieve_instance(
        row["StudyInstanceUID"], row["SeriesInstanceUID"], row["result_uid"]
    )
    path = tmp_path / "seg.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(path))
    # the reviewer is the observer (content creator); the model stays the algorithm
    assert seg.ContentCreatorName.family_name == REVIEWER
    ident = seg.ContentCreatorIdentificationCodeSequence[0].PersonIdentificationCodeSequence[0]
    assert ident.CodeValue == REVIEWER
    assert ident.CodingSchemeDesignator == "99PACSFLOW"
    assert seg.ContentLabel == "CORRECTED"
    assert seg.SegmentationType == "BINARY"
    (segment,) = seg.SegmentSequence
    assert segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentLabel == finding["label"]
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == finding["model"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == originals[0]["SeriesInstanceUID"]
    planes = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[o["SOPInstanceUID"] for o in originals],
        segment_numbers=[1],
        combine_segments=True,
        skip_overlap_checks=True,
    )
    np.testing.assert_array_equal(planes > 0, corrected > 0)

    # rerun: nothing built or sent, the PACS holds one
    again = writeback_run(cfg, lake, run_id="w3", dest=dest, key=KEY)
    assert (again.counts.extra["built"], again.counts.extra["sent"]) == (0, 0)
    assert _in_pacs(orthanc, row["SeriesInstanceUID"]) == 1

    # a new version of the correction: a new instance in the same series, once
    record_correction(lake, finding, np.roll(corrected, 1, axis=1), reviewer=REVIEWER)
    third = writeback_run(cfg, lake, run_id="w4", dest=dest, key=KEY)
    assert (third.counts.extra["built"], third.counts.extra["confirmed"]) == (1, 1)
    assert _in_pacs(orthanc, row["SeriesInstanceUID"]) == 2
    writeback_run(cfg, lake, run_id="w5", dest=dest, key=KEY)
    assert _in_pacs(orthanc, row["SeriesInstanceUID"]) == 2

    # the reviewer erased the finding: nothing to write, said and counted, nothing sent
    record_correction(lake, finding, corrected * 0, reviewer=REVIEWER)
    erased = writeback_run(cfg, lake, run_id="w6", dest=dest, key=KEY)
    assert erased.counts.extra["corrections_refused"] == 1
    assert erased.counts.extra["sent"] == 0
    assert _in_pacs(orthanc, row["SeriesInstanceUID"]) == 2


def test_cli_corrections_flag_writes_them_once_to_a_folder(
    built: tuple[Path, LakePaths], tmp_path: Path
) -> None:
    """`pacsflow writeback --corrections` sends the corrections the config leaves off."""
    import base64

    import yaml
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    root, base = built
    lake = LakePaths(tmp_path / "lake")
    shutil.copytree(base.root, lake.root)
    finding, _tensor = _finding(lake)
    mask = (load_tensor(lake, finding["mask_path"]) == finding["label_value"]).astype(np.uint8)
    mask[0] = 1  # a whole slice added
    record_correction(lake, finding, mask, reviewer=REVIEWER)
    key_file = tmp_path / "k.key"
    key_file.write_text(f"pacsflow-key-v1\n{base64.b64encode(KEY).decode()}\n")
    key_file.chmod(0o600)
    config = tmp_path / "wb.yaml"
    config.write_text(yaml.safe_dump({
        "infer": {"registry": str(root / "models.yaml")},
        "logging": {"level": "WARNING"},
    }))  # fmt: skip
    dest = tmp_path / "results"
    argv = ["writeback", "--lake", str(lake.root), "--dest", str(dest),
            "--key-file", str(key_file), "--config", str(config)]  # fmt: skip

    def corrected() -> list[pydicom.Dataset]:
        found = [pydicom.dcmread(f) for f in sorted(dest.rglob("*.dcm"))]
        return [ds for ds in found if ds.get("ContentLabel") == "CORRECTED"]

    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert corrected() == []
    for _ in range(2):  # twice = once
        result = CliRunner().invoke(app, [*argv, "--corrections"])
        assert result.exit_code == 0, result.output
        (seg,) = corrected()
    assert seg.ContentCreatorName.family_name == REVIEWER
