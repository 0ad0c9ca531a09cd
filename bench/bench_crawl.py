"""Crawl throughput: pacsflow's header reader against the usual peer approaches, same process.

Peers, run over the same files in the same process:
- ``pydicom full``: ``pydicom.dcmread(path)`` then touching the UIDs (what naive indexers do:
  the whole file, pixel data included, is read);
- ``pydicom header``: ``pydicom.dcmread(path, stop_before_pixels=True)`` (what careful
  indexers do; it does not notice a truncated file).

pacsflow's ``read_header`` reads the header, checks that the pixel data is complete (item
headers only), fingerprints the header and extracts the index fields. The end-to-end line
times ``pipeline.crawl.run`` (listing, incremental check, Parquet writes) in-process and on a
local Dask cluster of ``--workers`` processes, and an incremental rerun.

Usage::

    python bench/bench_crawl.py --source DIR            # an existing archive
    python bench/bench_crawl.py --instances 20000       # synthesises a --small archive first
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def _rate(label: str, files: list[Path], fn: Callable[[Path], object]) -> float:
    t0 = time.perf_counter()
    ok = 0
    for path in files:
        try:
            fn(path)
            ok += 1
        except Exception:  # peers fail on the bad objects; count only
            pass
    dt = time.perf_counter() - t0
    rate = len(files) / dt
    print(f"  {label:<28} {rate:9.0f} files/s  ({ok}/{len(files)} parsed, {dt:.2f} s)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, help="archive folder (default: synthesise one)")
    parser.add_argument("--instances", type=int, default=20000, help="size of the synthetic one")
    parser.add_argument("--sample", type=int, default=5000, help="files for the per-file peers")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import pydicom

    from pipeline.config import load_config
    from pipeline.connectors import FolderSource
    from pipeline.crawl import read_header
    from pipeline.crawl import run as crawl_run
    from pipeline.lake import LakePaths

    tmp = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    try:
        source = args.source
        if source is None:
            from pipeline.synth import synthesize

            source = tmp / "archive"
            per_patient = 200  # see pipeline.synth: small mode instances per patient
            patients = max(1, args.instances // per_patient)
            res = synthesize(source, patients=patients, seed=1, small=True, workers=args.workers)
            print(f"synthesised {res.n_instances} instances in {res.seconds:.1f} s")
        files = _files(source)
        sample = files[: args.sample]
        print(f"archive: {source} ({len(files)} files); per-file sample {len(sample)} files")

        def ours(path: Path) -> object:
            with open(path, "rb") as fp:
                return read_header(fp, os.fstat(fp.fileno()).st_size)

        def full(path: Path) -> object:
            ds = pydicom.dcmread(path)
            return ds.SOPInstanceUID, ds.SeriesInstanceUID, len(ds.PixelData)

        def header(path: Path) -> object:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return ds.SOPInstanceUID, ds.SeriesInstanceUID

        import warnings

        warnings.simplefilter("ignore")
        _rate("warm-up", sample[:200], ours)
        r_full = _rate("peer: pydicom full read", sample, full)
        r_head = _rate("peer: pydicom header only", sample, header)
        r_ours = _rate("pacsflow read_header", sample, ours)
        print(f"  ratio pacsflow / pydicom full   = {r_ours / r_full:.2f}")
        print(f"  ratio pacsflow / pydicom header = {r_ours / r_head:.2f}")

        cfg = load_config(environ={})
        lake = LakePaths(tmp / "lake-local")
        t0 = time.perf_counter()
        c = crawl_run(cfg, lake, FolderSource(source), run_id="bench").counts
        dt = time.perf_counter() - t0
        print(f"end-to-end crawl, in-process: {c.seen / dt:8.0f} objects/s ({c.seen}, {dt:.1f} s)")
        t0 = time.perf_counter()
        c = crawl_run(cfg, lake, FolderSource(source), run_id="bench2").counts
        dt = time.perf_counter() - t0
        print(f"incremental rerun (unchanged): {c.seen / dt:8.0f} objects/s ({dt:.2f} s)")

        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address=None,
                scheduler_kwargs={"dashboard": False},
            ) as cluster,
            Client(cluster) as client,
        ):
            lake = LakePaths(tmp / "lake-dask")
            t0 = time.perf_counter()
            c = crawl_run(cfg, lake, FolderSource(source), run_id="bench", client=client).counts
            dt = time.perf_counter() - t0
            print(
                f"end-to-end crawl, Dask x{args.workers}: {c.seen / dt:8.0f} objects/s "
                f"({c.seen} in {dt:.1f} s)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
