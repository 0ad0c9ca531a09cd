"""pipeline.infer.bundle: local bundles only, validated, allow-list by default."""

from __future__ import annotations

import json
import socket
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import inference, make_bundle

from pipeline.infer.bundle import BundleError, load_bundle
from pipeline.infer.engine import Segmenter

MODELS = Path(__file__).resolve().parents[3] / "models"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network at all, and MONAI's downloader booby-trapped."""

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import monai.bundle

    monkeypatch.setattr(monai.bundle, "download", refuse)
    import monai.bundle.scripts

    monkeypatch.setattr(monai.bundle.scripts, "download", refuse)


def _volume(depth: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 1000, (depth, 40, 48)).astype(np.int16)
    return arr, np.diag([0.8, 0.7, 2.5, 1.0])


def test_assembled_bundle_loads_offline_and_runs(tmp_path: Path, offline: None) -> None:
    path = make_bundle(tmp_path / "tiny")
    bundle = load_bundle(path, models_dir=MODELS)
    assert bundle.name == "tiny"
    assert bundle.version == "0.1.0"
    assert bundle.labels == {1: "soft_tissue", 2: "adipose_tissue", 3: "bone", 4: "lung"}
    assert bundle.spatial_dims == 2
    assert bundle.weights_sha256.startswith("sha256:")
    assert bundle.mode == "allow-list"
    arr, affine = _volume()
    ((key, labels),) = list(Segmenter(bundle, device="cpu").segment([("v", lambda: (arr, affine))]))
    assert key == "v"
    assert labels.shape == arr.shape
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}


def test_zip_bundle_loads(tmp_path: Path, offline: None) -> None:
    folder = make_bundle(tmp_path / "zipped")
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.rglob("*"):
            zf.write(f, Path("zipped") / f.relative_to(folder))
    bundle = load_bundle(archive, models_dir=MODELS, extract_dir=tmp_path / "x")
    assert bundle.name == "zipped"
    assert (bundle.path / "configs" / "metadata.json").is_file()
    again = load_bundle(archive, models_dir=MODELS, extract_dir=tmp_path / "x")
    assert again.path == bundle.path  # extracted once, by content


def test_zip_with_unsafe_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(BundleError, match="unsafe member path"):
        load_bundle(archive, models_dir=MODELS, extract_dir=tmp_path / "x")
    assert not (tmp_path / "escape.txt").exists()


def test_bundle_without_weights_fails_clearly(tmp_path: Path, offline: None) -> None:
    path = make_bundle(tmp_path / "zoo", weights=False)
    with pytest.raises(BundleError, match=r"has no weights.*never downloads") as info:
        load_bundle(path, models_dir=MODELS)
    assert str(path / "models" / "model.pt") in str(info.value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.pop("network_data_format"), "network_data_format"),
        (lambda m: m.update(version=3), "version"),
        (lambda m: m.update(version="latest"), "version"),
        (
            lambda m: m["network_data_format"]["inputs"]["image"].update(num_channels=0),
            "num_channels",
        ),
    ],
    ids=["no-format", "version-number", "version-word", "zero-channels"],
)
def test_malformed_metadata_is_rejected(tmp_path: Path, change: Any, match: str) -> None:
    path = make_bundle(tmp_path / "bad")
    meta_path = path / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=f"not a valid bundle metadata.*{match}"):
        load_bundle(path, models_dir=MODELS)


def test_metadata_that_is_not_json_is_rejected(tmp_path: Path) -> None:
    path = make_bundle(tmp_path / "bad")
    (path / "configs" / "metadata.json").write_text("{version: 1")
    with pytest.raises(BundleError, match=r"metadata\.json is not valid JSON"):
        load_bundle(path, models_dir=MODELS)


def test_allow_list_mode_evaluates_no_code(tmp_path: Path) -> None:
    cfg = inference()
    marker = tmp_path / "ran"
    # a list, but only after running code: refused in allow-list mode, run when trusted
    cfg["network_def"]["channels"] = f"$open({str(marker)!r}, 'w').close() or [4, 8]"
    path = make_bundle(tmp_path / "expr", config=cfg, weights=False)
    make_bundle(tmp_path / "plain")  # weights of the same network
    (path / "models" / "model.pt").write_bytes((tmp_path / "plain/models/model.pt").read_bytes())
    with pytest.raises(
        BundleError, match=r"network_def\.channels: .*a call \(.*close\(\.\.\.\)\) is code"
    ):
        load_bundle(path, models_dir=MODELS)
    assert not marker.exists()
    trusted = load_bundle(path, models_dir=MODELS, mode="trusted")
    assert trusted.mode == "trusted"
    assert marker.exists()


def test_allow_list_resolves_data_references_and_expressions(tmp_path: Path) -> None:
    """What model-zoo configs use everywhere: `@` references to plain values and `$`
    expressions that only combine data; resolved without running code."""
    cfg = inference()
    cfg["image_key"] = "image"
    cfg["sizes"] = {"small": [4, 8], "large": [8, 16]}
    cfg["big"] = False
    cfg["network_def"]["channels"] = "$@sizes#large if @big else @sizes#small"
    for t in cfg["preprocessing"]["transforms"]:
        t["keys"] = "@image_key"
    path = make_bundle(tmp_path / "refs", config=cfg)
    bundle = load_bundle(path, models_dir=MODELS)
    assert bundle.mode == "allow-list"


def test_allow_list_refuses_unknown_targets(tmp_path: Path) -> None:
    cfg = inference()
    cfg["preprocessing"]["transforms"].append({"_target_": "os.system", "command": "true"})
    path = make_bundle(tmp_path / "evil", config=cfg)
    with pytest.raises(BundleError, match=r"'os\.system' is not on the allow-list"):
        load_bundle(path, models_dir=MODELS)


def test_torchscript_needs_trust(tmp_path: Path) -> None:
    path = make_bundle(tmp_path / "ts", weights=False)
    (path / "models" / "model.ts").write_bytes(b"not really torchscript")
    with pytest.raises(BundleError, match="TorchScript, a program"):
        load_bundle(path, models_dir=MODELS)


def test_weights_that_do_not_fit_are_explained(tmp_path: Path) -> None:
    other = make_bundle(tmp_path / "three", channels=3)
    path = make_bundle(tmp_path / "five")
    (path / "models" / "model.pt").write_bytes((other / "models" / "model.pt").read_bytes())
    with pytest.raises(BundleError, match="the weights do not fit network_def"):
        load_bundle(path, models_dir=MODELS)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    import torch

    path = make_bundle(tmp_path / "pickled", weights=False)
    torch.save({"model": object()}, path / "models" / "model.pt")  # needs full unpickling
    with pytest.raises(BundleError, match="weights_only=True"):
        load_bundle(path, models_dir=MODELS)


def test_unknown_name_lists_the_known_models(tmp_path: Path) -> None:
    make_bundle(tmp_path / "models" / "alpha")
    with pytest.raises(BundleError, match=r"no bundle 'beta'.*alpha"):
        load_bundle("beta", models_dir=tmp_path / "models")
