"""Fuzz crawl -> deid -> tensors with seeded mutants of real (or synthetic) DICOM files.

Every mutant must come out indexed, de-identified, tensorised or quarantined with a named
reason at each stage: no stage may fail, no quarantine message may say "unexpected", every
stage's counts reconcile, and the peak RSS stays bounded. Run::

    python bench/fuzz.py --mutants 5000 --seed 1 [--corpus ../shared/data/dicom] [--keep DIR]

It prints the counts (mutants, crashes, quarantined by stage and reason, peak RSS) and exits 1
on any crash. The corpus is every file of ``../shared/data/dicom`` up to ``--max-size`` bytes,
or a small synthetic archive (``pipeline.synth``) where the shared data is absent. Mutants of a
chunk share one lake; a chunk whose stages fail is split in halves, each in a lake of its own,
down to the mutants that make it fail (kept under ``--keep`` for a reproduction).
``tests/integration/test_fuzz.py`` runs a few thousand in CI through this script.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.dicom.sopclass import is_volume_candidate_class
from pipeline.enums import QuarantineReason
from pipeline.lake import LakePaths, read_table
from pipeline.synth.mutate import mutants
from pipeline.tensors.stage import run as tensors_run

KEY = b"f" * 32
_REASONS = frozenset(r.value for r in QuarantineReason)
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


def peak_rss_mb() -> int:
    """This process's peak resident memory (MB) since it started its program: ``VmHWM`` of
    /proc/self/status. Not ``ru_maxrss``: Linux carries that over ``fork`` and ``exec``, so a
    child of a big process (a test session of 1 GB) reports its parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # no /proc: an upper bound


def run_chain(archive: Path, lake_path: Path, cfg: PipelineConfig | None = None) -> dict[str, Any]:
    """Crawl ``archive`` into a new lake, de-identify and tensorise it (in-process), and
    reconcile every object; returns the counts and every problem found (empty: all good)."""
    cfg = cfg or load_config(
        overrides={"compute": {"workers": 1, "partition_size": 200}}, environ={}
    )
    lake = LakePaths(lake_path)
    crawl = crawl_run(cfg, lake, FolderSource(archive), run_id="fuzz-crawl").counts
    deid = deid_run(cfg, lake, key=KEY, run_id="fuzz-deid").counts
    tensors = tensors_run(cfg, lake, run_id="fuzz-tensors").counts
    return reconcile(lake, {"crawl": crawl, "deid": deid, "tensors": tensors})


def reconcile(lake: LakePaths, counts: dict[str, Any]) -> dict[str, Any]:
    """Check that every object is accounted for at each stage with a named reason."""
    problems: list[str] = []
    for stage, c in counts.items():
        if not c.reconciles:
            problems.append(f"{stage}: counts do not reconcile ({c})")
    quarantine = read_table(lake, "quarantine").to_pylist()
    reasons: Counter[tuple[str, str]] = Counter()
    for q in quarantine:
        reasons[(q["stage"], q["reason"])] += 1
        if q["reason"] not in _REASONS:
            problems.append(f"{q['stage']}: unnamed reason {q['reason']!r}")
        if "unexpected" in q["message"].lower():
            problems.append(f"{q['stage']}: 'unexpected' in {q['message']!r}")
    index = read_table(lake, "index", columns=["object_key", "state"]).to_pylist()
    indexed = {r["object_key"] for r in index}
    by_stage: dict[str, set[str]] = {}
    for q in quarantine:
        by_stage.setdefault(q["stage"], set()).add(q["object_key"])
    crawl = counts["crawl"]
    if crawl.out + crawl.quarantined != crawl.seen:
        problems.append("crawl: objects lost")
    if len(by_stage.get("crawl", set())) != crawl.quarantined:
        problems.append("crawl: quarantine rows do not match the count")
    vault = set()
    if (lake.restricted / "vault").exists():
        vault = {
            r["object_key"] for r in read_table(lake, "vault", columns=["object_key"]).to_pylist()
        }
    deid_q = by_stage.get("deid", set())
    if vault | deid_q != indexed or vault & deid_q:
        problems.append(
            f"deid: {len(indexed)} indexed, {len(vault)} de-identified, {len(deid_q)} quarantined"
        )
    # the tensors stage reads volume candidates only (no SR, PR, KO, SEG, RT*, documents)
    candidates = {
        r["object_key"]
        for r in read_table(
            lake, "index", columns=["object_key", "SOPClassUID", "has_pixel_data"]
        ).to_pylist()
        if is_volume_candidate_class(r["SOPClassUID"], r["has_pixel_data"])
    }
    tens = counts["tensors"]
    if tens.seen != len(vault & candidates) or not by_stage.get("tensors", set()) <= vault:
        problems.append(
            f"tensors: saw {tens.seen} of {len(vault & candidates)} de-identified volume candidates"
        )
    return {
        "counts": {k: (v.seen, v.out, v.quarantined, v.skipped) for k, v in counts.items()},
        "reasons": {f"{s}:{r}": n for (s, r), n in sorted(reasons.items())},
        "problems": problems,
    }


