"""Inference benchmark (issue #6): the default model over stored CT volumes.

Prints series per minute, slices and voxels per second for pacsflow's ``Segmenter`` (slices of
several volumes packed into each batch, the next volumes loaded and preprocessed on a thread
while the model computes), the fraction of time the model waited for data, and the same
figures for the plain loop a MONAI user writes (per volume: load, preprocess, forward in
chunks, postprocess; nothing overlapped), run in the same process on the same volumes; the
two must give identical label maps.

Volumes: ``--volumes`` copies of one 512x512x``--slices`` CT volume in HU (the cached
``bench/out/deid-data/ct512`` series when present, else a synthetic chest phantom from
``pipeline.synth``), stored as ``.npy`` as the tensors stage stores them and read back through
the page cache.

    .venv/bin/python bench/infer.py [--volumes 4] [--device auto] [--amp auto] [--batch-size 64]
        [--no-tta]

The model runs as pacsflow runs it: with the test-time augmentation of its registry entry
(``configs/models.yaml`` ``test_time``; the default model: 8 views of every slice), unless
``--no-tta``; the plain loop does the same views.

With ``--device cuda`` (see bench/gpu.sh) the same code runs on the GPU with bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")

OUT = REPO / "bench" / "out"
CACHED = OUT / "deid-data" / "ct512"


def ct_volume(slices: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(array (slices, 512, 512) int16 HU, LPS affine, where it came from)."""
    files = sorted(CACHED.glob("*.img")) if CACHED.is_dir() else []
    if len(files) >= slices:
        from pipeline.tensors.fastread import read_image
        from pipeline.tensors.volume import build_volumes

        pairs = [read_image(f.read_bytes()) for f in files[:slices]]
        (vol,) = build_volumes([h for h, _ in pairs], [p for _, p in pairs])
        return vol.array, vol.affine, f"{CACHED} ({slices} slices)"
    from pipeline.synth import synthesize

    tmp = Path(tempfile.mkdtemp(dir=OUT, prefix="infer-synth-"))
    synthesize(
        tmp,
        patients=1,
        seed=7,
        ct_slices=slices,
        rows=512,
        columns=512,
        include_mr=False,
        include_bad=False,
    )
    ct = sorted(p for p in tmp.rglob("*") if p.is_file() and p.suffix != ".json")
    from pipeline.tensors.fastread import read_image
    from pipeline.tensors.volume import build_volumes

    pairs = [read_image(f.read_bytes()) for f in ct]
    vols = [
        v
        for v in build_volumes([h for h, _ in pairs], [p for _, p in pairs])
        if v.array.shape[1:] == (512, 512)
    ]
    return vols[0].array[:slices], vols[0].affine, f"pacsflow synth phantom ({slices} slices)"


