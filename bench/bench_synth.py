"""Benchmark ``pipeline.synth.synthesize(small=True)`` against a naive pydicom writer.

Usage::

    python bench/bench_synth.py --instances 100000 --workers 2 [--out DIR] [--keep]

The archive size follows the small-mode formula (``pipeline.synth.plan.small_instance_count``):
``patients * (2 + ct_slices + 78)`` instances, 200 per patient by default, so 100,000
instances means ``--patients 500``. The baseline ("naive peer") builds one ``Dataset`` from
scratch per file (the same header elements and a 16x16 Pixel Data, no phantom, no codecs) and
writes it with ``dcmwrite``, in this process, for ``--sample`` files; its time is extrapolated
to the full count.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.synth import synthesize
from pipeline.synth.core import file_meta, instance_elements, series_header
from pipeline.synth.plan import plan_archive, small_instance_count

logger = logging.getLogger("bench_synth")


def _disk_usage(root: Path) -> int:
    """Bytes allocated on disk under ``root`` (what ``du`` counts)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*")) + root.stat().st_blocks * 512


def _naive_baseline(out: Path, sample: int, ct_slices: int) -> float:
    """Seconds per instance for a from-scratch ``Dataset`` + ``dcmwrite`` per file."""
    plan = plan_archive(
        patients=1,
        seed=0,
        ct_slices=ct_slices,
        rows=16,
        columns=16,
        small=True,
        include_mr=False,
        include_bad=False,
        syntaxes=(str(ExplicitVRLittleEndian),),
    )
    series = next(s for s in plan.series if s.kind == "ct_axial")
    header = series_header(series)
    elements = [(elem.tag, elem.VR, elem.value) for elem in header]
    meta = [(elem.tag, elem.VR, elem.value) for elem in file_meta(series)]
    pixels = np.zeros((16, 16), dtype=np.uint16).tobytes()
    out.mkdir(parents=True, exist_ok=True)
    n = len(series.geometry.frames)
    started = time.perf_counter()
    for i in range(sample):
        ds = Dataset()
        for tag, vr, value in elements:
            ds.add_new(tag, vr, value)
        for itag, ivr, ivalue in instance_elements(series, i % n):
            ds.add_new(itag, ivr, ivalue)
        ds.add_new(0x7FE00010, "OW", pixels)
        ds.file_meta = FileMetaDataset()
        for tag, vr, value in meta:
            ds.file_meta.add_new(tag, vr, value)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        dcmwrite(out / f"IM{i:06d}.dcm", ds, enforce_file_format=True)
    return (time.perf_counter() - started) / sample


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the numbers; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000, help="target instance count")
    parser.add_argument("--workers", type=int, default=2, help="writer processes")
    parser.add_argument("--ct-slices", type=int, default=120, help="images per CT series")
    parser.add_argument("--no-mr", action="store_true", help="CT only (122 images per patient)")
    parser.add_argument("--sample", type=int, default=2000, help="files the baseline writes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="archive folder (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the archive")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    include_mr = not args.no_mr
    per_patient = small_instance_count(1, ct_slices=args.ct_slices, include_mr=include_mr)
    patients = max(1, math.ceil(args.instances / per_patient))
    scratch = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    out = args.out if args.out is not None else scratch / "archive"
    try:
        print(
            f"synthesize(small=True, patients={patients}, ct_slices={args.ct_slices}, "
            f"include_mr={include_mr}, workers={args.workers}) -> {out}"
        )
        result = synthesize(
            out,
            patients=patients,
            seed=args.seed,
            ct_slices=args.ct_slices,
            small=True,
            include_mr=include_mr,
            workers=args.workers,
        )
        on_disk = _disk_usage(out)
        rate = result.n_instances / result.seconds
        print(
            f"pacsflow synth : {result.n_instances} instances (+{result.n_bad} bad) in "
            f"{result.seconds:.1f} s = {rate:.0f} instances/s; {result.bytes_written / 2**20:.1f} "
            f"MiB written, {on_disk / 2**20:.1f} MiB on disk (du)"
        )
        # on the same file system as the archive: file creation costs differ between mounts
        baseline = out.parent / f"{out.name}-naive-baseline"
        try:
            per_file = _naive_baseline(baseline, args.sample, args.ct_slices)
        finally:
            shutil.rmtree(baseline, ignore_errors=True)
        naive_total = per_file * result.n_instances
        print(
            f"naive baseline : {1 / per_file:.0f} instances/s in one process "
            f"({args.sample} files), {naive_total:.0f} s extrapolated to {result.n_instances}"
        )
        per_core = rate / args.workers
        print(
            f"ratio          : {naive_total / result.seconds:.1f}x faster wall-clock with "
            f"{args.workers} workers; {per_core * per_file:.1f}x per process"
        )
        print(f"cpu count      : {os.cpu_count()}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
            if args.out is not None:
                shutil.rmtree(args.out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
