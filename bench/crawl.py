"""Crawl throughput against its peers, on one synthetic archive, in one run.

Contenders, all over the same `pacsflow synth --small` archive (>= 50,000 files by default):

- **bare loop** (the baseline, 1.0x): one process, ``pydicom.dcmread(stop_before_pixels=True)``
  per file, keeps ~40 attributes per object, writes one Parquet file at the end;
- **dask.bag**: the same per-file function mapped with ``dask.bag`` on a local cluster of
  2 worker processes, gathered to the driver and written as one Parquet file;
- **pacsflow, 1 worker**: ``pipeline.crawl.run`` in-process (listing, incremental state,
  header check, atomic Parquet parts, units table);
- **pacsflow, 2 workers**: the same on a local Dask cluster of 2 worker processes.

Each pacsflow run is a fresh process (so its peak memory is its own), reporting the driver's
peak RSS; pacsflow is also run on an archive a tenth of the size, to show that the driver's
memory does not grow with the archive. Ratios are objects/s against the bare loop.

Usage::

    python bench/crawl.py                       # synthesises 50,000 instances first
    python bench/crawl.py --instances 100000 --keep /work/bench-archive
    python bench/crawl.py --source DIR          # an existing archive
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

KEEP = (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
    "PatientName", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyDescription", "SeriesDescription", "SeriesNumber", "SeriesDate",
    "Modality", "BodyPartExamined", "Manufacturer", "ManufacturerModelName", "InstitutionName",
    "StationName", "SoftwareVersions", "InstanceNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "PhotometricInterpretation", "RescaleSlope",
    "RescaleIntercept", "WindowCenter", "WindowWidth", "KVP", "ContentDate", "ContentTime",
    "FrameOfReferenceUID",
)  # fmt: skip

_DRIVER = r"""
import json, sys, time
from pathlib import Path
from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run
from pipeline.lake import LakePaths
archive, lake, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
cfg = load_config(overrides={"compute": {"workers": workers}}, environ={})
t0 = time.perf_counter()
if workers == 1:
    counts = run(cfg, LakePaths(lake), FolderSource(archive), run_id="bench").counts
else:
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None, scheduler_kwargs={"dashboard": False}) as cl, \
         Client(cl) as client:
        t0 = time.perf_counter()  # cluster start-up is not crawl time
        counts = run(cfg, LakePaths(lake), FolderSource(archive), run_id="bench",
                     client=client).counts
dt = time.perf_counter() - t0
# VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would report the parent's peak
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": dt, "seen": counts.seen, "out": counts.out,
                  "maxrss_mb": hwm / 1024}))
"""


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_one(path: str) -> dict[str, Any] | None:
    """The peers' per-file work: header only, ~40 attributes as strings."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            return None
        row: dict[str, Any] = {"path": path}
        for kw in KEEP:
            value = ds.get(kw)
            row[kw] = None if value is None else str(value)
        return row


def bare_loop(files: list[Path], out: Path) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    rows = [r for r in map(read_one, map(str, files)) if r is not None]
    pq.write_table(pa.Table.from_pylist(rows), out)
    return time.perf_counter() - t0


def dask_bag(files: list[Path], out: Path, workers: int) -> float:
    import dask.bag as db
    import pyarrow as pa
    import pyarrow.parquet as pq
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False},
        ) as cluster,
        Client(cluster),
    ):
        t0 = time.perf_counter()
        bag = db.from_sequence([str(f) for f in files], npartitions=max(1, len(files) // 2000))
        rows = [r for r in bag.map(read_one).compute() if r is not None]
        pq.write_table(pa.Table.from_pylist(rows), out)
        return time.perf_counter() - t0


def pacsflow(archive: Path, lake: Path, workers: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(archive), str(lake), str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, help="an existing archive (default: synthesise)")
    parser.add_argument("--instances", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the synthesised archive here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    try:
        from pipeline.synth import synthesize

        archive = args.source
        if archive is None:
            archive = args.keep or tmp / "archive"
            if not (archive / "ground_truth.json").exists():
                res = synthesize(
                    archive,
                    patients=max(1, args.instances // 200),
                    seed=1,
                    small=True,
                    workers=args.workers,
                )
                print(f"synthesised {res.n_instances} instances in {res.seconds:.1f} s")
        tenth = tmp / "tenth"
        synthesize(tenth, patients=max(1, args.instances // 2000), seed=2, small=True)
        files = _files(archive)
        n = len(files)
        print(f"archive: {n} files; {os.cpu_count()} cores")
        for f in files:  # warm the page cache for everyone alike
            f.read_bytes()

        t_bare = bare_loop(files, tmp / "bare.parquet")
        t_bag = dask_bag(files, tmp / "bag.parquet", args.workers)
        p1 = pacsflow(archive, tmp / "lake1", 1)
        p2 = pacsflow(archive, tmp / "lake2", args.workers)
        p2_small = pacsflow(tenth, tmp / "lake3", args.workers)
        rerun = pacsflow(archive, tmp / "lake2", args.workers)

        base = n / t_bare
        rows = [
            ("bare loop (pydicom, ~40 attrs, 1 Parquet)", n / t_bare, None),
            (f"dask.bag of the same, {args.workers} workers", n / t_bag, None),
            ("pacsflow crawl, 1 worker (in-process)", p1["seen"] / p1["seconds"], p1["maxrss_mb"]),
            (
                f"pacsflow crawl, {args.workers} workers",
                p2["seen"] / p2["seconds"],
                p2["maxrss_mb"],
            ),
            (
                f"pacsflow crawl, {args.workers} workers, archive/10",
                p2_small["seen"] / p2_small["seconds"],
                p2_small["maxrss_mb"],
            ),
            (
                "pacsflow rerun, nothing changed",
                rerun["seen"] / rerun["seconds"],
                rerun["maxrss_mb"],
            ),
        ]
        print("\n| contender | objects/s | vs bare loop | driver peak RSS |")
        print("|---|---|---|---|")
        for name, rate, rss in rows:
            mem = f"{rss:.0f} MB" if rss is not None else "-"
            print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {mem} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