def plain_loop(
    bundle: Any,
    paths: list[Path],
    affine: np.ndarray,
    device: str,
    batch: int,
    autocast: Any,
    views: list[tuple[tuple[int, ...], bool]],
) -> tuple[float, list[np.ndarray]]:
    """What a MONAI user writes: one volume at a time, nothing overlapped; each batch through
    every test-time view (flips, transposition), logits averaged."""
    import torch
    from monai.data import MetaTensor

    net = bundle.network.to(device).eval()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    out = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            arr = np.load(p)
            img = MetaTensor(
                torch.from_numpy(arr.transpose(2, 1, 0)[None].astype(np.float32)),
                affine=torch.from_numpy(ras),
            )
            d = bundle.preprocessing({"image": img})
            x = d["image"].as_tensor().permute(3, 0, 1, 2)
            logits = []
            for z in range(0, x.shape[0], batch):
                xb = x[z : z + batch].to(device)
                total = None
                for dims, swap in views:
                    xv = xb.flip(dims) if dims else xb
                    xv = xv.transpose(2, 3) if swap else xv
                    if autocast is not None:
                        with torch.autocast("cuda", dtype=autocast):
                            y = bundle.inferer(xv, net)
                    else:
                        y = bundle.inferer(xv, net)
                    y = y.transpose(2, 3) if swap else y
                    y = (y.flip(dims) if dims else y).float()
                    total = y if total is None else total + y
                assert total is not None
                logits.append((total / len(views) if len(views) > 1 else total).cpu())
            pred = MetaTensor(torch.cat(logits).permute(1, 2, 3, 0))
            pred.copy_meta_from(d["image"])
            lab = bundle.postprocessing({"pred": pred, "image": d["image"]})["pred"]
            out.append(np.asarray(lab[0]).transpose(2, 1, 0).round().astype(np.uint8))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ct_body_composition", help="name in models/ or a path")
    ap.add_argument("--volumes", type=int, default=4)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--no-tta", action="store_true", help="one view per slice (no test_time)")
    args = ap.parse_args()

    import torch

    from pipeline.infer.bundle import load_bundle
    from pipeline.infer.engine import Segmenter, augmentation_views
    from pipeline.infer.registry import TestTime, default_models_dir, load_registry
    from pipeline.lake import write_npy

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.model, models_dir=default_models_dir())
    tta = TestTime() if args.no_tta else load_registry().entry(args.model).test_time
    views = augmentation_views(tta.mirror_axes, tta.transpose_xy, bundle.spatial_dims)
    options: dict[str, Any] = {
        "batch_size": args.batch_size,
        "amp": args.amp,
        "mirror_axes": tta.mirror_axes,
        "transpose_xy": tta.transpose_xy,
    }
    arr, affine, origin = ct_volume(args.slices)
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=OUT, prefix="infer-"))
    paths = []
    for i in range(args.volumes):
        p = work / f"v{i}.npy"
        write_npy(p, arr)
        p.read_bytes()  # page cache warm, as the tensors stage leaves it
        paths.append(p)
    seg = Segmenter(bundle, device=args.device, **options)
    dev = seg.device
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu"
    print(
        f"model {bundle.ref} ({sum(p.numel() for p in bundle.network.parameters()):,} "
        f"parameters), device {dev} [{gpu}], autocast {seg.autocast_dtype}, batch "
        f"{args.batch_size}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
        f"test-time views {len(views)}"
    )
    print(f"volumes: {args.volumes} x {arr.shape} int16 from {origin}")

    # warm-up (first-call costs: kernels, allocator, cuDNN)
    list(
        Segmenter(bundle, device=dev, **options).segment(
            [("w", lambda: (arr[: min(16, len(arr))], affine))]
        )
    )
    t0 = time.perf_counter()
    ours = [
        lab for _, lab in seg.segment((str(p), (lambda p=p: (np.load(p), affine))) for p in paths)
    ]
    sec = time.perf_counter() - t0
    st = seg.stats
    base_sec, base = plain_loop(
        bundle, paths, affine, dev, args.batch_size, seg.autocast_dtype, views
    )
    same = all(np.array_equal(a, b) for a, b in zip(ours, base, strict=True))
    voxels = int(np.prod(arr.shape)) * args.volumes
    rows = [
        ("pacsflow Segmenter (packed batches, prefetch thread)", sec),
        ("plain MONAI loop (one volume at a time, nothing overlapped)", base_sec),
    ]
    print("\n| contender | seconds | series/min | slices/s | Mvoxels/s | vs pacsflow |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in rows:
        print(
            f"| {name} | {s:.2f} | {60 * args.volumes / s:.2f} | "
            f"{args.volumes * arr.shape[0] / s:.1f} | {voxels / s / 1e6:.2f} | {s / sec:.2f}x |"
        )
    print(f"\nlabel maps identical to the plain loop: {same}")
    print(
        f"pacsflow split: waiting for data {st.seconds_waiting:.2f} s "
        f"({100 * st.wait_fraction:.1f}% of {st.seconds_total:.2f} s; goal < 10%), "
        f"forward {st.seconds_compute:.2f} s, postprocessing {st.seconds_post:.2f} s, "
        f"{st.batches} batches"
    )
    figures = {
        "model": bundle.ref,
        "device": dev,
        "device_name": gpu,
        "autocast": str(seg.autocast_dtype),
        "test_time_views": len(views),
        "volumes": args.volumes,
        "shape": list(arr.shape),
        "seconds": sec,
        "series_per_min": 60 * args.volumes / sec,
        "voxels_per_s": voxels / sec,
        "plain_loop_seconds": base_sec,
        "identical": same,
        **{f"engine_{k}": v for k, v in st.as_dict().items()},
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    for p in paths:
        p.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
