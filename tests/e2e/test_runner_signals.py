"""The one runner, as an operator meets it: the lake's lock for every stage, SIGINT/SIGTERM
mid-stage (exit 130/143 within seconds, manifest ``cancelled``, a rerun completes the same
lake), a second signal stopping at once, and a killed run shown and marked ``abandoned``.

Each stage is stopped in its middle without a race: the test freezes the process (SIGSTOP)
the moment it logs its total ("<stage>: N to do"), queues the signal, and lets it go on
(SIGCONT), so the signal lands while the stage has all its work ahead of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from bundle_factory import make_bundle, write_registry

from pipeline.lake import LakePaths, list_manifests, read_table
from pipeline.lake.audit import read_records
from pipeline.lake.keys import LakeKeys, generate_key_file, load_key

pytestmark = pytest.mark.slow

EXE = Path(sys.executable).parent / "pacsflow"
STAGES = ("crawl", "deid", "verify", "tensors", "infer", "writeback")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An archive (enough objects for many small batches), a model, and one key."""
    from pipeline.synth import synthesize

    if not EXE.exists():
        pytest.skip("the pacsflow console script is not installed (pip install -e .)")
    root = tmp_path_factory.mktemp("runner")
    synthesize(
        root / "archive", patients=4, seed=19, ct_slices=24, rows=48, columns=48,
        include_bad=True, include_mr=True,
    )  # fmt: skip
    write_registry(root / "models.yaml", make_bundle(root / "bundles" / "tiny", seed=4))
    generate_key_file(root / "lake.key")
    return root


def _config(world: Path, name: str) -> Path:
    config = world / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "lake": str(world / name),
                "key_file": str(world / "lake.key"),
                "source": {"uri": str(world / "archive")},
                "compute": {"workers": 1, "device": "cpu", "partition_size": 8},
                "infer": {"model": "tiny", "registry": str(world / "models.yaml"),
                          "volumes_per_task": 1},
                "writeback": {"dest": str(world / f"{name}-results")},
            }
        )
    )  # fmt: skip
    return config


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW")}
    env["PACSFLOW__AUDIT__WITNESS"] = "none"
    return env


def _cmd(stage: str, config: Path, *extra: str) -> list[str]:
    return [str(EXE), stage, "--config", str(config), *extra]


