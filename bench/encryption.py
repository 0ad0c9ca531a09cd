"""Encryption at rest (issue #18): the cost of a sealed restricted zone.

The same archive through crawl, deid, verify and tensors (``pacsflow run``, one process, 2
workers) into a lake with ``encrypt_at_rest: true`` and one with ``false``, alternating which
goes first, best of ``--repeat`` fresh lakes each; then a rerun of each (nothing new: the
incremental diff on sealed unit keys and locations). Prints wall times and the ratio
sealed/clear.

    .venv/bin/python bench/encryption.py [--patients 3] [--slices 120] [--repeat 2]

The archive is the end-to-end bench's (``bench/out/e2e/archive-<patients>x<slices>``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import OUT, config, synth, timed

MODEL = "ct_body_composition"  # not run: infer is off
STAGES = {"crawl", "deid", "verify", "tensors"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=3)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    archive = synth(args.patients, args.slices)
    n_files = sum(1 for p in archive.rglob("*") if p.is_file()) - 1
    print(f"archive: {n_files} files ({archive})")
    best: dict[tuple[bool, str], float] = {}
    for i in range(args.repeat):
        for sealed in (True, False) if i % 2 == 0 else (False, True):  # no order bias
            lake = OUT / f"enc-{'sealed' if sealed else 'clear'}"
            shutil.rmtree(lake, ignore_errors=True)
            cfg = config(lake, archive, MODEL, 2, STAGES, {"encrypt_at_rest": sealed})
            first, _ = timed(cfg)
            again, _ = timed(cfg)
            for what, wall in (("first", first), ("rerun", again)):
                key = (sealed, what)
                best[key] = min(best.get(key, wall), wall)
            print(f"  round {i + 1} sealed={sealed}: first {first:.1f} s, rerun {again:.1f} s")
    for what in ("first", "rerun"):
        s, c = best[(True, what)], best[(False, what)]
        print(f"{what:<6} sealed {s:7.1f} s  clear {c:7.1f} s  ratio {s / c:.2f}")


if __name__ == "__main__":
    main()
