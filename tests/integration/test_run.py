"""`pacsflow run` end to end: every stage from a folder archive to SEG + SR in a results folder;
a second run with nothing new does no work and exits 0; a new study is processed alone; on a
Dask cluster the research tables and result UIDs are the same as in-process."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from bundle_factory import make_bundle, write_registry
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.lake import LakePaths, read_table
from pipeline.lake.keys import LakeKeys

pytestmark = pytest.mark.integration

KEY = b"r" * 32


def _synth(out: Path, seed: int) -> None:
    from pipeline.synth import synthesize

    synthesize(
        out,
        patients=1,
        seed=seed,
        ct_slices=8,
        rows=40,
        columns=40,
        include_bad=False,
        include_mr=False,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run-it")
    _synth(root / "archive", 8180)
    bundle = make_bundle(root / "bundles" / "tiny", seed=2)
    write_registry(root / "models.yaml", bundle)
    key = root / "k.key"
    key.write_text(f"pacsflow-key-v1\n{base64.b64encode(KEY).decode()}\n")
    key.chmod(0o600)
    return root


def _config(root: Path, run: Path, **compute: Any) -> Path:
    path = run / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "lake": str(run / "lake"),
                "key_file": str(root / "k.key"),
                "source": {"uri": str(run / "archive")},
                "compute": {"workers": 1, "device": "cpu", **compute},
                "infer": {"model": "tiny", "registry": str(root / "models.yaml")},
                "writeback": {"dest": str(run / "results")},
            }
        )
    )
    return path


def _run(config: Path, *extra: str) -> Any:
    result = CliRunner().invoke(app, ["run", str(config), *extra])
    assert result.exit_code == 0, result.output
    return result


def _manifest(lake: Path, output: str) -> dict[str, Any]:
    run_id = output.strip().splitlines()[-1].split()[1].rstrip(":")
    return json.loads((lake / "runs" / f"{run_id}.json").read_text())


def _tables(lake: LakePaths) -> dict[str, Any]:
    keep = {
        "series": ("SeriesInstanceUID", "volume_ok"),
        "tensors": ("tensor_key", "checksum"),
        "findings": ("finding_key", "voxel_count", "mask_checksum"),
        "outbox": ("result_uid", "kind", "status"),
    }
    out = {}
    for name, cols in keep.items():
        rows = read_table(lake, name).to_pylist()
        if name == "outbox":
            rows = [r for r in rows if r["status"] == "confirmed"]
        if name == "tensors":
            rows = [r for r in rows if r["checksum"]]  # stored volumes, not refused series
        out[name] = sorted(tuple(r[c] for c in cols) for r in rows)
    return out


def test_run_end_to_end_then_nothing_new_then_one_new_study(setup: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(setup / "archive", run / "archive")
    config = _config(setup, run)
    first = _run(config)
    assert "verify: leaks found = 0" in first.output
    manifest = _manifest(run / "lake", first.output)
    assert set(manifest["stages"]) == {
        "crawl", "deid", "verify", "tensors", "infer", "writeback", "fhir",
    }  # fmt: skip
    # the FHIR export follows write-back into its embedded default folder (restricted zone)
    fhir = manifest["stages"]["fhir"]
    assert fhir["out"] == fhir["seen"] > 0
    assert (
        len(list((run / "lake" / "restricted" / "fhir" / "outbox").glob("*.json"))) == fhir["out"]
    )
    assert manifest["stages"]["verify"]["extra"] == {"leaks": 0}
    lake = LakePaths(run / "lake", keys=LakeKeys(KEY))
    tables = _tables(lake)
    assert tables["findings"]
    assert len(tables["outbox"]) == 2 * len(tables["tensors"])
    assert sorted(p.name for p in (run / "results").rglob("*.dcm"))
    # lineage: every CT object reaches a confirmed SEG and SR
    lineage = CliRunner().invoke(
        app,
        [
            "sql",
            "--lake",
            str(lake.root),
            "--key-file",
            str(setup / "k.key"),
            (
                "SELECT count(DISTINCT object_key) AS n FROM lineage "
                "WHERE result_kind = 'SEG' AND delivery_status = 'confirmed'"
            ),
        ],
    )
    assert lineage.exit_code == 0
    assert int(lineage.output.split()[-1]) > 0
    # the stages that read the restricted zone say so in the audit log, with counts only
    from pipeline.lake.audit import read_records

    reads = {
        r["details"]["stage"]: r["details"]
        for r in read_records(lake)
        if r["event"] == "restricted_read" and r["run_id"] == manifest["run_id"]
    }
    assert set(reads) >= {"deid", "tensors"}
    assert reads["deid"]["objects"] == manifest["stages"]["deid"]["seen"]
    # nothing new: no work, exit 0
    second = _run(config)
    stages = _manifest(run / "lake", second.output)["stages"]
    assert stages["crawl"]["skipped"] == stages["crawl"]["seen"]
    assert stages["deid"]["seen"] == 0
    assert stages["tensors"]["seen"] == 0
    assert stages["infer"]["seen"] == 0
    assert stages["writeback"]["extra"]["built"] == 0
    assert stages["fhir"]["skipped"] == stages["fhir"]["seen"] > 0  # nothing resent
    assert _tables(lake) == tables
    # one new study: only it is processed
    _synth(tmp_path / "more", 8181)
    shutil.copytree(tmp_path / "more", run / "archive" / "more")
    third = _run(config)
    stages = _manifest(run / "lake", third.output)["stages"]
    assert stages["tensors"]["extra"]["volumes"] >= 1
    assert stages["infer"]["seen"] == stages["tensors"]["extra"]["volumes"]
    after = _tables(lake)
    assert set(tables["findings"]) < set(after["findings"])


def test_run_on_a_dask_cluster_equals_in_process(
    setup: Path, tmp_path: Path, dask_cluster: str
) -> None:
    runs = {}
    for name, extra in (("here", ()), ("there", ("--scheduler", dask_cluster))):
        run = tmp_path / name
        run.mkdir()
        shutil.copytree(setup / "archive", run / "archive")
        # the same absolute archive path on both sides would be needed for equal object keys;
        # object keys differ by location, so compare what does not depend on it
        _run(_config(setup, run), *extra)
        runs[name] = _tables(LakePaths(run / "lake", keys=LakeKeys(KEY)))
    assert runs["here"]["findings"] == runs["there"]["findings"]
    assert runs["here"]["tensors"] == runs["there"]["tensors"]
    assert runs["here"]["outbox"] == runs["there"]["outbox"]


def test_run_refuses_a_second_run_on_the_same_lake(setup: Path, tmp_path: Path) -> None:
    from pipeline.lake.lock import lake_lock

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(setup / "archive", run / "archive")
    config = _config(setup, run)
    with lake_lock(LakePaths(run / "lake", keys=LakeKeys(KEY)), "someone else"):
        result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code != 0
    assert "another pacsflow run holds" in result.output


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_sigkill_at_several_points_then_rerun_equals_an_uninterrupted_run(
    setup: Path, tmp_path: Path
) -> None:
    """`pacsflow run` SIGKILLed at several points (each a fresh lake), then run again to the
    end: tensors, findings and confirmed result objects are those of an uninterrupted run, with
    no duplicate row and nothing missing; the dead run's lock is taken over."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def argv(config: Path) -> list[str]:
        return [sys.executable, "-m", "pipeline.cli.main", "run", str(config)]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    shutil.copytree(setup / "archive", ref_dir / "archive")
    t0 = time.monotonic()
    done = subprocess.run(
        argv(_config(setup, ref_dir)),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    full = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-2000:]
    reference = _tables(LakePaths(ref_dir / "lake", keys=LakeKeys(KEY)))
    for fraction in (0.2, 0.45, 0.7, 0.9):
        run = tmp_path / f"kill-{fraction}"
        run.mkdir()
        shutil.copytree(setup / "archive", run / "archive")
        config = _config(setup, run)
        proc = subprocess.Popen(
            argv(config), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(full * fraction)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        again = subprocess.run(
            argv(config), env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert again.returncode == 0, (fraction, again.stderr[-2000:])
        lake = LakePaths(run / "lake", keys=LakeKeys(KEY))
        got = _tables(lake)
        assert got["tensors"] == reference["tensors"], fraction
        assert got["findings"] == reference["findings"], fraction
        assert got["outbox"] == reference["outbox"], fraction
        findings = read_table(lake, "findings").to_pylist()
        assert len({f["finding_key"] for f in findings}) == len(findings), fraction
        assert len(list((run / "results").rglob("*.dcm"))) == len(reference["outbox"])
