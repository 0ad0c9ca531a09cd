"""One model-zoo bundle as shipped on one synthetic CT volume: time and peak memory (issue #22).

Copies a bundle of ``../shared/bundles/model-zoo`` into a temporary folder, gives it random
weights built from its own ``network_def`` (the hubs are unreachable; accuracy is not what is
measured), loads it as ``pacsflow infer`` does (allow-list mode; registry-style ``--override``
and ``--drop``) and segments one synthetic CT volume of ``--shape`` (slices rows columns) with
``--spacing`` mm through :class:`pipeline.infer.engine.Segmenter` on ``--device``::

    python bench/zoo.py wholeBody_ct_segmentation --device cuda --shape 300 512 512
    python bench/zoo.py wholeBody_ct_segmentation --override displayable_configs#highres=false \\
        --weights model_lowres.pt --shape 120 512 512
    python bench/zoo.py swin_unetr_btcv_segmentation --drop network_def#img_size

Prints the load time, the segmentation time (the first volume: what a nightly run pays per
volume), peak RSS (and peak CUDA memory) and the labels found.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ZOO = Path(__file__).resolve().parents[1].parent / "shared" / "bundles" / "model-zoo"


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _weights(bundle: Path, name: str, drop: list[str]) -> None:
    import torch
    from monai.bundle import ConfigParser

    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    network = dict(cfg["network_def"])
    for ident in drop:
        if ident.startswith("network_def#"):
            network.pop(ident.split("#", 1)[1], None)
    torch.manual_seed(0)
    net = ConfigParser({"network_def": network}, globals=False).get_parsed_content("network_def")
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / name)


def _ct(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[Any, Any]:
    """Air around an elliptic body of soft tissue with a denser organ-like blob (int16 HU)."""
    k, j, i = shape
    jj, ii = np.mgrid[:j, :i]
    body = ((jj - j / 2) / (j * 0.42)) ** 2 + ((ii - i / 2) / (i * 0.45)) ** 2 < 1
    organ = ((jj - j * 0.45) / (j * 0.12)) ** 2 + ((ii - i * 0.65) / (i * 0.1)) ** 2 < 1
    plane = np.full((j, i), -1000, np.int16)
    plane[body] = 40
    plane[organ] = 120
    arr = np.repeat(plane[None], k, axis=0)
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    return arr, affine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="a folder name in ../shared/bundles/model-zoo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=[120, 512, 512])
    parser.add_argument("--spacing", type=float, nargs=3, default=[2.0, 0.8, 0.8])
    parser.add_argument("--weights", default="model.pt", help="file name under models/")
    parser.add_argument("--override", action="append", default=[], help="id#path=JSON value")
    parser.add_argument("--drop", action="append", default=[], help="id#path to remove")
    args = parser.parse_args(argv)
    src = ZOO / args.bundle
    if not src.is_dir():
        print(f"zoo: no bundle {args.bundle!r} in {ZOO}", file=sys.stderr)
        return 2
    overrides = {k: _value(v) for k, v in (o.split("=", 1) for o in args.override)}
    import torch

    from pipeline.infer.bundle import load_bundle
    from pipeline.infer.engine import Segmenter

    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        bundle = Path(tmp) / args.bundle
        shutil.copytree(src, bundle)
        _weights(bundle, args.weights, args.drop)
        t0 = time.perf_counter()
        loaded = load_bundle(
            bundle, models_dir=Path(tmp), overrides=overrides, drop=tuple(args.drop)
        )
        load_s = time.perf_counter() - t0
        arr, affine = _ct(tuple(args.shape), tuple(args.spacing))  # type: ignore[arg-type]
        seg = Segmenter(loaded, device=args.device)
        t0 = time.perf_counter()
        [(_, labels)] = list(seg.segment([("v", lambda: (arr, affine))]))
        if args.device == "cuda":
            torch.cuda.synchronize()
        run_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = (
        f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        if args.device == "cuda"
        else ""
    )
    found = sorted(int(v) for v in np.unique(labels) if v)
    print(
        f"{args.bundle} on {args.device}: volume {tuple(args.shape)} at {tuple(args.spacing)} mm; "
        f"load {load_s:.1f} s, segment {run_s:.1f} s, peak RSS {rss:.0f} MiB{gpu}; "
        f"{len(found)} of {len(loaded.labels)} labels present"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