def _finish(args: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done


class _Stopped:
    """A command started and frozen (SIGSTOP) as soon as its stderr says ``trigger``."""

    def __init__(self, args: list[str], trigger: str) -> None:
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
        )
        self.err: list[str] = []
        self._seen = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                if not self._seen.is_set() and trigger in line:
                    self.proc.send_signal(signal.SIGSTOP)
                    self._seen.set()
                self.err.append(line)

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not self._seen.wait(300):
            self.close()
            raise AssertionError(f"{args[1]} never said {trigger!r}: {''.join(self.err)[-2000:]}")

    def signal(self, *signums: int, gap: float = 0.0) -> tuple[int, float]:
        """Queue the signals, let the process go on; return (exit code, seconds to exit)."""
        self.proc.send_signal(signums[0])
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGCONT)
        for s in signums[1:]:
            time.sleep(gap)
            self.proc.send_signal(s)
        code = self.proc.wait(60)
        seconds = time.monotonic() - t0
        self._reader.join(10)
        self.close()
        return code, seconds

    def close(self) -> None:
        """Close the pipes (and end the process when it is still there)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._reader.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def _last_manifest(lake: Path) -> dict[str, Any]:
    runs = sorted((lake / "runs").glob("*.json"))
    return json.loads(runs[-1].read_text())


def _snapshot(lake: Path, key: Path) -> dict[str, list[tuple[Any, ...]]]:
    """What a completed lake holds, without run ids and times: every table's identity
    columns, sorted (duplicates would show as extra rows)."""
    paths = LakePaths(lake, keys=LakeKeys(load_key(key)))
    columns = {
        "index": ["object_key", "fingerprint", "state"],
        "vault": ["object_key", "sop_pseudonym", "series_pseudonym"],
        "instances": ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"],
        "tensors": ["SeriesInstanceUID", "volume_index", "checksum", "status"],
        "findings": ["tensor_key", "label", "voxels"],
        "outbox": ["result_uid", "status"],
    }
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table, cols in columns.items():
        t = read_table(paths, table)
        keep = [c for c in cols if c in t.column_names]
        rows = t.select(keep).to_pylist()
        out[table] = sorted(tuple(str(r[c]) for c in keep) for r in rows)
    q = read_table(paths, "quarantine")
    out["quarantine"] = sorted(
        (str(r["object_key"]), str(r["stage"]), str(r["reason"])) for r in q.to_pylist()
    )
    return out


@pytest.fixture(scope="module")
def reference(world: Path) -> Path:
    """The lake every stage made without interruption, one command after another."""
    config = _config(world, "reference")
    for stage in STAGES:
        _finish(_cmd(stage, config))
    return world / "reference"


def test_sigint_in_each_stage_cancels_within_seconds_and_a_rerun_completes_the_same(
    world: Path, reference: Path
) -> None:
    config = _config(world, "interrupted")
    lake = world / "interrupted"
    for stage in STAGES:
        stopped = _Stopped(_cmd(stage, config), f"{stage}: ")
        if stage != "crawl":  # the crawl's first line is its listing: the total comes next
            assert " to do" in stopped.stderr.splitlines()[-1], stopped.stderr[-1000:]
        code, seconds = stopped.signal(signal.SIGINT)
        assert code == 130, (stage, code, stopped.stderr[-3000:])
        assert seconds < 5, (stage, seconds)
        assert "cancelled by SIGINT" in stopped.stderr, stopped.stderr[-2000:]
        assert "Traceback" not in stopped.stderr
        manifest = _last_manifest(lake)
        assert (manifest["command"], manifest["status"]) == (stage, "cancelled")
        assert manifest["error"] == "SIGINT"
        _finish(_cmd(stage, config))  # the rerun resumes
        assert _last_manifest(lake)["status"] == "succeeded"
    assert _snapshot(lake, world / "lake.key") == _snapshot(reference, world / "lake.key")
    statuses = [m.status for m in list_manifests(LakePaths(lake))]
    assert statuses.count("cancelled") == len(STAGES)
    assert statuses.count("succeeded") == len(STAGES)


def test_sigterm_on_a_dask_cluster_cancels_cleanly(world: Path, reference: Path) -> None:
    """The issue's case: tensors on 2 worker processes, SIGTERM -> exit 143 within seconds,
    no leaked semaphores, manifest ``cancelled``; the rerun completes."""
    config = _config(world, "sigterm")
    for stage in ("crawl", "deid"):
        _finish(_cmd(stage, config))
    stopped = _Stopped(_cmd("tensors", config, "--workers", "2"), "tensors: ")
    code, seconds = stopped.signal(signal.SIGTERM)
    assert code == 143, stopped.stderr[-3000:]
    assert seconds < 5, seconds
    assert "leaked semaphore" not in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert _last_manifest(world / "sigterm")["status"] == "cancelled"
    _finish(_cmd("tensors", config, "--workers", "2"))
    done = _snapshot(world / "sigterm", world / "lake.key")
    assert done["tensors"] == _snapshot(reference, world / "lake.key")["tensors"]


def test_a_second_sigint_stops_at_once(world: Path) -> None:
    config = _config(world, "twice")
    _finish(_cmd("crawl", config))
    _finish(_cmd("deid", config))
    stopped = _Stopped(_cmd("tensors", config, "--workers", "2"), "tensors: ")
    code, seconds = stopped.signal(signal.SIGINT, signal.SIGINT, gap=0.05)
    assert code == 130, stopped.stderr[-3000:]
    assert seconds < 5
    assert "SIGINT again: stopping at once" in stopped.stderr
    manifest = _last_manifest(world / "twice")
    assert manifest["status"] == "cancelled"
    assert "twice" in manifest["error"]
    _finish(_cmd("tensors", config))  # what it left behind does not stop the rerun


def test_a_single_stage_is_refused_while_a_run_holds_the_lake(world: Path, reference: Path) -> None:
    ready = world / "held"
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from pipeline.lake import LakePaths
        from pipeline.lake.lock import lake_lock
        with lake_lock(LakePaths(Path({str(reference)!r})), "run"):
            Path({str(ready)!r}).write_text("held")
            time.sleep(600)
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline
            assert holder.poll() is None
            time.sleep(0.05)
        config = _config(world, "reference")
        before = len(list((reference / "runs").glob("*.json")))
        for stage in (*STAGES, "run"):
            args = [str(EXE), "run", str(config)] if stage == "run" else _cmd(stage, config)
            done = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=120)
            assert done.returncode == 1, (stage, done.stdout, done.stderr)
            assert f"another pacsflow run holds {reference}" in done.stderr, done.stderr
            assert f"pid {holder.pid}" in done.stderr
            assert ", run since" in done.stderr
        assert len(list((reference / "runs").glob("*.json"))) == before  # nothing recorded
        status = subprocess.run(
            [str(EXE), "status", "--config", str(config)], capture_output=True, text=True,
            env=_env(), timeout=120,
        )  # fmt: skip
        assert f"running now: pid {holder.pid}" in status.stdout, status.stdout
    finally:
        holder.kill()
        holder.wait(30)


def test_a_killed_run_is_shown_and_marked_abandoned(world: Path, reference: Path) -> None:
    config = _config(world, "killed")
    lake = world / "killed"
    stopped = _Stopped([str(EXE), "run", str(config)], "deid: ")
    stopped.proc.kill()  # SIGKILL: nothing of the process runs any more
    stopped.close()
    dead = _last_manifest(lake)
    assert dead["status"] == "running"  # as the dead process left it

    status = subprocess.run(
        [str(EXE), "status", "--config", str(config), "--json"], capture_output=True,
        text=True, env=_env(), timeout=120,
    )  # fmt: skip
    report = json.loads(status.stdout)["lake"]
    assert report["abandoned"] == [dead["run_id"]]
    assert report["last_run"]["status"] == "abandoned"
    assert report["running_now"] is None

    rerun = subprocess.run(
        [str(EXE), "run", str(config)], capture_output=True, text=True, env=_env(), timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"run {dead['run_id']} did not finish" in rerun.stderr
    marked = json.loads((lake / "runs" / f"{dead['run_id']}.json").read_text())
    assert marked["status"] == "abandoned"
    audit = read_records(LakePaths(lake))
    assert any(
        r.get("event") == "run_abandoned" and r.get("run_id") == dead["run_id"] for r in audit
    )
    assert _snapshot(lake, world / "lake.key") == _snapshot(reference, world / "lake.key")
