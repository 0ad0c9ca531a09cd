"""Detection bundles (issue #22, §4): the model zoo's lung_nodule_ct_detection runs as shipped
(trusted: its detector_ops and sliding window), and its boxes land in the right place on the
tensor grid and in patient coordinates: pacsflow's mapping equals the bundle's own
postprocessing, and a known-answer network puts a box exactly where its anchors say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import detection_bundle

from pipeline.infer.bundle import load_bundle
from pipeline.infer.detect import Detector, is_detection, loaded, map_boxes

MODELS = Path(__file__).resolve().parents[3] / "models"
#: (slices, rows, cols); columns run to patient left, rows to posterior (LPS): the bundle's
#: Orientationd (RAS) flips both, so its image is the tensor mirrored in x and y
SHAPE = (16, 32, 32)
AFFINE = np.array(
    [[0.7, 0, 0, -12.0], [0, 0.7, 0, 30.5], [0, 0, 1.25, -80.0], [0, 0, 0, 1]], dtype=np.float64
)


def _volume() -> np.ndarray:
    """Air, and a 300 HU block filling the detector's level-0 cell (3, 4, 2) of the RAS
    image: x' 12..15, y' 16..19, z' 4..5, i.e. columns 16..19, rows 12..15, slices 4..5."""
    arr = np.full(SHAPE, -1024, dtype=np.int16)
    arr[4:6, 12:16, 16:20] = 300
    return arr


def _world(index_xyz: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.append(index_xyz, 1.0))[:3]


@pytest.mark.parametrize("patch", [None, [16, 16, 8]], ids=["whole", "sliding-window"])
def test_known_answer_box_lands_on_its_voxels(tmp_path: Path, patch: Any) -> None:
    path = detection_bundle(tmp_path, known_answer=True)
    overrides = {"infer_patch_size": patch, "force_sliding_window": True} if patch else {}
    bundle = load_bundle(path, models_dir=MODELS, mode="trusted", overrides=overrides)
    assert is_detection(bundle)
    if patch:
        assert list(bundle.inferer.detector.inferer.roi_size) == patch  # detector_ops ran
    [(key, boxes)] = list(
        Detector(bundle, device="cpu", score_threshold=0.5).detect(
            [("v", lambda: (_volume(), AFFINE))]
        )
    )
    assert key == "v"
    assert len(boxes) == 1
    box = boxes[0]
    assert box.class_index == 0
    assert box.score == pytest.approx(1 / (1 + np.exp(-10.0)), rel=1e-5)
    # anchor 0 (6 x 8 x 4) centred on the cell (3, 4, 2) at cell * stride + stride // 2 =
    # (14, 18, 5) of the RAS image: x' 11..17, y' 14..22, z' 3..7 -> columns 31-17..31-11,
    # rows 31-22..31-14, slices 3..7 of the tensor
    assert box.box_voxel == pytest.approx((3, 9, 14, 7, 17, 20), abs=1e-4)
    assert box.bbox == (3, 9, 14, 7, 17, 20)
    lo = _world(np.array([14, 9, 3.0]), AFFINE)
    hi = _world(np.array([20, 17, 7.0]), AFFINE)
    assert box.box_mm == pytest.approx((*lo, *hi), abs=1e-4)
    assert box.size_mm == pytest.approx((6 * 0.7, 8 * 0.7, 4 * 1.25), abs=1e-4)


def test_mapping_equals_the_bundles_own_postprocessing(tmp_path: Path) -> None:
    """ClipBoxToImaged + AffineBoxToWorldCoordinated(affine_lps_to_ras) + ConvertBoxModed
    (cccwhd) of the bundle give the same centre and size in LPS mm as pacsflow's mapping."""
    import torch

    path = detection_bundle(tmp_path, known_answer=True)
    bundle = load_bundle(path, models_dir=MODELS, mode="trusted")
    image = bundle.preprocessing({"image": loaded(_volume(), AFFINE)})["image"]
    rng = np.random.default_rng(3)
    lo = rng.uniform(0, 12, (7, 3))
    raw = np.concatenate([lo, lo + rng.uniform(1, 10, (7, 3))], axis=1).astype(np.float32)
    raw[:, [2, 5]] = np.clip(raw[:, [2, 5]], 0, 16)
    out = bundle.postprocessing(
        {
            "box": torch.as_tensor(raw),
            "label": torch.zeros(7, dtype=torch.long),
            "label_scores": torch.ones(7),
            "image": image,
        }
    )
    theirs = np.asarray(out["box"], dtype=np.float64)  # (cx, cy, cz, w, h, d), LPS mm
    assert "image" not in out  # DeleteItemsd ran
    _, box_mm, _ = map_boxes(raw, np.asarray(image.affine), AFFINE, SHAPE)
    centre = (box_mm[:, :3] + box_mm[:, 3:]) / 2
    size = box_mm[:, 3:] - box_mm[:, :3]
    np.testing.assert_allclose(centre, theirs[:, :3], atol=1e-3)
    np.testing.assert_allclose(size, theirs[:, 3:], atol=1e-3)


def test_random_retinanet_runs_as_shipped(tmp_path: Path) -> None:
    """The published network (ResNet50-FPN RetinaNet) with random weights, on CPU without
    torchvision: boxes inside the volume, at most max_boxes, best first."""
    path = detection_bundle(tmp_path)
    bundle = load_bundle(path, models_dir=MODELS, mode="trusted")
    arr = np.full((16, 64, 64), -800, dtype=np.int16)
    arr[6:10, 20:30, 30:40] = 40
    affine = np.diag([0.7, 0.7, 1.25, 1.0])
    [(_, boxes)] = list(
        Detector(bundle, device="cpu", score_threshold=0.0, max_boxes=4).detect(
            [("v", lambda: (arr, affine))]
        )
    )
    assert 1 <= len(boxes) <= 4
    assert [b.score for b in boxes] == sorted((b.score for b in boxes), reverse=True)
    for b in boxes:
        k0, j0, i0, k1, j1, i1 = b.box_voxel
        assert -1e-3 <= k0 <= k1 <= 15 + 1e-3
        assert -1e-3 <= j0 <= j1 <= 63 + 1e-3
        assert -1e-3 <= i0 <= i1 <= 63 + 1e-3


