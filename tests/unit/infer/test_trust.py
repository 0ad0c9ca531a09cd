"""Trust by pin, not by flag (issue #22, §2): a bundle's config code runs only when the registry
pins its content hash and a person approved that hash; anything else runs in allow-list mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import inference, make_bundle

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.infer.bundle import BundleError
from pipeline.infer.bundle_config import content_hash
from pipeline.infer.registry import load_registry
from pipeline.infer.stage import load_entry_bundle
from pipeline.infer.trust import TrustStore, decide


def _code_bundle(root: Path) -> Path:
    """A bundle whose network_def needs code (a call) to build."""
    cfg = inference()
    cfg["network_def"]["channels"] = "$list(map(int, ['4', '8']))"
    path = make_bundle(root / "coded", config=cfg)
    (path / "scripts").mkdir()
    (path / "scripts" / "__init__.py").write_text("")
    return path


def _setup(tmp_path: Path, pin: str | None) -> tuple[Path, Path]:
    bundle = _code_bundle(tmp_path)
    registry = tmp_path / "models.yaml"
    body = {"models": {"coded": {"bundle": str(bundle)}}}
    if pin:
        body["models"]["coded"]["bundle_sha256"] = pin
    registry.write_text(json.dumps(body))
    config = tmp_path / "pacsflow.yaml"
    config.write_text(
        json.dumps({"infer": {"registry": str(registry), "trust_store": str(tmp_path / "t.json")}})
    )
    return bundle, config


def test_unpinned_pinned_changed_and_approved(tmp_path: Path) -> None:
    bundle = _code_bundle(tmp_path)
    store = TrustStore(tmp_path / "trust.json")
    digest = content_hash(bundle)
    assert decide(bundle, None, store).mode == "allow-list"
    assert "not approved" in decide(bundle, digest, store).reason
    store.approve(digest, "coded", bundle)
    decision = decide(bundle, digest, store)
    assert decision.mode == "trusted"
    assert "approved by" in decision.reason
    (bundle / "scripts" / "helper.py").write_text("x = 1\n")  # one more file: another hash
    changed = decide(bundle, digest, store)
    assert changed.mode == "allow-list"
    assert "changed since it was pinned" in changed.reason
    # the weights are not part of the content hash (they have their own in the model identity)
    (bundle / "scripts" / "helper.py").unlink()
    (bundle / "models" / "model.pt").write_bytes((bundle / "models" / "model.pt").read_bytes())
    assert content_hash(bundle) == digest


def test_code_runs_only_after_pin_and_approval(tmp_path: Path) -> None:
    bundle, config = _setup(tmp_path, pin=None)
    cfg = load_config(config)
    entry = load_registry(cfg.infer.registry).entry("coded")
    with pytest.raises(
        BundleError, match=r"network_def\.channels: .*a call \(list\(\.\.\.\)\) is code"
    ):
        load_entry_bundle(cfg, entry, tmp_path / "x")

    # `pacsflow models trust` approves it; the registry must pin it too
    cli = [sys.executable, "-m", "pipeline.cli.main"]
    out = subprocess.run(
        [*cli, "-q", "models", "trust", "coded", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    digest = content_hash(bundle)
    assert f"approved {digest}" in out
    assert "the registry does not pin it yet" in out
    with pytest.raises(BundleError, match="is code"):  # approved, not pinned: still refused
        load_entry_bundle(cfg, entry, tmp_path / "x")

    _, config = _setup(tmp_path / "pinned", pin=digest)
    cfg = load_config(config)
    (tmp_path / "pinned" / "t.json").write_bytes((tmp_path / "t.json").read_bytes())
    entry = load_registry(cfg.infer.registry).entry("coded")
    bundle2, decision = load_entry_bundle(cfg, entry, tmp_path / "x")
    assert decision.mode == "trusted"
    assert bundle2.mode == "trusted"
    check = subprocess.run(
        [*cli, "-q", "models", "check", "coded", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "mode:     trusted (pinned and approved by" in check

    revoked = subprocess.run(
        [*cli, "-q", "models", "revoke", "coded", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"revoked {digest}" in revoked
    with pytest.raises(BundleError, match="is code"):
        load_entry_bundle(cfg, entry, tmp_path / "x")


def test_the_old_trust_flag_and_setting_say_what_replaced_them(tmp_path: Path) -> None:
    config = tmp_path / "old.yaml"
    config.write_text("infer:\n  bundle_code: trusted\n")
    with pytest.raises(ConfigError, match=r"bundle_code was removed.*pacsflow models trust"):
        load_config(config)
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "infer", "--lake", str(tmp_path / "lake"),
         "--trust-bundle-code"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode == 2
    assert "--trust-bundle-code was removed" in run.stderr


def test_two_trusted_bundles_each_import_their_own_scripts(tmp_path: Path) -> None:
    """Every model-zoo bundle names its package `scripts`: the second trusted bundle loaded in
    a process imported the first one's (found by the full suite: a detection bundle failed
    after a segmentation bundle with scripts/ had run)."""
    from pipeline.infer.bundle import load_bundle

    bundles = []
    for name, channels in (("first", [4, 8]), ("second", [8, 16])):
        cfg = inference()
        cfg["network_def"] = {"_target_": f"scripts.{name}_net.make", "channels": channels}
        path = make_bundle(tmp_path / name, config=cfg, weights=False)
        (path / "scripts").mkdir()
        (path / "scripts" / "__init__.py").write_text("")
        (path / "scripts" / f"{name}_net.py").write_text(
            "from monai.networks.nets import UNet\n\n\n"
            "def make(channels):\n"
            "    return UNet(spatial_dims=2, in_channels=1, out_channels=5, channels=channels,\n"
            "                strides=[2], num_res_units=0, norm='batch')\n"
        )
        import torch
        from monai.networks.nets import UNet

        net = UNet(spatial_dims=2, in_channels=1, out_channels=5, channels=channels,
                   strides=[2], num_res_units=0, norm="batch")  # fmt: skip
        torch.save(net.state_dict(), path / "models" / "model.pt")
        bundles.append(load_bundle(path, models_dir=tmp_path, mode="trusted"))
    assert [list(b.network.channels) for b in bundles] == [[4, 8], [8, 16]]
