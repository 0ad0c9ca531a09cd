"""MONAI model-zoo bundles as published (../shared/bundles/model-zoo, random weights from their
own network_def) load and run as shipped: pacsflow feeds the volume where the bundle's loader
would read a file, drops its savers, keeps every other transform (issue #22, §1 and §6)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import inference, make_bundle, zoo_bundle

from pipeline.infer.bundle import BundleError, load_bundle
from pipeline.infer.engine import Segmenter

MODELS = Path(__file__).resolve().parents[3] / "models"


def _ct(shape: tuple[int, int, int] = (20, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A small CT-like volume: a bright box in soft tissue; 2 mm voxels (LPS affine)."""
    rng = np.random.default_rng(0)
    arr = rng.normal(40, 20, shape).astype(np.int16)
    arr[5:15, 10:30, 10:30] += 200
    return arr, np.diag([2.0, 2.0, 2.5, 1.0])


def _names(compose: object) -> list[str]:
    return [type(t).__name__ for t in getattr(compose, "transforms", ())]


def test_spleen_runs_as_shipped_in_allow_list_mode(tmp_path: Path) -> None:
    """Was: 'preprocessing.transforms[0].keys: '@' expressions ... not allowed' (allow-list),
    and with the old trust flag LoadImaged got a MetaTensor instead of a path."""
    path = zoo_bundle("spleen_ct_segmentation", tmp_path)
    bundle = load_bundle(path, models_dir=MODELS)
    assert bundle.mode == "allow-list"
    assert bundle.labels == {1: "spleen"}
    pre, post = _names(bundle.preprocessing), _names(bundle.postprocessing)
    assert "LoadImaged" not in pre
    assert pre[0] == "EnsureChannelFirstd"
    assert pre[1:] == ["Orientationd", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    assert "SaveImaged" not in post
    assert post == ["Activationsd", "Invertd", "AsDiscreted"]
    arr, affine = _ct()
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the bundle's SaveImaged would write ./eval
    try:
        [(key, labels)] = Segmenter(bundle, device="cpu").segment([("v", lambda: (arr, affine))])
    finally:
        os.chdir(cwd)
    assert key == "v"
    assert labels.shape == arr.shape
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    assert not (tmp_path / "eval").exists()
    assert not (path / "eval").exists()


def test_wholebody_lowres_variant_is_chosen_in_the_registry(tmp_path: Path) -> None:
    """Was: pacsflow looked only for models/model.pt; the low-res variant names its weights
    model_lowres.pt and is chosen by displayable_configs#highres."""
    path = zoo_bundle("wholeBody_ct_segmentation", tmp_path, weights="model_lowres.pt")
    with pytest.raises(
        BundleError, match=r"models/model\.pt is absent \(found by checkpointloader"
    ):
        load_bundle(path, models_dir=MODELS)
    bundle = load_bundle(path, models_dir=MODELS, overrides={"displayable_configs#highres": False})
    assert len(bundle.labels) == 104
    spacing = next(t for t in bundle.preprocessing.transforms if type(t).__name__ == "Spacingd")
    assert list(spacing.spacing_transform.pixdim) == [3.0, 3.0, 3.0]  # the low-res pixdim
    assert "device" not in json.dumps(str(bundle.inferer.device or ""))  # pacsflow places it


def test_obsolete_keyword_is_explained_with_the_fix(tmp_path: Path) -> None:
    """Was: 'unexpected TypeError (a bug ...)' for SwinUNETR's img_size on MONAI >= 1.5."""
    path = zoo_bundle("swin_unetr_btcv_segmentation", tmp_path, drop=("img_size",))
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    meta["optional_packages_version"].pop("einops", None)  # this test is about the keyword
    (path / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError) as err:
        load_bundle(path, models_dir=MODELS)
    text = str(err.value)
    assert "rejects the keyword 'img_size'" in text
    assert "MONAI 1.4.0" in text
    assert 'drop: ["network_def#img_size"]' in text
    bundle = load_bundle(path, models_dir=MODELS, drop=("network_def#img_size",))
    assert len(bundle.labels) == 13


def test_missing_package_is_named_before_any_volume(tmp_path: Path) -> None:
    """Was: SwinUNETR built without einops and failed on the first volume."""
    path = make_bundle(tmp_path / "needs")
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    meta["optional_packages_version"] = {"pytorch-ignite": "0.4.11", "nopkg-xyz": "1.2"}
    (path / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"needs nopkg-xyz==1\.2 .*`pip install nopkg-xyz==1\.2`"):
        load_bundle(path, models_dir=MODELS)


def test_a_failing_expression_names_its_real_cause(tmp_path: Path) -> None:
    """Was: "Failed to evaluate ConfigExpression: " with the cause (No module named ...) cut."""
    cfg = inference()
    cfg["network_def"]["channels"] = "$__import__('nopkg_xyz').channels"
    path = make_bundle(tmp_path / "expr", config=cfg, weights=False)
    (path / "models" / "model.pt").write_bytes(b"")
    with pytest.raises(BundleError, match=r"network_def: needs the package 'nopkg_xyz'"):
        load_bundle(path, models_dir=MODELS, mode="trusted")


def test_a_bundle_for_a_newer_monai_is_refused(tmp_path: Path) -> None:
    path = make_bundle(tmp_path / "future")
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    meta["monai_version"] = "99.1.0"
    (path / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"made for MONAI 99\.1\.0, newer than the installed"):
        load_bundle(path, models_dir=MODELS)
