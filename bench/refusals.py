"""Which series of a DICOM corpus become tensors, which are refused and why (issue #21).

Runs the real stages (crawl -> deid -> tensors, as ``pacsflow run`` does) over ``--corpus``
into a temporary lake, then tabulates, per modality: series, series stored (and tensors:
volumes, 2D images, cine), series refused by reason (numbers replaced by ``N``), series that
are no volume candidates (SR, SEG, ...), and objects quarantined by stage and reason. Every
refused series is listed with its full reason, named by a short hash of its pseudonym::

    python bench/refusals.py [--corpus ../shared/data/dicom] [--config EXTRA.yaml]
                             [--json OUT] [--markdown]

The same script runs on an older checkout (``PYTHONPATH=<checkout>``) for a before/after
table: it only uses the stages' ``run`` functions and the lake's tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml


def _norm(reason: str) -> str:
    text = re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", reason)
    return text if len(text) <= 110 else text[:107] + "..."


def survey(corpus: Path, extra: dict[str, Any], workers: int) -> dict[str, Any]:
    """Run the stages over ``corpus`` with ``extra`` config; the tables, summarised."""
    from pipeline.config import load_config
    from pipeline.connectors import FolderSource
    from pipeline.crawl import run as crawl_run
    from pipeline.deid.stage import run as deid_run
    from pipeline.lake import LakePaths, read_table
    from pipeline.tensors.stage import run as tensors_run

    overrides = {"compute": {"workers": workers}, **extra}
    cfg = load_config(overrides=overrides, environ={})
    with tempfile.TemporaryDirectory(prefix="refusals-") as tmp:
        lake = LakePaths(Path(tmp) / "lake")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            crawl_run(cfg, lake, FolderSource(corpus), run_id="crawl")
            deid_run(cfg, lake, key=b"r" * 32, run_id="deid")
            tensors_run(cfg, lake, run_id="tensors")
        seconds = time.perf_counter() - t0
        series = read_table(lake, "series").to_pylist()
        tensors = read_table(lake, "tensors").to_pylist()
        quarantine = read_table(lake, "quarantine").to_pylist()
    modality = {s["SeriesInstanceUID"]: s.get("Modality") or "(none)" for s in series}
    by_mod: dict[str, dict[str, Any]] = defaultdict(
        lambda: {
            "series": 0,
            "stored": 0,
            "refused": 0,
            "no_candidate": 0,
            "kinds": Counter(),
            "reasons": Counter(),
        }
    )
    rows_by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for t in tensors:
        rows_by_series[t["SeriesInstanceUID"]].append(t)
    refusals = []
    for uid, mod in sorted(modality.items()):
        m = by_mod[mod]
        m["series"] += 1
        rows = rows_by_series.get(uid, [])
        ok = [r for r in rows if r["status"] == "ok"]
        if ok:
            m["stored"] += 1
            for r in ok:
                m["kinds"][r.get("tensor_kind") or "volume"] += 1
        elif rows:
            reason = next(r["reason"] for r in rows if r["status"] == "refused")
            m["refused"] += 1
            m["reasons"][_norm(str(reason))] += 1
            short = hashlib.sha256(uid.encode()).hexdigest()[:8]
            refusals.append((mod, short, str(reason)))
        else:
            m["no_candidate"] += 1  # quarantined at deid, or no volume candidate objects
    quarantined = Counter(f"{q['stage']}: {q['reason']}" for q in quarantine)
    return {
        "seconds": round(seconds, 1),
        "by_modality": {
            k: {**v, "kinds": dict(v["kinds"]), "reasons": dict(v["reasons"])}
            for k, v in sorted(by_mod.items())
        },
        "refusals": sorted(refusals),
        "quarantined": dict(quarantined.most_common()),
    }


def _print(result: dict[str, Any], markdown: bool) -> None:
    total = Counter[str]()
    if markdown:
        print("| modality | series | stored (tensors) | refused | not reaching tensors |")
        print("|---|---:|---|---:|---:|")
    for mod, m in result["by_modality"].items():
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(m["kinds"].items()))
        for key in ("series", "stored", "refused", "no_candidate"):
            total[key] += m[key]
        if markdown:
            print(
                f"| {mod} | {m['series']} | {m['stored']} ({kinds or '-'}) | {m['refused']} | "
                f"{m['no_candidate']} |"
            )
        else:
            print(
                f"{mod:8s} series {m['series']:3d}  stored {m['stored']:3d} ({kinds or '-'})  "
                f"refused {m['refused']:3d}  not reaching tensors {m['no_candidate']:3d}"
            )
    print(
        f"\nall: {total['series']} series, {total['stored']} stored, {total['refused']} refused, "
        f"{total['no_candidate']} not reaching tensors ({result['seconds']} s)\n"
    )
    reasons = Counter[str]()
    for mod, m in result["by_modality"].items():
        for reason, n in m["reasons"].items():
            reasons[f"{mod}: {reason}"] += n
    print("refused, by reason:")
    for reason, n in reasons.most_common():
        print(f"{n:4d}  {reason}")
    print("\nquarantined objects, by stage and reason:")
    for reason, n in result["quarantined"].items():
        print(f"{n:4d}  {reason}")
    print("\nevery refused series:")
    for mod, short, reason in result["refusals"]:
        print(f"  {mod} {short}: {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("../shared/data/dicom"))
    parser.add_argument("--config", type=Path, default=None, help="extra config (YAML)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if not args.corpus.is_dir():
        print(f"refusals: no corpus at {args.corpus}", file=sys.stderr)
        return 2
    extra = yaml.safe_load(args.config.read_text()) if args.config else {}
    result = survey(args.corpus, extra or {}, args.workers)
    _print(result, args.markdown)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
