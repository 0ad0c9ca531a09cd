"""Fetch the real test corpus from its origins into a cache, checking every SHA-256.

``make test-data`` runs this. The corpus is public data from pinned sources (GitHub commits,
PyPI releases); ``tools/test-data/registry.csv`` (written by ``gen_test_data_registry.py``)
says where each file comes from and what its SHA-256 is. The cache is laid out like
``../shared/data`` (``dicom/...``, ``labeled-ct/...``), so the tests' ``shared_data`` fixture
uses either.

- Where ``../shared/data`` (or ``$PACSFLOW_SHARED_DATA``) exists it *is* the filled cache:
  nothing is downloaded (``--verify`` hashes it against the registry, which takes a while).
- Otherwise files go to ``$PACSFLOW_TEST_DATA`` (default ``~/.cache/pacsflow-test-data``).
  A file whose SHA-256 differs from the registry never enters the cache. A run stopped
  halfway resumes: files already in the cache with the right hash are kept. After a run
  that got every file, ``.complete`` (the registry's SHA-256) marks the cache as usable.
- ``--mirror URL`` fetches ``https://HOST/PATH`` from ``URL/HOST/PATH`` instead (a local
  copy of the origins, e.g. ``python -m http.server`` over a folder laid out that way).

Downloads use pooch (``pip install pooch``; in pacsflow's ``dev`` extra).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "tools" / "test-data" / "registry.csv"
SHIPPED = REPO / "tools" / "test-data" / "files"
ENV_SHARED = "PACSFLOW_SHARED_DATA"
SHARED = Path(os.environ.get(ENV_SHARED) or REPO.parent / "shared" / "data")
ENV_CACHE = "PACSFLOW_TEST_DATA"
ENV_MIRROR = "PACSFLOW_TEST_DATA_MIRROR"
COMPLETE = ".complete"
ARCHIVES = "_archives"
#: Downloads that may fail in a row before the fetch stops (no network, a wrong mirror).
GIVE_UP = 10
#: Failure lines ``make test-data`` prints (the rest are counted).
SHOW_FAILED = 20


class FetchError(Exception):
    """One file could not be fetched or failed its check (one-line message)."""


@dataclass(frozen=True)
class Entry:
    """One registry row: a corpus file and where it comes from."""

    path: str
    sha256: str
    size: int
    url: str
    member: str


@dataclass
class Report:
    """What a fetch did: counts, and one line per file that failed."""

    present: int = 0
    fetched: int = 0
    failed: list[str] = field(default_factory=list)
    #: Files not tried because the fetch gave up (GIVE_UP downloads failed in a row).
    not_tried: int = 0
    #: Why the fetch gave up, if it did.
    stopped: str | None = None


def load_registry(path: Path | None = None) -> list[Entry]:
    """The registry's rows (default: ``tools/test-data/registry.csv``)."""
    with (path or REGISTRY).open(newline="", encoding="utf-8") as fh:
        return [
            Entry(r["path"], r["sha256"], int(r["size"]), r["url"], r["member"])
            for r in csv.DictReader(fh)
        ]


def registry_digest(path: Path | None = None) -> str:
    """SHA-256 of the registry file: the content of a complete cache's ``.complete``."""
    return hashlib.sha256((path or REGISTRY).read_bytes()).hexdigest()


def cache_dir() -> Path:
    """``$PACSFLOW_TEST_DATA``, or ``~/.cache/pacsflow-test-data``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pacsflow-test-data"


def data_root(shared: Path | None = None, cache: Path | None = None) -> Path | None:
    """Where the tests find the corpus: ``../shared/data``, else a complete cache, else None."""
    shared = SHARED if shared is None else shared
    if shared.is_dir():
        return shared
    cache = cache_dir() if cache is None else cache
    stamp = cache / COMPLETE
    if REGISTRY.is_file() and stamp.is_file() and stamp.read_text().strip() == registry_digest():
        return cache
    return None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def mirrored(url: str, mirror: str | None) -> str:
    """``url`` on the mirror: ``https://HOST/PATH`` -> ``MIRROR/HOST/PATH``."""
    if not mirror:
        return url
    parts = urlsplit(url)
    return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}"


def _store(data: bytes, entry: Entry, dest: Path) -> None:
    """Write ``data`` as ``entry``'s file when its hash matches; never a wrong file."""
    got = hashlib.sha256(data).hexdigest()
    if got != entry.sha256:
        raise FetchError(
            f"sha256 {got[:16]}... differs from the registry's {entry.sha256[:16]}...: not stored"
        )
    target = dest / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _member(archive: Path, entry: Entry) -> bytes:
    """The bytes of ``entry``'s member in a zip/wheel or tar archive."""
    name = entry.member
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                data = zf.read(name)
        else:
            with tarfile.open(archive) as tf:
                fh = tf.extractfile(name)
                if fh is None:
                    raise KeyError(name)
                data = fh.read()
    except KeyError:
        raise FetchError(f"{name} is not in {archive.name}") from None
    except (zipfile.BadZipFile, tarfile.TarError) as exc:
        raise FetchError(f"{archive.name} is not a readable archive: {exc}") from None
    return data


