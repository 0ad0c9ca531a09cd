"""De-identification throughput against its peers: same files, one run, ratios (issue #4).

Contenders, each over the same files, each writing de-identified Part 10 files to its own
folder under ``bench/out/`` (git-ignored):

- **copy** (the baseline, 1.0x): ``pydicom.dcmread(path).save_as(out)``, project .venv;
- **pacsflow export**: the export branch of ``pipeline.deid.stage.deid_batch``, file by file:
  ``stage.read_object`` (the header without pixels; the Pixel Data element's offset when it
  ends the file, else a full read) -> ``Deidentifier.from_config(Pseudonymizer(key),
  <config default deid section>).deidentify(ds, in_place=True)`` -> ``stage._export`` (the header by
  ``pipeline.deid.encode.encode_part10``, the pixel data copied from the source by
  ``copy_file_range``; temporary file and rename, named
  ``<study>/<series>/<sop>.dcm`` by pseudonyms under the pass's one output folder, as the
  stage writes them: a series' files share one folder; renamed ``<index>.dcm`` after the
  timed pass, untimed, for the checks), then one ``sync_filesystem``
  (syncfs) per pass, as ``deid_batch`` does once per batch (its time is spread over the files);
- **pacsflow tables**: ``stage.deid_batch`` on a fresh temporary lake with the default config
  (no export): header-only read (``stop_before_pixels``) through the folder connector,
  de-identification, the instance row (incl. ``header_json``) and the vault row, then one
  Parquet part each for ``instances`` and ``vault``; all files are one batch (the default
  partition size is 2,000). It writes no DICOM, so its ratio is "tables built per copied file";
- peers, in their own environments (``bash bench/deid_env.sh``): **dcmanon** (Rust, PyO3 wheel;
  ``Anonymizer().anonymize(path)`` -> bytes -> file), **dicognito** (``Anonymizer().anonymize
  (ds)``, saved as its CLI does), **dicom-anonymizer** (``anonymize_dicom_file``), **deid**
  (pydicom/deid, ``replace_identifiers`` with the default recipe ``DeidRecipe()``, then
  ``save_as`` as its ``save_dicom`` does) in ``bench/.venv-deid`` (pydicom 3.0.2), and
  **idiscore** (``create_default_core().deidentify(ds)``) in ``bench/.venv-deid-idiscore``
  (pydicom 2.4.5: idiscore needs pydicom < 3). The copy is also timed in both peer
  environments, as a check that the environments themselves do not differ.

Datasets:

- ``real`` (default): the uncompressed single-frame CT and MR Image Storage files of
  ``/work/shared/data/dicom`` (Explicit VR Little Endian, preamble, pixel data that decodes,
  per MANIFEST.csv, with Study, Series and SOP Instance UIDs) up to 384x384: 262 real files
  (247 MR, 15 CT; mostly 256x256, 114 kB on average);
- ``ct512`` (default): one 200-slice 512x512 16-bit uncompressed CT series from
  ``pacsflow synth --slices 200 --size 512 --no-mr --no-bad`` (cached in
  ``bench/out/deid-data/``; ~18 s the first time);
- ``synth-small`` (opt-in): ``pacsflow synth --small --patients 2 --no-bad``: 400 tiny
  (16x16) CT/MR instances with full headers, in mixed transfer syntaxes (per-file overhead).

Method: every contender is a long-lived worker process (imports, set-up and a 3-file warm-up
are not timed); the page cache is warm (all inputs are read first); each pass is timed over
all files of a dataset, file by file, contenders taking turns in a rotating order, each pass
starting after an (untimed) ``os.sync()`` so that none flushes another's writes; best of
``--repeats`` passes (peers more than 3x slower than the copy in their first pass run 2 passes,
more than 10x 1; copies and pacsflow always run all). Peers fail on some real files (dates like
``***``, odd AE values): time per file is taken over the files that every per-file contender
processed, so all ratios are on the same files (pacsflow tables, one batch, over all files
against the copy over all files). Ratio = copy's time per file / the contender's (above 1 =
faster than a plain read + write). Afterwards every output file is read back with pydicom
3.0.2 (``dcmread`` without ``force``, every element value decoded) and compared with its
source: pixel data unchanged, and whether the original SOP Instance UID is still in the file
meta (MediaStorageSOPInstanceUID) or in the dataset.

Usage::

    bash bench/deid_env.sh                           # once: the peers' environments
    .venv/bin/python bench/deid.py                   # real + ct512, best of 3 (~3-4 min)
    .venv/bin/python bench/deid.py --datasets real --repeats 5 --only copy,pacsflow-export
    .venv/bin/python bench/deid.py --profile         # cProfile of pacsflow's export path
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# `python bench/deid.py` puts bench/ first on sys.path, where this file would shadow the `deid`
# package (pydicom/deid) in the peers' worker: drop it (pacsflow is installed, not imported
# from here).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
DEFAULT_DATA = Path("/work/shared/data/dicom")
DATA_CACHE = BENCH / "out" / "deid-data"
#: A fixed 32-byte benchmark key (pseudonyms only; nothing here is real patient data).
KEY = b"pacsflow-bench-deid-key-32-bytes"
WARMUP_FILES = 3
#: Passes a slow peer runs at most, by how many times the copy's time its first pass took: a
#: peer over 3x slower runs 2 passes, over 10x 1 (keeps a full run within a few minutes; their
#: ratios are far from any goal). The copies and pacsflow always run --repeats passes.
SLOW_PASSES = ((10.0, 1), (3.0, 2))

ENVS = {
    "project": ROOT / ".venv" / "bin" / "python",
    "peers": BENCH / ".venv-deid" / "bin" / "python",
    "idiscore": BENCH / ".venv-deid-idiscore" / "bin" / "python",
}

#: name -> (environment, writes DICOM, description)
CONTENDERS: dict[str, tuple[str, bool, str]] = {
    "copy": ("project", True, "pydicom read + write (baseline)"),
    "pacsflow-export": ("project", True, "pacsflow export (in-place deid, _export, one syncfs)"),
    "pacsflow-export-nosync": ("project", True, "pacsflow export, without the syncfs (as peers)"),
    "pacsflow-tables": ("project", False, "pacsflow tables (deid_batch, header only)"),
    "dcmanon": ("peers", True, "dcmanon 0.3.1 (Rust, PyO3 wheel)"),
    "dicognito": ("peers", True, "dicognito 0.19.0"),
    "dicom-anonymizer": ("peers", True, "dicom-anonymizer 2.1.0"),
    "deid": ("peers", True, "deid 0.4.13, default recipe"),
    "idiscore": ("idiscore", True, "idiscore 1.2.0 (pydicom 2.4.5)"),
    "copy@peers": ("peers", True, "pydicom read + write in bench/.venv-deid"),
    "copy@idiscore": ("idiscore", True, "pydicom 2.4.5 read + write in its env"),
}


# ---------------------------------------------------------------------------------- worker
# Runs under any of the three interpreters: stdlib imports only at module level.


def _setup(name: str) -> tuple[str, Callable[..., Any], Callable[[Path], None] | None]:
    """(kind, fn, finish): per-file (``"file"``) or per-pass (``"batch"``) function, and what
    runs once at the end of a pass (timed with it)."""
    import pydicom

    if name.startswith("copy"):

        def copy(src: str, dst: Path) -> None:
            pydicom.dcmread(src).save_as(dst)

        return "file", copy, None

    if name.startswith("pacsflow"):
        from pipeline.config import load_config
        from pipeline.deid.core import Deidentifier
        from pipeline.deid.keys import Pseudonymizer
        from pipeline.deid.stage import _export, deid_batch, read_object
        from pipeline.lake import LakePaths, sync_filesystem

        cfg = load_config(environ={})
        deid = Deidentifier.from_config(Pseudonymizer(KEY), cfg.deid)
        if name.startswith("pacsflow-export"):
            # deid_batch's export branch, file by file: read (force), de-identify in place
            # (the dataset is ours), _export (atomic, not yet durable); then one
            # sync_filesystem for the pass, as deid_batch does once per batch
            # into one export folder (``dst.parent``), as the stage does: the series' files
            # share its <study>/<series> folder (a repeated SOP Instance UID gets its own);
            # the path written is returned so that the worker can name it by its source
            # after the timed pass
            def export(src: str, dst: Path) -> Path:
                with open(src, "rb") as fp:
                    ds, fp2, tail = read_object(fp, True)
                    out = deid.deidentify(ds, in_place=True).dataset
                    return _export(out, dst.parent, fp2, tail)

            return "file", export, (sync_filesystem if name == "pacsflow-export" else None)

        def tables(rows: list[dict[str, Any]], dst: Path, part: str) -> int:
            done = deid_batch(
                cfg, rows, secret_key=KEY, lake=LakePaths(dst / "lake"), run_id="bench", part=part
            )
            return len(rows) - int(done["out"])

        return "batch", tables, None

    if name == "dcmanon":
        from dcmanon import Anonymizer

        anon = Anonymizer()

        def dcmanon(src: str, dst: Path) -> None:
            dst.write_bytes(anon.anonymize(src))

        return "file", dcmanon, None

    if name == "dicognito":
        from dicognito.anonymizer import Anonymizer as DAnonymizer

        danon = DAnonymizer()

        def dicognito(src: str, dst: Path) -> None:
            with pydicom.dcmread(src) as ds:  # as its CLI: read, anonymize, save
                danon.anonymize(ds)
                ds.save_as(dst, enforce_file_format=True)

        return "file", dicognito, None

    if name == "dicom-anonymizer":
        from dicomanonymizer.simpledicomanonymizer import anonymize_dicom_file

        def dicom_anonymizer(src: str, dst: Path) -> None:
            anonymize_dicom_file(src, str(dst))

        return "file", dicom_anonymizer, None

    if name == "deid":
        from deid.config import DeidRecipe
        from deid.dicom import replace_identifiers

        recipe = DeidRecipe()  # the default recipe ("dicom"), loaded once

        def deid_(src: str, dst: Path) -> None:
            ds = replace_identifiers([src], deid=recipe, save=False)[0]
            ds.save_as(dst)  # what deid.dicom.utils.save_dicom does

        return "file", deid_, None

    if name == "idiscore":
        from idiscore.defaults import create_default_core

        core = create_default_core()

        def idiscore(src: str, dst: Path) -> None:
            core.deidentify(pydicom.dcmread(src)).save_as(dst)

        return "file", idiscore, None

    raise SystemExit(f"unknown contender {name!r}")


def _rows(listing: dict[str, Any]) -> list[dict[str, Any]]:
    """Index rows for deid_batch, as the crawl would have written them (folder source)."""
    root = Path(listing["root"]).resolve()
    rows = []
    for rel in listing["rel"]:
        st = (root / rel).stat()
        rows.append(
            {
                "object_key": rel,
                "source": str(root),
                "location": rel,
                "unit_key": rel,
                "PatientID": None,
                "fingerprint": f"{st.st_size}:{st.st_mtime_ns}",
                "size_bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns,
            }
        )
    return rows


def worker(name: str) -> int:
    """Serve timed passes for one contender: one JSON command per stdin line."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # peers' prints (and C-level writes) go to the log, not the protocol
    sys.stdout = sys.stderr
    warnings.simplefilter("ignore")  # all contenders alike
    kind, fn, finish = _setup(name)
    listings: dict[str, dict[str, Any]] = {}
    proto.write(json.dumps({"ready": name}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["list"] not in listings:
            listing = json.loads(Path(cmd["list"]).read_text())
            listing["abs"] = [str(Path(listing["root"]) / r) for r in listing["rel"]]
            if kind == "batch":
                listing["rows"] = _rows(listing)
            listings[cmd["list"]] = listing
        listing = listings[cmd["list"]]
        n = cmd.get("limit") or len(listing["abs"])
        dst = Path(cmd["dst"])
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        os.sync()  # untimed: no contender pays for another's dirty pages
        failed, error = 0, None
        times: list[float | None] | None = None
        clock = time.perf_counter
        t0 = clock()
        written: list[Any] = []
        if kind == "file":
            times = [None] * n
            written = [None] * n
            own = set(listing.get("own_folder", ())) if name.startswith("pacsflow") else set()
            for i, src in enumerate(listing["abs"][:n]):
                target = dst / f"{i:05d}" / "own.dcm" if i in own else dst / f"{i:05d}.dcm"
                t1 = clock()
                try:
                    written[i] = fn(src, target)
                    times[i] = clock() - t1
                except Exception as exc:
                    failed += 1
                    error = error or f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        else:
            try:
                failed = fn(listing["rows"][:n], dst, cmd["tag"])
            except Exception as exc:
                failed, error = n, f"{type(exc).__name__}: {exc}"[:160]
        t1 = clock()
        if finish is not None:
            finish(dst)
        seconds, finish_s = clock() - t0, clock() - t1
        _name_by_source(dst, written)  # untimed
        reply = {
            "seconds": seconds,
            "n": n,
            "failed": failed,
            "error": error,
            "times": times,
            "finish_seconds": finish_s,
        }
        proto.write(json.dumps(reply) + "\n")
    return 0


def _name_by_source(dst: Path, written: list[Any]) -> None:
    """Outputs a contender wrote under its own name (a returned path) renamed to
    ``dst/<source index>.dcm``, as the others write them, for :func:`check_outputs`."""
    moved = False
    for i, path in enumerate(written):
        if isinstance(path, Path) and path != dst / f"{i:05d}.dcm":
            path.replace(dst / f"{i:05d}.dcm")
            moved = True
    if moved:
        for folder in sorted((p for p in dst.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()


# ---------------------------------------------------------------------------------- datasets


def _real_files(data: Path, max_pixels: int, limit: int | None) -> list[str]:
    with open(data / "MANIFEST.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [
        r["relative_path"]
        for r in rows
        if r["kind"] == "dicom"
        and r["sop_class"] in ("CT Image Storage", "MR Image Storage")
        and r["transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
        and r["has_preamble_dicm"] == "yes"
        and not r["parse_error"]
        and r["pixel_decode"].startswith("ok")
        and r["study_instance_uid"]
        and r["series_instance_uid"]
        and r["sop_instance_uid"]
        and int(r["rows"]) * int(r["columns"]) <= max_pixels
    ]
    return sorted(keep)[:limit]


def _synth(out: Path, args: list[str]) -> None:
    cmd = [str(ROOT / ".venv" / "bin" / "pacsflow"), "synth", str(out), *args]
    print("  " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ct512(cache: Path) -> Path:
    """A 200-slice 512x512 uncompressed CT series (synthesised once, then cached)."""
    folder = cache / "ct512"
    if (folder / ".ready").exists():
        return folder
    import pydicom

    tmp = cache / "ct512-synth"
    shutil.rmtree(tmp, ignore_errors=True)
    _synth(
        tmp,
        [
            "--patients",
            "1",
            "--slices",
            "200",
            "--size",
            "512",
            "--no-mr",
            "--no-bad",
            "--workers",
            "2",
        ],
    )
    folders = {p.parent for p in tmp.rglob("*") if p.is_file() and p.suffix != ".json"}
    for series in sorted(folders):
        files = sorted(p for p in series.iterdir() if p.is_file())
        if len(files) != 200:
            continue
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        if (
            ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            and ds.Rows == 512
            and ds.Columns == 512
            and ds.BitsAllocated == 16
        ):
            shutil.rmtree(folder, ignore_errors=True)
            series.rename(folder)
            break
    else:
        raise SystemExit("pacsflow synth wrote no uncompressed 512x512 CT series of 200 slices")
    shutil.rmtree(tmp, ignore_errors=True)
    (folder / ".ready").write_text("pacsflow synth --patients 1 --slices 200 --size 512\n")
    return folder


def _synth_small(cache: Path) -> Path:
    folder = cache / "synth-small"
    if not (folder / ".ready").exists():
        shutil.rmtree(folder, ignore_errors=True)
        _synth(folder, ["--patients", "2", "--small", "--no-bad"])
        (folder / ".ready").write_text("pacsflow synth --patients 2 --small --no-bad\n")
    return folder


def _tree(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".json"
    )


def prepare(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """{"root", "rel", "desc"} of a dataset."""
    if name == "real":
        rel = _real_files(args.data, args.max_pixels, args.limit)
        desc = f"{len(rel)} real uncompressed CT/MR files from {args.data}"
        return {"root": str(args.data), "rel": rel, "desc": desc}
    if name == "ct512":
        root = _ct512(DATA_CACHE)
        rel = _tree(root)[: args.limit]
        return {"root": str(root), "rel": rel, "desc": f"{len(rel)}-slice 512x512 CT (synth)"}
    if name == "synth-small":
        root = _synth_small(DATA_CACHE)
        rel = _tree(root)[: args.limit]
        desc = f"{len(rel)} 16x16 CT/MR (synth --small, mixed syntaxes)"
        return {"root": str(root), "rel": rel, "desc": desc}
    raise SystemExit(f"unknown dataset {name!r}")


def _originals(listing: dict[str, Any]) -> list[dict[str, Any]]:
    """SOP Instance UID and pixel hash of each input (and the page cache warmed)."""
    import pydicom

    out = []
    for rel in listing["rel"]:
        path = Path(listing["root"]) / rel
        path.read_bytes()
        ds = pydicom.dcmread(path, force=True)
        px = ds.get("PixelData")
        out.append(
            {
                "sop": str(ds.get("SOPInstanceUID", "")),
                "pixels": hashlib.sha1(px).hexdigest() if px is not None else None,
            }
        )
    return out


def check_outputs(folder: Path, originals: list[dict[str, Any]]) -> dict[str, int]:
    """Read every output back with pydicom and compare with its source."""
    import pydicom

    counts = {"files": 0, "reads": 0, "pixels_same": 0, "meta_sop_orig": 0, "ds_sop_orig": 0}
    for path in sorted(folder.rglob("*.dcm")):
        index = int(path.relative_to(folder).parts[0].removesuffix(".dcm"))
        orig = originals[index]
        counts["files"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path)
                for elem in ds.iterall():
                    _ = elem.value
        except Exception:
            continue
        counts["reads"] += 1
        px = ds.get("PixelData")
        if orig["pixels"] is not None and px is not None:
            counts["pixels_same"] += hashlib.sha1(px).hexdigest() == orig["pixels"]
        meta = getattr(ds, "file_meta", None)
        if not orig["sop"]:
            continue
        if meta is not None and str(meta.get("MediaStorageSOPInstanceUID", "")) == orig["sop"]:
            counts["meta_sop_orig"] += 1
        if str(ds.get("SOPInstanceUID", "")) == orig["sop"]:
            counts["ds_sop_orig"] += 1
    return counts


# ---------------------------------------------------------------------------------- driver


class Worker:
    """A contender's worker process, talking JSON lines."""

    def __init__(self, name: str, log: Path):
        env, _writes, _desc = CONTENDERS[name]
        self.name = name
        self.log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(  # answers {"ready": name} once set up: see ready()
            [str(ENVS[env]), str(Path(__file__).resolve()), "--worker", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
        )

    def ready(self) -> None:
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died; see {self.log.name}")
        return dict(json.loads(line))

    def run(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "run", **cmd}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


def _max_passes(name: str, passes: dict[str, list[dict[str, Any]]]) -> int:
    if name.startswith(("copy", "pacsflow")) or not passes[name] or not passes["copy"]:
        return 1_000_000
    slower = passes[name][0]["seconds"] / passes["copy"][0]["seconds"]
    return next((most for factor, most in SLOW_PASSES if slower > factor), 1_000_000)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in CONTENDERS if not args.only or n in args.only]
    missing = sorted({CONTENDERS[n][0] for n in names if not ENVS[CONTENDERS[n][0]].exists()})
    if missing:
        print(f"skipping contenders of missing environments {missing}: run bash bench/deid_env.sh")
        names = [n for n in names if CONTENDERS[n][0] not in missing]
    if "copy" not in names:
        names.insert(0, "copy")
    results: dict[str, Any] = {"date": dt.date.today().isoformat(), "datasets": {}}
    print(f"starting {len(names)} workers (imports and set-up not timed)", flush=True)
    (out / "logs").mkdir(exist_ok=True)
    workers = {n: Worker(n, out / "logs" / f"{n}.log") for n in names}
    try:
        for w in workers.values():  # they start in parallel
            w.ready()
        for dname in args.datasets:
            listing = prepare(dname, args)
            originals = _originals(listing)
            # sources whose SOP Instance UID an earlier one has (the real corpus holds a few
            # objects twice): pacsflow names its output by that UID's pseudonym, so these get
            # a folder of their own instead of replacing the earlier output
            seen: set[str] = set()
            listing["own_folder"] = [
                i for i, o in enumerate(originals) if o["sop"] in seen or seen.add(o["sop"])
            ]
            list_path = out / f"{dname}.json"
            list_path.write_text(json.dumps(listing))
            n = len(listing["rel"])
            size = sum((Path(listing["root"]) / r).stat().st_size for r in listing["rel"])
            print(f"\n== {dname}: {listing['desc']}, {size / 2**20:.1f} MiB", flush=True)
            passes: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
            for name, w in workers.items():  # warm-up, not timed
                w.run(
                    list=str(list_path),
                    dst=str(out / dname / name / "warm"),
                    limit=WARMUP_FILES,
                    tag="warm",
                )
                shutil.rmtree(out / dname / name / "warm", ignore_errors=True)
            order = list(workers)
            for rep in range(args.repeats):
                k = rep % len(order)
                for name in order[k:] + order[:k]:
                    if rep and rep >= _max_passes(name, passes):
                        continue
                    r = workers[name].run(
                        list=str(list_path), dst=str(out / dname / name / "run"), tag=f"r{rep}"
                    )
                    passes[name].append(r)
                print(f"  pass {rep + 1}/{args.repeats} done", flush=True)
            # ratios over the files that every per-file contender processed (failures differ)
            common = [
                i
                for i in range(n)
                if all(
                    p["times"][i] is not None
                    for ps in passes.values()
                    for p in ps
                    if p["times"] is not None
                )
            ]

            def per_file(r: dict[str, Any], n: int = n, common: list[int] = common) -> float:
                if r["times"] is None:  # a batch: all files, one time
                    return float(r["seconds"]) / n
                # a once-per-pass step (pacsflow's sync) is spread over all files
                once = r["finish_seconds"] / n
                return sum(r["times"][i] for i in common) / len(common) + once

            base = min(per_file(r) for r in passes["copy"])
            base_all = min(r["seconds"] for r in passes["copy"]) / n  # copy never fails here
            # read-back checks after the timing, two at a time
            with concurrent.futures.ProcessPoolExecutor(2) as pool:
                futures = {
                    name: pool.submit(check_outputs, out / dname / name / "run", originals)
                    for name in workers
                    if CONTENDERS[name][1]
                }
                checked = {name: f.result() for name, f in futures.items()}
            rows = []
            for name in workers:
                _env, _writes, desc = CONTENDERS[name]
                best = min(passes[name], key=per_file)
                t = per_file(best)
                checks = checked.get(name)
                rows.append(
                    {
                        "contender": name,
                        "desc": desc,
                        "passes": len(passes[name]),
                        "ms_per_file": 1000 * t,
                        "sync_ms_per_file": 1000 * best["finish_seconds"] / n,
                        "ratio": (base if best["times"] is not None else base_all) / t,
                        "failed": best["failed"],
                        "error": best["error"],
                        "checks": checks,
                    }
                )
            results["datasets"][dname] = {
                "desc": listing["desc"],
                "files": n,
                "common": len(common),
                "mib": size / 2**20,
                "copy_ms_all": 1000 * base_all,
                "rows": rows,
            }
            _print_table(dname, results["datasets"][dname])
            if not args.keep:
                shutil.rmtree(out / dname, ignore_errors=True)
    finally:
        for w in workers.values():
            w.close()
    return results


def _fmt_checks(c: dict[str, int] | None, n: int) -> tuple[str, str, str]:
    if c is None:
        return "-", "-", "-"
    reads = f"{c['reads']}/{n}" if c["files"] == n else f"{c['reads']}/{c['files']} of {n}"
    return reads, f"{c['pixels_same']}", f"{c['meta_sop_orig']} / {c['ds_sop_orig']}"


def _print_table(dname: str, d: dict[str, Any]) -> None:
    n = d["files"]
    print(
        f"\n{dname}: {d['desc']} ({d['mib']:.1f} MiB); best pass; ms per file over the "
        f"{d['common']} files all contenders processed (tables: over all {n}; copy "
        f"{d['copy_ms_all']:.2f} ms/file over all)"
    )
    head = f"{'contender':<26}{'ms/file':>9}{'vs copy':>9}{'passes':>7}{'failed':>7}  "
    head += f"{'reads back':<12}"
    print(head + f"{'pixels ==':>10}  orig SOP UID in meta / dataset")
    for r in d["rows"]:
        reads, px, sop = _fmt_checks(r["checks"], n)
        print(
            f"{r['contender']:<26}{r['ms_per_file']:>9.2f}{r['ratio']:>8.2f}x{r['passes']:>7}"
            f"{r['failed']:>7}  "
            f"{reads:<12}{px:>10}  {sop}"
        )
        if r["error"]:
            print(f"{'':<28}first error: {r['error'].splitlines()[0]}")
        if r["sync_ms_per_file"] >= 0.005:
            print(f"{'':<28}of which the pass's one syncfs: {r['sync_ms_per_file']:.2f} ms/file")


def markdown(results: dict[str, Any]) -> str:
    """The tables for bench/RESULTS.md."""
    lines = []
    for dname, d in results["datasets"].items():
        n = d["files"]
        lines += [
            f"**{dname}**: {d['desc']} ({d['mib']:.1f} MiB); ms/file over the {d['common']} "
            f"files every contender processed (tables: over all {n})",
            "",
            "| contender | ms/file | vs copy | passes | failed | reads back | pixels same "
            "| orig. SOP UID in meta / dataset |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            reads, px, sop = _fmt_checks(r["checks"], n)
            lines.append(
                f"| {r['desc']} | {r['ms_per_file']:.2f} | {r['ratio']:.2f}x | {r['passes']} | "
                f"{r['failed']} | "
                f"{reads} | {px} | {sop} |"
            )
        lines.append("")
    return "\n".join(lines)


def _goals(results: dict[str, Any]) -> None:
    def ratio(dname: str, name: str) -> float | None:
        d = results["datasets"].get(dname)
        r = next((r for r in d["rows"] if r["contender"] == name), None) if d else None
        return r["ratio"] if r else None

    print("\ngoals (pacsflow export's ratio / the peer's; with the syncfs / without, as peers):")
    for dname in results["datasets"]:
        mine = ratio(dname, "pacsflow-export")
        nosync = ratio(dname, "pacsflow-export-nosync")
        for peer, want in (("dicognito", 3.0), ("dcmanon", 1.0)):
            other = ratio(dname, peer)
            if mine and other:
                alt = f" / {nosync / other:.2f}x" if nosync else ""
                print(f"  {dname}: vs {peer}: {mine / other:.2f}x{alt} (goal >= {want}x)")


# ---------------------------------------------------------------------------------- profile


def _export_phases(deid: Any, src: str, dst: Path, phases: dict[str, float] | None) -> None:
    """pacsflow's export path, as ``stage.read_object`` + ``stage._export`` (without the
    batch's syncfs), adding each phase's seconds to ``phases``."""
    import pydicom

    from pipeline.lake import atomic_write_bytes

    try:  # the export's own encoder (since a4f5eb0); pydicom's save_as before it
        from pipeline.deid.encode import encode_part10
    except ImportError:

        def encode_part10(ds: Any) -> bytes:  # type: ignore[misc]
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            return buf.getvalue()

    try:  # the header read and pixel-tail copy of the stage (older revisions: a full read)
        from pipeline.deid.encode import write_with_tail
        from pipeline.deid.stage import read_object
    except ImportError:
        read_object = None  # type: ignore[assignment]

    clock = time.perf_counter
    with open(src, "rb") as fp:
        t0 = clock()
        if read_object is not None:
            ds, source, tail = read_object(fp, True)
        else:
            ds, source, tail = pydicom.dcmread(fp, force=True), fp, None
        t1 = clock()
        out = deid.deidentify(ds, in_place=True).dataset
        t2 = clock()
        data = encode_part10(out)
        t3 = clock()
        if tail is not None:
            write_with_tail(dst, data, source, tail)
        else:
            atomic_write_bytes(dst, data, durable=False)
        t4 = clock()
    if phases is not None:
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            phases[k] += v


def profile(args: argparse.Namespace) -> None:
    """cProfile of pacsflow's export path per dataset, plus a phase breakdown."""
    import cProfile
    import pstats

    import pydicom

    from pipeline.config import load_config
    from pipeline.deid.core import Deidentifier
    from pipeline.deid.keys import Pseudonymizer

    deid = Deidentifier.from_config(Pseudonymizer(KEY), load_config(environ={}).deid)
    warnings.simplefilter("ignore")
    for dname in args.datasets:
        listing = prepare(dname, args)
        files = [str(Path(listing["root"]) / r) for r in listing["rel"]]
        for f in files[:WARMUP_FILES]:
            deid.deidentify(pydicom.dcmread(f, force=True))
        phases = {"read": 0.0, "deidentify": 0.0, "encode": 0.0, "write": 0.0}
        dst = args.out / "profile" / dname
        dst.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files):
            _export_phases(deid, f, dst / f"{i:05d}.dcm", phases)
        total = sum(phases.values())
        print(f"\n== {dname}: {listing['desc']}; {1000 * total / len(files):.2f} ms/file")
        print("   " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in phases.items()))
        prof = cProfile.Profile()
        prof.enable()
        for i, f in enumerate(files):
            _export_phases(deid, f, dst / f"{i:05d}.dcm", None)
        prof.disable()
        stats = pstats.Stats(prof, stream=sys.stdout).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.profile_top)
        stats.sort_stats("cumulative").print_stats(args.profile_top)
        print("pacsflow's own functions (pipeline/deid):")
        stats.sort_stats("tottime").print_stats(r"core\.py|profile\.py|keys\.py", args.profile_top)
    shutil.rmtree(args.out / "profile", ignore_errors=True)


# ---------------------------------------------------------------------------------- main


def _revision() -> str:
    """The commit, and whether pipeline/ differs from it (others may be editing it)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "pipeline"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"{head}{' + uncommitted changes in pipeline/' if dirty else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--datasets",
        default="real,ct512",
        help="comma-separated: real, ct512, synth-small (default: real,ct512)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="passes per contender; best counts")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated contenders (copy always runs): {', '.join(CONTENDERS)}",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the real DICOM folder")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=384 * 384,
        help="real set: largest Rows x Columns (default 384x384)",
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many files per set")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: bench/out/deid-<time>, removed unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the de-identified outputs")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead: cProfile pacsflow's export path on each dataset",
    )
    parser.add_argument("--profile-top", type=int, default=25, help="rows of each profile table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.only = {n for n in args.only.split(",") if n}
    if unknown := args.only - set(CONTENDERS):
        parser.error(f"unknown contenders {sorted(unknown)}")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    scratch = args.out is None
    args.out = (args.out or BENCH / "out" / f"deid-{stamp}").resolve()
    t0 = time.perf_counter()
    try:
        if args.profile:
            profile(args)
            return 0
        results = bench(args)
    finally:
        if scratch and not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    _goals(results)
    results["wall_s"] = time.perf_counter() - t0
    python = sys.version.split()[0]
    results["pacsflow"] = _revision()
    print(
        f"\nwall {results['wall_s']:.0f} s; cpu count {os.cpu_count()}; python {python}; "
        f"pacsflow at {results['pacsflow']}"
    )
    if args.markdown:
        print("\n" + markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
