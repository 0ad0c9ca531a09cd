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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from pipeline.config import CleanPixelsConfig
from pipeline.deid.pixels import BurnedInText, _grey, _near, clean_pixels, read_words
from pipeline.synth.burned_in import write_burned_in


def _norm(text: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", text.upper())


@dataclass
class Measure:
    """What one configuration did to the set."""

    tokens: int = 0
    boxed: int = 0
    leaked: int = 0
    quarantined: int = 0
    frames: int = 0
    costs: list[float] = field(default_factory=list)
    per_frame: list[float] = field(default_factory=list)
    blackout: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    by_kind: dict[str, list[int]] = field(default_factory=dict)


def measure(cfg: CleanPixelsConfig, paths: list[Path], table: dict[str, Any]) -> Measure:
    """Clean every object of ``paths`` under ``cfg`` and score it against ``table``."""
    m = Measure()
    for path in paths:
        ds = pydicom.dcmread(path)
        nframes = int(ds.get("NumberOfFrames", 1) or 1)
        t0 = time.perf_counter()
        try:
            clean_pixels(ds, cfg)
        except BurnedInText as exc:
            m.quarantined += 1
            m.reasons.append(re.sub(r"\[[0-9, ]+\]|frame [0-9]+|[0-9]+ %", "#", str(exc)))
            continue
        cost = time.perf_counter() - t0
        m.costs.append(cost)
        m.per_frame.append(cost / nframes)
        m.frames += nframes
        arr = ds.pixel_array
        arr = arr[None, ...] if nframes == 1 else arr
        black = arr == 0 if arr.ndim == 3 else np.all(arr == 0, axis=-1)
        before = pydicom.dcmread(path).pixel_array
        before = before[None, ...] if nframes == 1 else before
        was_black = before == 0 if before.ndim == 3 else np.all(before == 0, axis=-1)
        m.blackout += [float((black[f] & ~was_black[f]).mean()) for f in range(nframes)]
        read = {f: [_norm(w.text) for w in read_words(_grey(arr[f]), cfg)] for f in range(nframes)}
        for box in table[path.name]:
            m.tokens += 1
            region = black[box["frame"], box["y0"] : box["y1"], box["x0"] : box["x1"]]
            gone = bool(np.all(region))
            seen = any(
                _near(_norm(box["text"]), w) or (len(w) >= 4 and w in _norm(box["text"]))
                for w in read[box["frame"]]
                if len(w) >= 2
            )
            m.boxed += gone
            m.leaked += seen
            m.by_kind.setdefault(box["kind"], [0, 0])
            m.by_kind[box["kind"]][0] += 1
            m.by_kind[box["kind"]][1] += gone and not seen
    return m


def _ms(values: list[float]) -> str:
    return f"{1000 * statistics.median(values):.0f}" if values else "-"


def _pct(values: list[float], q: str) -> str:
    if not values:
        return "-"
    return f"{100 * (max(values) if q == 'max' else statistics.median(values)):.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upscale", type=int, default=2)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run with detect_levels off (the engine alone: the first version)",
    )
    parser.add_argument("--append", action="store_true")
    args = parser.parse_args()
    runs = {"default": CleanPixelsConfig(enabled=True, upscale=args.upscale)}
    if args.compare:
        runs = {
            "engine only (detect_levels off)": CleanPixelsConfig(
                enabled=True, upscale=args.upscale, detect_levels=False
            ),
            "engine + level detector (default)": runs["default"],
        }
    with tempfile.TemporaryDirectory() as tmp:
        folder, truth = Path(tmp) / "archive", Path(tmp) / "truth.json"
        paths = write_burned_in(folder, truth, args.count, args.seed)
        table = json.loads(truth.read_text())
        frames = sum(
            int(pydicom.dcmread(p, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
            for p in paths
        )
        results = {name: measure(cfg, paths, table) for name, cfg in runs.items()}
    cfg = next(iter(runs.values()))
    version = subprocess.run(
        [cfg.engine_path, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    rows = [
        ("token boxes all black (box recall)", lambda m: f"{m.boxed} / {m.tokens}"),
        ("tokens read again by OCR on the cleaned pixels", lambda m: f"{m.leaked} / {m.tokens}"),
        (
            "objects quarantined (false quarantine)",
            lambda m: f"{m.quarantined} / {len(paths)}",
        ),
        ("frame area blacked out (median)", lambda m: _pct(m.blackout, "median")),
        ("frame area blacked out (max)", lambda m: _pct(m.blackout, "max")),
        ("ms per object (median, recheck included)", lambda m: _ms(m.costs)),
        ("ms per frame (median)", lambda m: _ms(m.per_frame)),
    ]
    names = list(results)
    lines = [
        f"## Burned-in text removal (bench/burned_in.py), {dt.date.today()}",
        "",
        f"Issue #21 §5: `python bench/burned_in.py --count {args.count} --seed {args.seed} "
        f"--upscale {args.upscale}{' --compare' if args.compare else ''}`: {len(paths)} "
        f"synthetic objects ({frames} frames), `deid.clean_pixels` defaults "
        f"(all text, recheck on), {version}, 1 thread.",
        "",
        "| measure | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        *(f"| {label} | " + " | ".join(f(results[n]) for n in names) + " |" for label, f in rows),
        "",
    ]
    for name in names:
        m = results[name]
        lines.append(
            f"Per kind, {name}: removed (black and not read again) / tokens: "
            + ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in sorted(m.by_kind.items()))
        )
        if m.reasons:
            lines.append(f"Quarantine reasons, {name}: " + "; ".join(sorted(set(m.reasons))))
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.append:
        out = Path(__file__).with_name("RESULTS.md")
        out.write_text(out.read_text().rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