def corpus_files(corpus: Path | None, max_size: int, workdir: Path) -> list[Path]:
    """The files mutants are made from: the shared corpus (up to ``max_size`` bytes each, not
    its MANIFEST/README), or a synthetic archive written under ``workdir``."""
    if corpus is not None and corpus.is_dir():
        return sorted(
            p
            for p in corpus.rglob("*")
            if p.is_file() and p.stat().st_size <= max_size and p.parent != corpus
        )
    from pipeline.synth import synthesize

    out = workdir / "synth"
    synthesize(out, patients=1, seed=3, ct_slices=6, rows=32, columns=32, small=True)
    return sorted(p for p in out.rglob("*.dcm") if p.stat().st_size <= max_size)


def fuzz(
    n: int,
    seed: int,
    *,
    corpus: Path | None = DEFAULT_CORPUS,
    max_size: int = 64 << 10,
    chunk: int = 1000,
    keep: Path | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Make ``n`` mutants (seeded) and push them through the stages, ``chunk`` per lake."""
    logging.disable(logging.WARNING)  # a mutant per line would drown the counts
    t0 = time.perf_counter()
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="pacsflow-fuzz-")) if workdir is None else workdir
    try:
        files = corpus_files(corpus, max_size, work)
        made: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        crashes: list[dict[str, str]] = []
        problems: list[str] = []
        stream = mutants(files, n, seed)
        done = 0
        while done < n:
            archive = work / f"archive{done:07d}"
            archive.mkdir()
            names = []
            for i, (kind, data) in zip(range(min(chunk, n - done)), stream, strict=False):
                name = f"m{done + i:07d}-{kind}.dcm"
                (archive / name).write_bytes(data)
                names.append(name)
                made[kind] += 1
            done += len(names)
            result = _chain_or_culprits(archive, work, names, keep)
            crashes += result["crashes"]
            problems += result["problems"]
            reasons.update(result["reasons"])
            shutil.rmtree(archive, ignore_errors=True)
        return {
            "mutants": done,
            "sources": len(files),
            "by_mutation": dict(sorted(made.items())),
            "crashes": len(crashes),
            "crash_detail": crashes[:20],
            "problems": problems[:20],
            "quarantined": dict(sorted(reasons.items())),
            "peak_rss_mb": peak_rss_mb(),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _chain_or_culprits(
    archive: Path, work: Path, names: list[str], keep: Path | None
) -> dict[str, Any]:
    """Run the chain over ``names`` of ``archive``; where a stage fails, bisect the mutants
    (each half in a lake of its own) down to the ones that make it fail."""
    sub = work / "sub"
    shutil.rmtree(sub, ignore_errors=True)
    sub.mkdir()
    for name in names:
        (sub / name).hardlink_to(archive / name)
    lake = work / "sub-lake"
    try:
        out = run_chain(sub, lake)
        return {"crashes": [], "problems": out["problems"], "reasons": out["reasons"]}
    except Exception as exc:
        if len(names) == 1:
            tb = traceback.format_exception(exc)
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(archive / names[0], keep / names[0])
            crash = {"mutant": names[0], "error": type(exc).__name__, "at": tb[-2][-300:]}
            return {"crashes": [crash], "problems": [], "reasons": Counter()}
    finally:
        shutil.rmtree(lake, ignore_errors=True)
        shutil.rmtree(sub, ignore_errors=True)
    half = len(names) // 2
    first = _chain_or_culprits(archive, work, names[:half], keep)
    second = _chain_or_culprits(archive, work, names[half:], keep)
    return {
        "crashes": first["crashes"] + second["crashes"],
        "problems": first["problems"] + second["problems"],
        "reasons": Counter(first["reasons"]) + Counter(second["reasons"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--max-size", type=int, default=64 << 10, help="largest source file (bytes)")
    ap.add_argument("--chunk", type=int, default=1000, help="mutants per lake")
    ap.add_argument("--keep", type=Path, default=None, help="copy crashing mutants here")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)
    result = fuzz(
        args.mutants,
        args.seed,
        corpus=args.corpus,
        max_size=args.max_size,
        chunk=args.chunk,
        keep=args.keep,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 1 if result["crashes"] or result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
