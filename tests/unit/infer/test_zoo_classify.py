"""Issue #22 sections 5 and 6 with the shared model-zoo bundles (random weights from their own
network_def): breast_density_classification over 2D mammograms through `pacsflow infer` and
`writeback` (findings per class, TID 1500 SR with qualitative evaluation), and
brats_mri_segmentation over four MR sequences matched by a registry rule, stacked as channels
on the first one's grid (SEG on the reference series' frames), or refused with the reason."""

from __future__ import annotations

import base64
import json
import socket
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from bundle_factory import ZOO, zoo_bundle
from typer.testing import CliRunner
from zoo_studies import brain_study, mammograms

from pipeline.cli.main import app
from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.infer.bundle import BundleError, load_bundle
from pipeline.infer.bundle_config import BundleConfigError, content_hash, prepare
from pipeline.infer.classify import Classifier, class_names, task_of
from pipeline.infer.trust import TrustStore
from pipeline.lake import LakePaths, read_table
from pipeline.lake.identity import open_lake
from pipeline.lake.keys import LakeKeys
from pipeline.tensors.stage import run as tensors_run

KEY = b"z" * 32
MODELS = Path(__file__).resolve().parents[3] / "models"
runner = CliRunner()


def _torchvision_ok() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # the CUDA wheel beside a CPU torch fails at import (RuntimeError)
        return False
    return True


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Make any connection attempt fail loudly, and record it."""
    tried: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        tried.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return tried


def _density_bundle(root: Path) -> tuple[Path, str]:
    """breast_density_classification as published, with random weights. Without an
    importable torchvision (the CPU build matching torch), its TorchVisionFCModel is replaced
    by MONAI's DenseNet121 with the same input and output (3 channels, 4 classes); every
    transform stays as shipped. Returns the bundle and which network ran."""
    if _torchvision_ok():
        return zoo_bundle(
            "breast_density_classification", root, network_overrides={"pretrained": False}
        ), "inception_v3"
    path = zoo_bundle(
        "breast_density_classification",
        root,
        network_overrides={"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 3,
                           "out_channels": 4},
        drop=("model_name", "num_classes", "pool", "use_conv", "bias", "pretrained"),
    )  # fmt: skip
    cfg = json.loads((path / "configs" / "inference.json").read_text())
    cfg["network_def"] = {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 3,
                          "out_channels": 4}  # fmt: skip
    (path / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4))
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    meta["optional_packages_version"].pop("torchvision")
    (path / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4))
    return path, "DenseNet121 (torchvision not importable)"


# --------------------------------------------------------------------- classification


def test_pretrained_network_is_refused_before_anything_is_built() -> None:
    """TorchVisionFCModel(pretrained=True) would download ImageNet weights when built."""
    src = ZOO / "breast_density_classification" / "configs" / "inference.json"
    if not src.is_file():
        pytest.skip("../shared/bundles/model-zoo not found")
    raw = json.loads(src.read_text())
    with pytest.raises(BundleConfigError, match=r'"network_def#pretrained": false'):
        prepare(raw, check_target=lambda t, w: None)
    prepared = prepare(raw, overrides={"network_def#pretrained": False})
    assert prepared.config["network_def"]["pretrained"] is False
    assert [t["_target_"] for t in prepared.config["preprocessing"]["transforms"]] == [
        "EnsureChannelFirstd", "ScaleIntensityd", "Resized"]  # fmt: skip


def test_breast_density_as_shipped_never_tries_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _torchvision_ok():
        pytest.skip("torchvision not importable (install the build matching torch)")
    path = zoo_bundle(
        "breast_density_classification", tmp_path, network_overrides={"pretrained": False}
    )
    tried = _no_network(monkeypatch)
    with pytest.raises(BundleError, match="pretrained"):
        load_bundle(path, models_dir=MODELS)
    bundle = load_bundle(path, models_dir=MODELS, overrides={"network_def#pretrained": False})
    assert bundle.mode == "allow-list"
    assert task_of(bundle.metadata) == "classification"
    assert class_names(bundle.metadata) == {0: "A", 1: "B", 2: "C", 3: "D"}
    grey = np.random.default_rng(0).integers(0, 4096, (120, 80)).astype(np.uint16)
    [(key, probs)] = list(Classifier(bundle, device="cpu").classify([("mg", lambda: grey)]))
    assert key == "mg"
    assert probs.shape == (4,)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert not tried


DENSITY_REGISTRY = {
    "category": ["129715009", "SCT", "Breast composition"],
    "classes": {
        "A": ["129716005", "SCT", "Almost entirely fatty breast"],
        "B": ["129717001", "SCT", "Scattered fibroglandular breast densities"],
        "C": ["129718006", "SCT", "Heterogeneously dense breast"],
        "D": ["129719003", "SCT", "Extremely dense breast"],
    },
}


def _lake(root: Path) -> tuple[LakePaths, Path]:
    lake = LakePaths(root / "lake")
    open_lake(lake, LakeKeys(KEY), create=True)
    cfg = load_config(overrides={"compute": {"partition_size": 8, "device": "cpu"}}, environ={})
    crawl_run(cfg, lake, FolderSource(root / "archive"), run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    key_file = root / "k.key"
    key_file.write_text(f"pacsflow-key-v1\n{base64.b64encode(KEY).decode()}\n")
    key_file.chmod(0o600)
    return lake, key_file


def _cli(root: Path, lake: LakePaths, key_file: Path, model: str, registry: dict[str, Any],
         trust_store: Path | None = None) -> Path:  # fmt: skip
    (root / "models.yaml").write_text(yaml.safe_dump({"models": registry}))
    config = root / "run.yaml"
    infer: dict[str, Any] = {"registry": str(root / "models.yaml"), "model": model}
    if trust_store is not None:
        infer["trust_store"] = str(trust_store)
    config.write_text(yaml.safe_dump({"compute": {"device": "cpu"}, "infer": infer,
                                      "writeback": {"check_iod": True}}))  # fmt: skip
    common = ["--lake", str(lake.root), "--key-file", str(key_file), "--config", str(config)]
    started = time.perf_counter()
    tracemalloc.start()
    result = runner.invoke(app, ["infer", *common, "--workers", "1"])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"{model}: infer {time.perf_counter() - started:.1f} s, python peak {peak / 2**20:.0f} MiB"
    )
    assert result.exit_code == 0, result.output
    dest = root / "results"
    result = runner.invoke(app, ["writeback", *common, "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    return dest


def test_breast_density_over_mammograms_infer_and_writeback(tmp_path: Path) -> None:
    """pacsflow infer + writeback: a findings row per (image, class) with its probability,
    the top class marked; one SR per image with the qualitative evaluation and the four
    probabilities, referencing that image."""
    import highdicom as hd

    originals = mammograms(tmp_path / "archive")
    lake, key_file = _lake(tmp_path)
    bundle, network = _density_bundle(tmp_path / "bundles")
    labels = {
        name: {"category": DENSITY_REGISTRY["category"], "type": code}
        for name, code in DENSITY_REGISTRY["classes"].items()
    }
    registry = {"breast_density": {"bundle": str(bundle), "applies_to": "Modality = 'MG'",
                                   "overrides": {"network_def#pretrained": False},
                                   "labels": labels}}  # fmt: skip
    if network != "inception_v3":
        registry["breast_density"]["overrides"] = {}
    dest = _cli(tmp_path, lake, key_file, "breast_density", registry)

    rows = read_table(lake, "findings").to_pylist()
    assert len(rows) == 2 * 4  # two images, four classes
    by_image: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_image.setdefault(r["tensor_key"], []).append(r)
    for image_rows in by_image.values():
        image_rows.sort(key=lambda r: r["label_value"])
        assert [r["label"] for r in image_rows] == ["A", "B", "C", "D"]
        scores = [r["score"] for r in image_rows]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert [r["predicted"] for r in image_rows] == [s == max(scores) for s in scores]
        assert {r["task"] for r in image_rows} == {"classification"}
        measured = json.loads(image_rows[0]["measurements"])
        assert measured["activation"] == "sigmoid"  # the bundle's own: scores need not sum to 1
        print(f"{network}: sum of the 4 sigmoid scores {sum(scores):.3f}")
        assert all(r["mask_path"] is None for r in image_rows)

    srs = [pydicom.dcmread(p) for p in dest.rglob("*") if p.is_file()]
    assert len(srs) == 2
    sources = {pydicom.dcmread(p).SOPInstanceUID: p for p in originals}
    for ds in srs:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
        assert sr.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.90"  # the original study
        [group] = sr.content.get_image_measurement_groups()
        [evaluation] = group.get_qualitative_evaluations()
        assert evaluation.name.meaning == "Breast composition"
        assert evaluation.value.meaning in {c[2] for c in DENSITY_REGISTRY["classes"].values()}
        measurements = group.get_measurements()
        assert len(measurements) == 4
        assert all(0.0 <= float(m.value) <= 1.0 for m in measurements)
        [ref] = group.source_images
        assert ref.referenced_sop_instance_uid in sources  # the image itself, re-identified
    # the SRs' probabilities are the findings'
    finding_scores = sorted(round(r["score"], 6) for r in rows)
    sr_scores = sorted(
        round(float(m.value), 6)
        for ds in srs
        for m in hd.sr.Comprehensive3DSR.from_dataset(ds)
        .content.get_image_measurement_groups()[0]
        .get_measurements()
    )
    assert sr_scores == finding_scores


# ------------------------------------------------------------------- multi-sequence


BRATS_INPUTS = [
    {"name": "T1c", "where": "InversionTime < 1500 AND EchoTime < 5"},
    {"name": "T1", "where": "RepetitionTime < 1000 AND InversionTime IS NULL"},
    {"name": "T2", "where": "RepetitionTime >= 2000 AND InversionTime IS NULL"},
    {"name": "FLAIR", "where": "InversionTime >= 1500"},
]
ALTERED = ["49755003", "SCT", "Morphologically Altered Structure"]
BRATS_LABELS = {
    "necrotic tumour core": ["44132006", "SCT", "Abnormal"],
    "peritumoral edema": ["79654002", "SCT", "Edema"],
    "enhancing tumour": ["108369006", "SCT", "Neoplasm"],
}


def test_brats_four_sequences_infer_and_writeback(tmp_path: Path) -> None:
    """Study 1 has the four sequences (T2 on a shifted, coarser grid): they are stacked on
    T1c's grid and segmented; the SEG lies on T1c's frames. Study 2 lacks FLAIR: refused with
    that reason. The bundle's postprocessing (a $lambda) runs because the bundle is pinned in
    the registry and approved."""
    import highdicom as hd

    paths = brain_study(tmp_path / "archive", study=1)
    brain_study(tmp_path / "archive", study=2, sequences=("T1c", "T1", "T2"))
    lake, key_file = _lake(tmp_path)
    bundle = zoo_bundle("brats_mri_segmentation", tmp_path / "bundles")
    store = tmp_path / "trust.json"
    digest = content_hash(bundle)
    TrustStore(store).approve(digest, "brats_mri_segmentation", bundle)
    registry = {
        "brats": {
            "bundle": str(bundle),
            "bundle_sha256": digest,
            "applies_to": "Modality = 'MR' AND volume_ok",
            "inputs": BRATS_INPUTS,
            # the lambda writes BraTS' values, not the output channels
            "output_labels": dict(zip((1, 2, 4), BRATS_LABELS, strict=True)),
            # a small sliding window for the small test volumes (240x240x160 as shipped)
            "overrides": {"inferer#roi_size": [64, 64, 32]},
            "labels": {
                name: {"category": ALTERED, "type": code} for name, code in BRATS_LABELS.items()
            },
        }
    }
    dest = _cli(tmp_path, lake, key_file, "brats", registry, trust_store=store)

    rows = read_table(lake, "findings").to_pylist()
    assert {r["label"] for r in rows} == set(BRATS_LABELS)
    assert {r["label_value"] for r in rows} == {1, 2, 4}
    tensors = {t["tensor_key"]: t for t in read_table(lake, "tensors").to_pylist()}
    [key] = {r["tensor_key"] for r in rows}  # study 1 only, on its reference (T1c) tensor
    measured = json.loads(rows[0]["measurements"])
    assert measured["input_channels"] == ["T1c", "T1", "T2", "FLAIR"]
    assert measured["input_series"][0] == tensors[key]["SeriesInstanceUID"]
    assert tensors[key]["shape"] == [32, 64, 64]
    # issue #24: a multi-sequence model's findings carry the cohort keys too
    for r in rows:
        assert r["StudyInstanceUID"]
        assert r["patient_token"]
        assert r["Modality"] == "MR"
        assert r["FrameOfReferenceUID"] is not None
    runs = sorted((lake.root / "runs").rglob("*.json"))
    manifest = json.loads(runs[-2].read_text()) if len(runs) > 1 else {}
    assert "refused_studies" in json.dumps(manifest) or manifest == {}

    segs = [pydicom.dcmread(p) for p in dest.rglob("*") if p.is_file()]
    seg_ds = next((d for d in segs if d.Modality == "SEG"), None)
    if seg_ds is None:  # random weights may find nothing: then nothing is written back
        assert all(r["voxel_count"] == 0 for r in rows)
        return
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    t1c = {pydicom.dcmread(p).SOPInstanceUID for p in paths["T1c"]}
    referenced = {
        fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for fg in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced <= t1c


def test_brats_missing_sequence_is_refused_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.infer.stage import run as infer_run

    brain_study(tmp_path / "archive", study=2, sequences=("T1c", "T1", "T2"), shape=(8, 16, 16))
    lake, _ = _lake(tmp_path)
    bundle = zoo_bundle("brats_mri_segmentation", tmp_path / "bundles")
    registry = {"brats": {"bundle": str(bundle), "applies_to": "Modality = 'MR'",
                          "inputs": BRATS_INPUTS}}  # fmt: skip
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": registry}))
    cfg = load_config(
        overrides={"compute": {"device": "cpu"},
                   "infer": {"registry": str(tmp_path / "models.yaml"), "model": "brats",
                             "trust_store": str(tmp_path / "none.json")}},
        environ={},
    )  # fmt: skip
    caplog.set_level("WARNING")
    with pytest.raises(BundleError, match=r"Lambdad.*not on the allow-list.*models trust"):
        infer_run(cfg, lake, run_id="i0")  # not pinned: the lambda is code, refused
    registry["brats"]["drop"] = ["postprocessing#transforms#3"]  # or: no lambda, allow-list
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": registry}))
    result = infer_run(cfg, lake, run_id="i1")
    assert result.counts.seen == 0
    assert result.counts.extra["refused_studies"] == 1
    assert "FLAIR: no series matches" in caplog.text
    # a channel rule that is not the bundle's channels is a config error, said up front
    registry["brats"]["inputs"] = BRATS_INPUTS[::-1]
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": registry}))
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"T1c, T1, T2, FLAIR, in this order"):
        infer_run(cfg, lake, run_id="i2")
