"""End-to-end benchmark (issue #8): a synthesised archive of CT studies (512x512, ``--slices``
slices per series) through every stage of ``pacsflow run``, one stage per process so each has
its own wall time and peak memory (GNU time's maximum resident set size, which covers the
stage's Dask worker processes too), plus crawl + deid on 1 and 2 workers, and the peak memory
of crawl + deid on a quarter of the archive (memory must not grow with the archive).

    .venv/bin/python bench/e2e.py [--patients 10] [--slices 150] [--model NAME_OR_PATH]

The archive is cached in ``bench/out/e2e/archive-<patients>x<slices>`` (``pacsflow synth
--no-mr --no-bad``); lakes are rebuilt each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "e2e"
BIN = Path(sys.executable).parent
STAGES = ("crawl", "deid", "verify", "tensors", "infer", "writeback")


def synth(patients: int, slices: int) -> Path:
    archive = OUT / f"archive-{patients}x{slices}"
    if not (archive / "ground_truth.json").exists():
        shutil.rmtree(archive, ignore_errors=True)
        subprocess.run(
            [
                str(BIN / "pacsflow"),
                "synth",
                str(archive),
                "--patients",
                str(patients),
                "--slices",
                str(slices),
                "--size",
                "512",
                "--no-mr",
                "--no-bad",
                "--workers",
                "2",
            ],
            check=True,
        )
    return archive


def config(
    lake: Path,
    archive: Path,
    model: str,
    workers: int,
    only: set[str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """A `pacsflow run` config of ``lake`` (with its own key) running the stages ``only``;
    ``extra`` top-level keys are added (e.g. ``encrypt_at_rest``)."""
    key = lake.parent / f"{lake.name}.key"
    if not key.exists():
        subprocess.run(
            [str(BIN / "pacsflow"), "keygen", str(key)], check=True, stdout=subprocess.DEVNULL
        )
    path = lake.parent / f"{lake.name}-{'-'.join(sorted(only))}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "lake": str(lake),
                "key_file": str(key),
                "source": {"uri": str(archive)},
                "compute": {"workers": workers, "device": "auto"},
                "infer": {"model": model},
                "writeback": {"dest": str(lake.parent / f"{lake.name}-results")},
                "run": {s: s in only for s in STAGES},
                "logging": {"level": "WARNING"},
                **(extra or {}),
            }
        )
    )
    return path


def timed(cfg: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one `pacsflow run`."""
    fmt = "%e %M"
    proc = subprocess.run(
        ["/usr/bin/time", "-f", fmt, str(BIN / "pacsflow"), "run", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"pacsflow run {cfg.name} failed:\n{proc.stderr[-3000:]}")
    wall, kib = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), int(kib) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--slices", type=int, default=150)
    ap.add_argument("--model", default="ct_body_composition")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    archive = synth(args.patients, args.slices)
    truth = json.loads((archive / "ground_truth.json").read_text())
    n_files = sum(1 for p in archive.rglob("*") if p.is_file()) - 1
    size = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file()) / 2**30
    studies = len(truth["studies"])
    print(
        f"archive: {studies} CT studies, {len(truth['series'])} series, {n_files} files, "
        f"{size:.2f} GiB ({archive})"
    )

    rows: list[tuple[str, float, float]] = []
    lake = OUT / "lake"
    shutil.rmtree(lake, ignore_errors=True)
    shutil.rmtree(OUT / "lake-results", ignore_errors=True)
    for stage in STAGES:
        wall, mib = timed(config(lake, archive, args.model, 2, {stage}))
        rows.append((stage, wall, mib))
        print(f"  {stage:<10} {wall:8.1f} s  peak {mib:7.0f} MiB", flush=True)
    total = sum(r[1] for r in rows)

    scaling = {}
    for workers in (1, 2):
        scale_lake = OUT / f"lake-w{workers}"
        shutil.rmtree(scale_lake, ignore_errors=True)
        wall, mib = timed(config(scale_lake, archive, args.model, workers, {"crawl", "deid"}))
        scaling[workers] = (wall, mib)

    quarter = OUT / "quarter"
    shutil.rmtree(quarter, ignore_errors=True)
    quarter.mkdir(parents=True)
    files = sorted(p for p in archive.rglob("*.dcm")) or sorted(
        p for p in archive.rglob("*") if p.is_file() and p.name != "ground_truth.json"
    )
    for p in files[: len(files) // 4]:
        target = quarter / "archive" / p.relative_to(archive)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(p, target)
    q_wall, q_mib = timed(
        config(quarter / "lake", quarter / "archive", args.model, 2, {"crawl", "deid"})
    )

    print("\n| stage (2 workers) | seconds | share | peak RSS MiB |")
    print("|---|---:|---:|---:|")
    for stage, wall, mib in rows:
        print(f"| {stage} | {wall:.1f} | {100 * wall / total:.0f}% | {mib:.0f} |")
    print(f"| **all** | **{total:.1f}** | | {max(r[2] for r in rows):.0f} |")
    w1, w2 = scaling[1][0], scaling[2][0]
    print(f"\ncrawl + deid: 1 worker {w1:.1f} s, 2 workers {w2:.1f} s -> {w1 / w2:.2f}x")
    print(
        f"crawl + deid peak RSS: whole archive {scaling[2][1]:.0f} MiB, a quarter "
        f"{q_mib:.0f} MiB ({q_wall:.1f} s)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "stages": rows,
                    "scaling": scaling,
                    "quarter": [q_wall, q_mib],
                    "studies": studies,
                    "files": n_files,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
