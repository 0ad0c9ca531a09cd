"""Burned-in text removal on the synthetic set: recall, false quarantine, cost (issue #21 §5).

``python bench/burned_in.py [--count 30] [--seed 0] [--append]``: writes ``--count`` synthetic
objects with burned-in names, MRNs and dates (:mod:`pipeline.synth.burned_in`: US-like and
SC-like, single and multi-frame, grey and RGB, several fonts, sizes and contrasts) to a
temporary folder, their ground truth to another, and cleans each with
:func:`pipeline.deid.pixels.clean_pixels` under the default ``deid.clean_pixels`` (all text
blacked out, recheck on). For each object:

- **box recall**: a ground-truth token box counts as removed when every pixel of it is the
  fill value (black) in the cleaned frame;
- **OCR recall**: the cleaned frames read again by the engine (every word, any confidence):
  a token counts as leaked when a word read matches it (:func:`identifier_tokens` matching,
  one edit allowed from 5 characters on);
- **quarantined**: objects the cleaner refused (unsure; the object would stay quarantined):
  a false quarantine here, since every object is cleanable;
- **cost**: wall time of ``clean_pixels`` per object and per frame (recheck included).

With ``--append`` the table is appended to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from pipeline.config import CleanPixelsConfig
from pipeline.deid.pixels import BurnedInText, _grey, _near, clean_pixels, read_words
from pipeline.synth.burned_in import write_burned_in


def _norm(text: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", text.upper())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upscale", type=int, default=2)
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    cfg = CleanPixelsConfig(enabled=True, upscale=args.upscale)
    with tempfile.TemporaryDirectory() as tmp:
        folder, truth = Path(tmp) / "archive", Path(tmp) / "truth.json"
        paths = write_burned_in(folder, truth, args.count, args.seed)
        table = json.loads(truth.read_text())
        tokens = boxed = leaked = quarantined = frames_total = 0
        costs, per_frame, reasons = [], [], []
        by_kind: dict[str, list[int]] = {}
        for path in paths:
            ds = pydicom.dcmread(path)
            nframes = int(ds.get("NumberOfFrames", 1) or 1)
            t0 = time.perf_counter()
            try:
                clean_pixels(ds, cfg)
            except BurnedInText as exc:
                quarantined += 1
                reasons.append(str(exc))
                continue
            cost = time.perf_counter() - t0
            costs.append(cost)
            per_frame.append(cost / nframes)
            frames_total += nframes
            arr = ds.pixel_array
            arr = arr[None, ...] if nframes == 1 else arr
            read = {
                f: [_norm(w.text) for w in read_words(_grey(arr[f]), cfg)] for f in range(nframes)
            }
            for box in table[path.name]:
                tokens += 1
                region = arr[box["frame"], box["y0"] : box["y1"], box["x0"] : box["x1"]]
                black = bool(np.all(region == 0))
                seen = any(
                    _near(_norm(box["text"]), w) or (len(w) >= 4 and w in _norm(box["text"]))
                    for w in read[box["frame"]]
                    if len(w) >= 2
                )
                boxed += black
                leaked += seen
                by_kind.setdefault(box["kind"], [0, 0])
                by_kind[box["kind"]][0] += 1
                by_kind[box["kind"]][1] += black and not seen
    version = subprocess.run(
        [cfg.engine_path, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    lines = [
        f"## Burned-in text removal (bench/burned_in.py), {dt.date.today()}",
        "",
        f"Issue #21 §5: `python bench/burned_in.py --count {args.count} --seed {args.seed} "
        f"--upscale {args.upscale}`: {len(paths)} synthetic objects ({frames_total} frames "
        f"cleaned), default `deid.clean_pixels` (all text, recheck on), {version}, 1 thread.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| token boxes all black (box recall) | {boxed} / {tokens} |",
        f"| tokens read again by OCR on the cleaned pixels | {leaked} / {tokens} |",
        f"| objects quarantined (false quarantine) | {quarantined} / {len(paths)} |",
        f"| ms per object (median, recheck included) | "
        f"{1000 * statistics.median(costs) if costs else 0:.0f} |",
        f"| ms per frame (median) | "
        f"{1000 * statistics.median(per_frame) if per_frame else 0:.0f} |",
        "",
        "Per kind, removed (black and not read again) / tokens: "
        + ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in sorted(by_kind.items())),
        "",
    ]
    if reasons:
        lines += ["Quarantine reasons: " + "; ".join(sorted(set(reasons))), ""]
    text = "\n".join(lines)
    print(text)
    if args.append:
        results = Path(__file__).with_name("RESULTS.md")
        results.write_text(results.read_text().rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
