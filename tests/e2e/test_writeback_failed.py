"""Issue #20 §2: a write-back that failed for every volume fails the command, with the count.

Finding: with volumes that write-back cannot map onto the original frames (here: tensors
reoriented to RAS by the configuration, a real setting), every volume was refused and the
run said `succeeded`, exit 0. And a PACS that is not there (a DIMSE destination on a
loopback port nobody listens on) printed "written -4, quarantined 8" for 4 volumes.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from bundle_factory import make_bundle, write_registry

from pipeline.lake import LakePaths, list_manifests

pytestmark = pytest.mark.slow

KEY = b"f" * 32


def _settings(root: Path) -> dict[str, Any]:
    return {
        "compute": {"partition_size": 8, "device": "cpu", "workers": 1},
        "infer": {"model": "tiny", "registry": str(root / "models.yaml")},
        "tensors": {"orientation": "RAS"},
        "writeback": {"backoff_s": 0.05, "backoff_max_s": 0.1, "retries": 1},
        "audit": {"witness": "none"},
        "logging": {"level": "WARNING"},
    }


@pytest.fixture(scope="module")
def reoriented(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A lake whose volumes were reoriented to RAS, with findings; its config and key."""
    from pipeline.config import load_config
    from pipeline.connectors import FolderSource
    from pipeline.crawl import run as crawl_run
    from pipeline.deid.stage import run as deid_run
    from pipeline.infer.stage import run as infer_run
    from pipeline.lake.identity import open_lake
    from pipeline.lake.keys import LakeKeys
    from pipeline.synth import synthesize
    from pipeline.tensors.stage import run as tensors_run

    root = tmp_path_factory.mktemp("writeback-failed")
    synthesize(
        root / "archive", patients=1, seed=2020, ct_slices=8, rows=40, columns=40,
        include_bad=False, include_mr=False,
    )  # fmt: skip
    write_registry(root / "models.yaml", make_bundle(root / "bundles" / "tiny", seed=4))
    settings = _settings(root)
    cfg = load_config(overrides=settings, environ={})
    lake = LakePaths(root / "lake")
    open_lake(lake, LakeKeys(KEY), create=True)
    crawl_run(cfg, lake, FolderSource(root / "archive"), run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    infer_run(cfg, lake, run_id="i")
    config = root / "wb.yaml"
    config.write_text(yaml.safe_dump(settings))
    key_file = root / "k.key"
    key_file.write_text(f"pacsflow-key-v1\n{base64.b64encode(KEY).decode()}\n")
    key_file.chmod(0o600)
    return lake.root, config, key_file


def _writeback(lake: Path, config: Path, key: Path, dest: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pipeline.cli.main", "writeback", "--lake", str(lake),
            "--dest", dest, "--key-file", str(key), "--config", str(config)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW")}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_every_volume_refused_fails_the_command_with_the_count(
    reoriented: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    lake, config, key = reoriented
    done = _writeback(lake, config, key, str(tmp_path / "results"))
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("pacsflow: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "writeback: 4 of 4 volume(s) refused" in errors[0], errors[0]
    assert "written 0, quarantined 4" in done.stdout, done.stdout
    last = list_manifests(LakePaths(lake))[-1]
    assert last.status == "failed"


def test_an_unreachable_pacs_counts_volumes_and_fails(
    reoriented: tuple[Path, Path, Path], tmp_path: Path, unused_tcp_port: int
) -> None:
    """The same lake with its volumes kept native would be sent; here nothing listens at the
    destination: the objects stay pending, the counts are of volumes."""
    lake, config, key = reoriented
    settings = yaml.safe_load(config.read_text())
    settings["tensors"] = {"orientation": "native"}
    native = tmp_path / "native.yaml"
    native.write_text(yaml.safe_dump(settings))
    from pipeline.config import load_config
    from pipeline.lake import LakePaths as Paths
    from pipeline.tensors.stage import run as tensors_run

    copy = tmp_path / "lake"
    subprocess.run(["cp", "-a", str(lake), str(copy)], check=True)
    cfg = load_config(native, environ={})
    tensors_run(cfg, Paths(copy), run_id="t2")  # native volumes beside the RAS ones
    from pipeline.infer.stage import run as infer_run

    infer_run(cfg, Paths(copy), run_id="i2")
    done = _writeback(copy, native, key, f"dimse://NOBODY@127.0.0.1:{unused_tcp_port}")
    assert done.returncode == 1, done.stdout + done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("writeback: seen"))
    assert " -" not in line, line  # no negative counts
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("pacsflow: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "not confirmed at the destination" in errors[0], errors[0]
