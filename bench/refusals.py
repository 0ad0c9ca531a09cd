"""Which series of a DICOM corpus the tensors path refuses, and why (issue #21).

Groups the files under ``--corpus`` by Series Instance UID (of one ``--modality``, MR by
default; ``--modality ALL`` for every one), drops the objects that are not volume candidates as
the tensors stage does (:func:`pipeline.tensors.volume.is_volume_candidate`: no pixel data, or
a non-image SOP class), builds each series' volumes with
:func:`pipeline.tensors.volume.build_volumes` and prints one line per refusal reason (numbers
replaced by ``N``) with its count, then every refused series with its full reason::

    python bench/refusals.py [--corpus ../shared/data/dicom] [--modality MR] [--json OUT]

Series are named by their folder (relative to the corpus) and a short hash of their UID, never
by the UID itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pydicom

from pipeline.errors import GeometryError
from pipeline.tensors import volume as volume_mod


def _candidate(ds: Any) -> bool:
    check = getattr(volume_mod, "is_volume_candidate", None)
    if check is None:  # before issue #21: every object of a series was a candidate
        return True
    return bool(check(ds))


def _series(corpus: Path, modality: str) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                uid = str(ds.get("SeriesInstanceUID", ""))
                this = str(ds.get("Modality", ""))
        except Exception:
            continue
        if not uid or (modality != "ALL" and this != modality):
            continue
        groups[uid].append(path)
    return groups


def survey(corpus: Path, modality: str) -> dict[str, Any]:
    """Build every series of ``corpus``; the volumes made and the refusals by reason."""
    refused: list[tuple[str, str]] = []
    made: list[tuple[str, int]] = []
    skipped = 0
    for uid, paths in _series(corpus, modality).items():
        short = hashlib.sha256(uid.encode()).hexdigest()[:6]
        name = f"{paths[0].parent.relative_to(corpus)} [{short}]"
        datasets = []
        for path in paths:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(path)
            except Exception:
                continue
            if _candidate(ds):
                datasets.append(ds)
        if not datasets:
            skipped += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                volumes = volume_mod.build_volumes(datasets)
        except GeometryError as exc:
            refused.append((name, str(exc)))
            continue
        except Exception as exc:  # a decoding failure: the stage quarantines the object
            refused.append((name, f"not decodable ({type(exc).__name__})"))
            continue
        made.append((name, len(volumes)))
    by_reason = Counter(re.sub(r"\d+(\.\d+)?", "N", reason) for _, reason in refused)
    return {
        "series": len(refused) + len(made),
        "not_candidates": skipped,
        "ok": len(made),
        "volumes": sum(n for _, n in made),
        "refused": len(refused),
        "by_reason": dict(by_reason.most_common()),
        "refusals": sorted(refused),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("../shared/data/dicom"))
    parser.add_argument("--modality", default="MR")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = survey(args.corpus, args.modality)
    print(
        f"{result['series']} {args.modality} series: {result['ok']} ok "
        f"({result['volumes']} volumes), {result['refused']} refused; "
        f"{result['not_candidates']} series of non-image objects skipped"
    )
    for reason, n in result["by_reason"].items():
        print(f"{n:4d}  {reason}")
    print()
    for name, reason in result["refusals"]:
        print(f"  {name}: {reason}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