def test_detection_through_infer_and_writeback(tmp_path: Path) -> None:
    """`pacsflow infer` + `writeback` with the pinned, approved detection bundle: one finding
    per box (score, class, voxel and mm box) and a TID 1500 SR whose SCOORD3D ellipsoid is
    the finding's mm box, referencing the original series (re-identified)."""
    import base64

    import highdicom as hd
    import pydicom
    import yaml
    from dicom_factory import make_ct_stack
    from typer.testing import CliRunner

    from pipeline.cli.main import app
    from pipeline.config import load_config
    from pipeline.connectors import FolderSource
    from pipeline.crawl import run as crawl_run
    from pipeline.deid.stage import run as deid_run
    from pipeline.infer.bundle_config import content_hash
    from pipeline.infer.trust import TrustStore
    from pipeline.lake import LakePaths, read_table
    from pipeline.lake.identity import open_lake
    from pipeline.lake.keys import LakeKeys
    from pipeline.tensors.stage import run as tensors_run

    volume = _volume()

    def phantom(points: np.ndarray) -> np.ndarray:  # HU + 1024 at these LPS points
        i = np.rint((points[..., 0] + 12.0) / 0.7).astype(int)
        j = np.rint((points[..., 1] - 30.5) / 0.7).astype(int)
        k = round((float(points[0, 0, 2]) + 80.0) / 1.25)
        return volume[k, j, i].astype(np.float64) + 1024

    archive = tmp_path / "archive"
    archive.mkdir()
    positions = [(-12.0, 30.5, -80.0 + 1.25 * k) for k in range(SHAPE[0])]
    for n, ds in enumerate(make_ct_stack(positions, phantom, pixel_spacing=(0.7, 0.7),
                                         rows=SHAPE[1], columns=SHAPE[2])):  # fmt: skip
        ds.RescaleIntercept = -1024
        ds.save_as(archive / f"{n:03d}.dcm", enforce_file_format=True)
    key = b"d" * 32
    lake = LakePaths(tmp_path / "lake")
    open_lake(lake, LakeKeys(key), create=True)
    cfg = load_config(overrides={"compute": {"workers": 1, "device": "cpu"}}, environ={})
    crawl_run(cfg, lake, FolderSource(archive), run_id="c")
    deid_run(cfg, lake, key=key, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    key_file = tmp_path / "k.key"
    key_file.write_text(f"pacsflow-key-v1\n{base64.b64encode(key).decode()}\n")
    key_file.chmod(0o600)

    bundle = detection_bundle(tmp_path / "bundles", known_answer=True)
    digest = content_hash(bundle)
    store = tmp_path / "trust.json"
    TrustStore(store).approve(digest, "nodules", bundle)
    nodule = {"category": ["49755003", "SCT", "Morphologically Altered Structure"],
              "type": ["27925004", "SCT", "Nodule"]}  # fmt: skip
    registry = {"nodules": {"bundle": str(bundle), "bundle_sha256": digest,
                            "applies_to": "Modality = 'CT'",
                            "detection": {"classes": {0: "lung_nodule"}},
                            "labels": {"lung_nodule": nodule}}}  # fmt: skip
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": registry}))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "compute": {"device": "cpu"},
        "infer": {"registry": str(tmp_path / "models.yaml"), "model": "nodules",
                  "trust_store": str(store)},
    }))  # fmt: skip
    common = ["--lake", str(lake.root), "--key-file", str(key_file), "--config", str(config)]
    runner = CliRunner()
    result = runner.invoke(app, ["infer", *common, "--workers", "1"])
    assert result.exit_code == 0, result.output
    [row] = read_table(lake, "findings").to_pylist()
    # issue #24: the class and the box's rank apart; the key keeps the unique name
    assert (row["label"], row["instance"]) == ("lung_nodule", 1)
    assert row["finding_key"].endswith("/lung_nodule_1")
    assert row["box_class"] == "lung_nodule"
    assert row["score"] == pytest.approx(1 / (1 + np.exp(-10.0)), rel=1e-5)
    lo = _world(np.array([14, 9, 3.0]), AFFINE)
    hi = _world(np.array([20, 17, 7.0]), AFFINE)
    assert row["box_mm"] == pytest.approx([*lo, *hi], abs=1e-3)
    dest = tmp_path / "results"
    result = runner.invoke(app, ["writeback", *common, "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    [path] = [p for p in dest.rglob("*") if p.is_file()]
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    assert sr.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.2"  # the original study
    [group] = sr.content.get_volumetric_roi_measurement_groups()
    assert str(group.tracking_identifier) == "lung_nodule_1"  # as before issue #24
    assert group.roi.graphic_type == hd.sr.GraphicTypeValues3D.ELLIPSOID
    points = np.asarray(group.roi.graphic_data, dtype=np.float64).reshape(6, 3)
    assert [*points.min(0), *points.max(0)] == pytest.approx([*lo, *hi], abs=1e-3)
    again = runner.invoke(app, ["writeback", *common, "--dest", str(dest)])
    assert again.exit_code == 0, again.output  # confirmed already: nothing new
    assert len([p for p in dest.rglob("*") if p.is_file()]) == 1