def _download(url: str, dest_dir: Path, name: str, sha256: str | None) -> Path:
    """Download ``url`` to ``dest_dir/name`` with pooch (hash-checked when ``sha256`` is set)."""
    import pooch  # a dev dependency: imported only when something must be downloaded
    import requests

    pooch.get_logger().setLevel(logging.WARNING)
    try:
        return Path(
            pooch.retrieve(
                url,
                known_hash=f"sha256:{sha256}" if sha256 else None,
                fname=name,
                path=dest_dir,
                progressbar=False,
            )
        )
    except ValueError as exc:
        if "hash" in str(exc):
            raise FetchError(f"sha256 of {url} differs from the registry's: not stored") from None
        raise FetchError(f"{url}: {exc}") from None
    except (requests.RequestException, OSError) as exc:
        raise FetchError(f"{url}: {type(exc).__name__}: {exc}") from None


def fetch(
    entries: Iterable[Entry],
    dest: Path,
    *,
    mirror: str | None = None,
    shipped: Path | None = None,
    say: Callable[[str], None] = print,
) -> Report:
    """Bring every entry into ``dest`` (checked); files already there and right are kept."""
    shipped = SHIPPED if shipped is None else shipped
    report = Report()
    missing: list[Entry] = []
    for e in entries:
        f = dest / e.path
        if f.is_file() and f.stat().st_size == e.size and sha256_file(f) == e.sha256:
            report.present += 1
        else:
            missing.append(e)
    by_archive: dict[str, list[Entry]] = {}
    direct = [e for e in missing if not e.member]
    for e in missing:
        if e.member:
            by_archive.setdefault(e.url, []).append(e)
    in_a_row = 0

    def gave_up(failed: bool, url: str) -> bool:
        nonlocal in_a_row
        in_a_row = in_a_row + 1 if failed else 0
        if in_a_row < GIVE_UP:
            return False
        host = urlsplit(mirrored(url, mirror)).netloc
        report.stopped = f"stopped: {GIVE_UP} downloads failed in a row; is {host} reachable?"
        return True

    for n, e in enumerate(direct, 1):
        try:
            if e.url.startswith("repo:"):
                _store((shipped / e.url.removeprefix("repo:")).read_bytes(), e, dest)
            else:
                target = dest / e.path
                _download(mirrored(e.url, mirror), target.parent, target.name, e.sha256)
            report.fetched += 1
            failed = False
        except (FetchError, OSError) as exc:
            report.failed.append(f"{e.path}: {exc}")
            failed = True
        if gave_up(failed, e.url):
            report.not_tried = len(missing) - n
            return report
        if n % 100 == 0:
            say(f"  {n}/{len(direct)} files")
    for url, members in by_archive.items():
        name = Path(urlsplit(url).path).name
        try:
            archive = _download(mirrored(url, mirror), dest / ARCHIVES, name, None)
            in_a_row = 0
        except FetchError as exc:
            report.failed.append(f"{len(members)} files (e.g. {members[0].path}): {exc}")
            continue
        bad = False
        for e in members:
            try:
                _store(_member(archive, e), e, dest)
                report.fetched += 1
            except FetchError as exc:
                report.failed.append(f"{e.path}: {exc}")
                bad = True
        if bad:  # a damaged archive: download it again next time
            archive.unlink(missing_ok=True)
        say(f"  {name}: {len(members)} files")
    return report


def verify(entries: Iterable[Entry], root: Path) -> list[str]:
    """One line per registry file that is missing from ``root`` or has another SHA-256."""
    problems = []
    for e in entries:
        f = root / e.path
        if not f.is_file():
            problems.append(f"{e.path}: missing")
        elif sha256_file(f) != e.sha256:
            problems.append(f"{e.path}: sha256 differs from the registry")
    return problems


def main(argv: list[str] | None = None) -> int:
    """``make test-data``: fill (or, with --verify, check) the test-data cache."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, help=f"the cache (default ${ENV_CACHE} or ~/.cache/...)")
    ap.add_argument("--mirror", default=os.environ.get(ENV_MIRROR), help="a local copy of origins")
    ap.add_argument("--verify", action="store_true", help="hash every file of the corpus")
    ap.add_argument(
        "--shared", type=Path, default=None, help="an already-filled corpus (../shared/data)"
    )
    args = ap.parse_args(argv)
    entries = load_registry()
    args.shared = SHARED if args.shared is None else args.shared
    if args.dest is None and args.shared.is_dir():
        print(f"test data: {args.shared} is present: nothing to download")
        if not args.verify:
            return 0
        problems = verify(entries, args.shared)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print(f"test data: {len(entries) - len(problems)}/{len(entries)} files verified")
        return 1 if problems else 0
    dest = args.dest or cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / COMPLETE).unlink(missing_ok=True)
    print(f"test data: fetching {len(entries)} files into {dest}")
    report = fetch(entries, dest, mirror=args.mirror)
    for line in report.failed[:SHOW_FAILED]:
        print(f"  {line}", file=sys.stderr)
    if len(report.failed) > SHOW_FAILED:
        print(f"  ... and {len(report.failed) - SHOW_FAILED} more", file=sys.stderr)
    if report.stopped:
        print(f"  {report.stopped}", file=sys.stderr)
    not_tried = f", {report.not_tried} not tried" if report.not_tried else ""
    print(
        f"test data: {report.present} already there, {report.fetched} fetched, "
        f"{len(report.failed)} failed{not_tried}"
    )
    if report.failed:
        print("test data: run `make test-data` again to retry the failed files", file=sys.stderr)
        return 1
    shutil.rmtree(dest / ARCHIVES, ignore_errors=True)
    (dest / COMPLETE).write_text(registry_digest() + "\n")
    print(f"test data: complete; the real-data tests use {dest} (${ENV_CACHE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
