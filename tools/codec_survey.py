"""Survey which pixel-data plug-ins decode the real DICOM in ``../shared/data/dicom``.

For every MANIFEST row of kind ``dicom`` with pixel data, tries each pydicom 3 decoding
plug-in available for its transfer syntax (one at a time), then pacsflow's own
:func:`pipeline.tensors.decode.decode_frames`, and prints a Markdown table per transfer syntax.

Usage: ``.venv/bin/python tools/codec_survey.py [DATA_DIR]``
"""

from __future__ import annotations

import csv
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pydicom
from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS
from pydicom.uid import UID

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _plugins(tsyntax: str) -> list[str]:
    entry = _PIXEL_DATA_DECODERS.get(UID(tsyntax))
    if entry is None:
        return []
    dec = entry[0]
    if not dec.is_encapsulated:
        return ["native"]
    return sorted(dec.available_plugins) if dec.is_available else []


def main(argv: list[str]) -> int:
    """Print the survey table; return 0."""
    from pipeline.tensors.decode import decode_frames_detail

    data = Path(argv[1]) if len(argv) > 1 else DEFAULT_DATA
    rows = list(csv.DictReader((data / "MANIFEST.csv").open(encoding="utf-8")))
    files: Counter[str] = Counter()
    ok_by_plugin: dict[str, Counter[str]] = defaultdict(Counter)
    ours_ok: Counter[str] = Counter()
    ours_by: dict[str, Counter[str]] = defaultdict(Counter)
    failures: dict[str, list[str]] = defaultdict(list)
    t0 = time.perf_counter()
    for row in rows:
        if row["kind"] != "dicom":
            continue
        path = data / row["relative_path"]
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            continue
        if not any(k in ds for k in PIXEL_KEYWORDS):
            continue
        ts = str(ds.file_meta.get("TransferSyntaxUID", "(none)"))
        name = UID(ts).name if ts != "(none)" else ts
        files[name] += 1
        for plugin in _plugins(ts):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds.pixel_array_options(decoding_plugin="" if plugin == "native" else plugin)
                    ds.pixel_array  # noqa: B018
                ok_by_plugin[name][plugin] += 1
            except Exception:
                pass
            finally:
                ds._pixel_array = None
                ds._pixel_id = {}
        ds.pixel_array_options(decoding_plugin="")
        try:
            _arr, used = decode_frames_detail(pydicom.dcmread(path, force=True))
            ours_ok[name] += 1
            ours_by[name][used] += 1
        except Exception as exc:
            failures[name].append(f"{row['relative_path']}: {type(exc).__name__}")
    print(
        "| Transfer syntax | files | each pydicom plug-in alone: files decoded "
        "| decode_frames OK | decoded by |"
    )
    print("|---|---|---|---|---|")
    for name in sorted(files, key=lambda n: -files[n]):
        plug = ", ".join(f"{p} {n}" for p, n in sorted(ok_by_plugin[name].items())) or "none"
        used = ", ".join(f"{p} {n}" for p, n in sorted(ours_by[name].items()))
        print(f"| {name} | {files[name]} | {plug} | {ours_ok[name]} | {used} |")
    print()
    for name, fails in sorted(failures.items()):
        for f in fails:
            print(f"- {name}: {f}")
    print(f"\n{sum(files.values())} files with pixel data, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
