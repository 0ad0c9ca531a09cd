"""`make test-data`: the corpus registry and its fetcher, against a local mirror on loopback.

These machines reach no code host, so the origins are a folder laid out as their URLs
(``HOST/PATH``) behind a real ``http.server`` on 127.0.0.1; the fetcher is pointed at it with
``--mirror``. Nothing is mocked: real downloads (pooch), real archives, real hashes.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
pytest.importorskip("pooch", reason="pooch (pacsflow[dev]) is not installed")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ftd = _load("fetch_test_data")
gen = _load("gen_test_data_registry")


# --------------------------------------------------------------------------------------------
# a mirror of the origins on loopback
# --------------------------------------------------------------------------------------------


@dataclass
class Mirror:
    root: Path
    url: str
    requests: list[str] = field(default_factory=list)

    def put(self, url: str, data: bytes) -> None:
        """Place ``data`` where ``url`` (https://HOST/PATH) lies on the mirror."""
        from urllib.parse import unquote, urlsplit

        u = urlsplit(url)
        path = self.root / u.netloc / unquote(u.path.lstrip("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    root = tmp_path / "mirror"
    root.mkdir()
    seen: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            seen.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Mirror(root, f"http://127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


GH = "https://raw.githubusercontent.com/acme/dicoms/0123abcd"
PYPI = "https://files.pythonhosted.org/packages"


@pytest.fixture
def corpus(mirror: Mirror, tmp_path: Path) -> list[Any]:
    """Registry entries of a small corpus of every kind, published on the mirror."""
    raw = {"a.dcm": b"DICM raw one" * 50, "dir with space/b 2.dcm": b"DICM raw two" * 70}
    entries = []
    for name, data in raw.items():
        url = f"{GH}/{name.replace(' ', '%20')}"
        mirror.put(url, data)
        entries.append(ftd.Entry(f"dicom/acme/{name}", _sha(data), len(data), url, ""))
    # a zip inside a repository, and a wheel
    for url, members in (
        (f"{GH}/series.zip", {"701/000.dcm": b"slice 0" * 30, "701/001.dcm": b"slice 1" * 30}),
        (f"{PYPI}/py3/p/pkg/pkg-1.0-py3-none-any.whl", {"pkg/data/x.dcm": b"wheel file"}),
    ):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for m, data in members.items():
                zf.writestr(m, data)
        mirror.put(url, buf.getvalue())
        for m, data in members.items():
            entries.append(ftd.Entry(f"dicom/zipped/{m}", _sha(data), len(data), url, m))
    # an sdist: members under the "pkg-2.0/" prefix
    buf = io.BytesIO()
    data = b"sdist file" * 9
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("pkg-2.0/pkg/data/y.dcm")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    url = f"{PYPI}/source/p/pkg/pkg-2.0.tar.gz"
    mirror.put(url, buf.getvalue())
    entries.append(
        ftd.Entry("dicom/sdist/y.dcm", _sha(data), len(data), url, "pkg-2.0/pkg/data/y.dcm")
    )
    # a file the corpus builder wrote, shipped in the repository
    shipped = tmp_path / "shipped"
    (shipped / "dicom").mkdir(parents=True)
    (shipped / "dicom" / "MANIFEST.csv").write_bytes(b"relative_path,sha256\n")
    data = (shipped / "dicom" / "MANIFEST.csv").read_bytes()
    entries.append(
        ftd.Entry("dicom/MANIFEST.csv", _sha(data), len(data), "repo:dicom/MANIFEST.csv", "")
    )
    return entries


def _fetch(corpus: list[Any], dest: Path, mirror: Mirror, tmp_path: Path) -> Any:
    return ftd.fetch(
        corpus, dest, mirror=mirror.url, shipped=tmp_path / "shipped", say=lambda s: None
    )


def _parts(dest: Path) -> list[Path]:
    return [p for p in dest.rglob("*") if p.name.startswith((".part-", "tmp"))]


# --------------------------------------------------------------------------------------------
# the fetcher
# --------------------------------------------------------------------------------------------


def test_fetch_lays_out_every_kind_of_origin_and_checks_hashes(
    corpus: list[Any], mirror: Mirror, tmp_path: Path
) -> None:
    dest = tmp_path / "cache"
    report = _fetch(corpus, dest, mirror, tmp_path)
    assert report.failed == []
    assert (report.fetched, report.present) == (len(corpus), 0)
    for e in corpus:
        assert _sha((dest / e.path).read_bytes()) == e.sha256, e.path
    assert ftd.verify(corpus, dest) == []
    assert _parts(dest) == []


def test_sha256_mismatch_is_a_clear_error_and_never_enters_the_cache(
    corpus: list[Any], mirror: Mirror, tmp_path: Path
) -> None:
    raw, member = corpus[0], next(e for e in corpus if e.url.endswith("series.zip"))
    mirror.put(raw.url, b"tampered")  # a raw file: pooch's own hash check
    bad = [
        ftd.Entry(
            member.path, "0" * 64, member.size, member.url, member.member
        ),  # an archive member
        *[e for e in corpus if e.path != member.path],
    ]
    dest = tmp_path / "cache"
    report = _fetch(bad, dest, mirror, tmp_path)
    assert len(report.failed) == 2, report.failed
    assert sorted(line.split(": ")[0] for line in report.failed) == sorted([raw.path, member.path])
    assert all("sha256" in line and "not stored" in line for line in report.failed)
    assert not (dest / raw.path).exists()
    assert not (dest / member.path).exists()
    assert _parts(dest) == []
    assert report.fetched == len(corpus) - 2


def test_a_stopped_fetch_resumes_with_the_missing_files_only(
    corpus: list[Any], mirror: Mirror, tmp_path: Path
) -> None:
    raw = corpus[1]
    good = mirror.root / "raw.githubusercontent.com/acme/dicoms/0123abcd/dir with space/b 2.dcm"
    kept = good.read_bytes()
    good.unlink()  # the origin is unreachable for this file on the first run
    dest = tmp_path / "cache"
    first = _fetch(corpus, dest, mirror, tmp_path)
    assert [line.split(": ")[0] for line in first.failed] == [raw.path]
    assert "404" in first.failed[0]
    assert first.fetched == len(corpus) - 1
    good.write_bytes(kept)
    (dest / corpus[0].path).write_bytes(b"damaged in the cache")  # a wrong file is replaced
    mirror.requests.clear()
    second = _fetch(corpus, dest, mirror, tmp_path)
    assert second.failed == []
    assert (second.fetched, second.present) == (2, len(corpus) - 2)
    assert sorted(mirror.requests) == sorted(
        "/raw.githubusercontent.com" + e.url.removeprefix("https://raw.githubusercontent.com")
        for e in (corpus[0], raw)
    )
    assert ftd.verify(corpus, dest) == []


def test_an_unreachable_origin_is_one_line_per_file(corpus: list[Any], tmp_path: Path) -> None:
    report = ftd.fetch(
        corpus[:1], tmp_path / "cache", mirror="http://127.0.0.1:9", say=lambda s: None
    )
    assert len(report.failed) == 1
    assert report.failed[0].count("\n") == 0
    assert "ConnectionError" in report.failed[0]


def test_the_fetch_gives_up_when_the_origin_is_unreachable(tmp_path: Path) -> None:
    many = [ftd.Entry(f"dicom/f{i}.dcm", "0" * 64, 1, f"{GH}/f{i}.dcm", "") for i in range(25)]
    many.append(ftd.Entry("dicom/z.dcm", "0" * 64, 1, f"{GH}/z.zip", "z.dcm"))
    report = ftd.fetch(many, tmp_path / "cache", mirror="http://127.0.0.1:9", say=lambda s: None)
    assert len(report.failed) == ftd.GIVE_UP
    assert report.stopped == (
        f"stopped: {ftd.GIVE_UP} downloads failed in a row; is 127.0.0.1:9 reachable?"
    )
    assert report.not_tried == len(many) - ftd.GIVE_UP


def test_a_member_missing_from_its_archive_is_named(
    corpus: list[Any], mirror: Mirror, tmp_path: Path
) -> None:
    e = next(e for e in corpus if e.member.endswith("x.dcm"))
    gone = ftd.Entry(e.path, e.sha256, e.size, e.url, "pkg/data/absent.dcm")
    report = _fetch([gone], tmp_path / "cache", mirror, tmp_path)
    assert report.failed == [f"{e.path}: pkg/data/absent.dcm is not in pkg-1.0-py3-none-any.whl"]


# --------------------------------------------------------------------------------------------
# make test-data (main) and where the tests look
# --------------------------------------------------------------------------------------------


def test_make_test_data_fills_the_cache_and_the_fixture_finds_it(
    corpus: list[Any], mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "registry.csv"
    with registry.open("w", newline="") as fh:
        fh.write("path,sha256,size,url,member\n")
        for e in corpus:
            fh.write(f'"{e.path}",{e.sha256},{e.size},{e.url},{e.member}\n')
    monkeypatch.setattr(ftd, "REGISTRY", registry)
    monkeypatch.setattr(ftd, "SHIPPED", tmp_path / "shipped")
    cache, nowhere = tmp_path / "cache", tmp_path / "no-shared-data"
    monkeypatch.setenv(ftd.ENV_CACHE, str(cache))

    mirror.put(corpus[0].url, b"tampered")
    assert ftd.main(["--shared", str(nowhere), "--mirror", mirror.url]) == 1
    assert ftd.data_root(nowhere) is None  # an incomplete cache is not used
    mirror.put(corpus[0].url, b"DICM raw one" * 50)
    assert ftd.main(["--shared", str(nowhere), "--mirror", mirror.url]) == 0
    assert ftd.data_root(nowhere) == cache
    assert not (cache / ftd.ARCHIVES).exists()
    # a newer registry makes the cache stale until `make test-data` runs again
    registry.write_text(registry.read_text() + f"dicom/new.dcm,{'1' * 64},1,{GH}/new.dcm,\n")
    assert ftd.data_root(nowhere) is None
    # ../shared/data present: used as it is, nothing downloaded
    shared = tmp_path / "shared"
    shared.mkdir()
    mirror.requests.clear()
    assert ftd.main(["--shared", str(shared), "--mirror", mirror.url]) == 0
    assert mirror.requests == []
    assert ftd.data_root(shared) == shared


def test_verify_reports_missing_and_changed_files(corpus: list[Any], tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / corpus[0].path).parent.mkdir(parents=True)
    (root / corpus[0].path).write_bytes(b"other bytes")
    problems = ftd.verify(corpus[:2], root)
    assert problems == [
        f"{corpus[0].path}: sha256 differs from the registry",
        f"{corpus[1].path}: missing",
    ]


def test_make_test_summary_counts_the_skips_for_missing_data(tmp_path: Path) -> None:
    (tmp_path / "test_real.py").write_text(
        "def test_one(shared_data):\n    pass\n\n"
        "def test_two(shared_data):\n    pass\n\n"
        "def test_other():\n    pass\n"
    )
    env = {
        **os.environ,
        "PACSFLOW_SHARED_DATA": str(tmp_path / "absent"),
        "PACSFLOW_TEST_DATA": str(tmp_path / "empty-cache"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
    }
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_real.py")],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 tests skipped: real DICOM corpus absent; run `make test-data`" in out.stdout


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


def test_registry_matches_the_corpus_manifests(shared_data: Path) -> None:
    assert gen.render(shared_data) == gen.REGISTRY.read_text(encoding="utf-8"), (
        "tools/test-data/registry.csv is out of date: run tools/gen_test_data_registry.py"
    )
    for rel in gen.WRITTEN_HERE:
        assert (gen.SHIPPED / rel).read_bytes() == (shared_data / rel).read_bytes(), rel


def test_registry_rows_are_fetchable_urls() -> None:
    entries = ftd.load_registry()
    assert len({e.path for e in entries}) == len(entries)
    for e in entries:
        assert len(e.sha256) == 64, e.path
        assert e.size > 0, e.path
        if e.url.startswith("repo:"):
            assert (ftd.SHIPPED / e.url.removeprefix("repo:")).is_file(), e.path
        else:
            assert e.url.startswith(("https://raw.githubusercontent.com/", gen.PYPI_FILES)), e
            assert " " not in e.url, e.url
