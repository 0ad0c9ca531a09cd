"""Write tools/test-data/registry.csv, where every file of the real test corpus comes from.

The corpus (``../shared/data`` on the project's machines) is public data copied byte for byte
from pinned sources. This tool reads its manifests and writes one registry row per file:

- ``path``: the file's place in the corpus, e.g. ``dicom/dcm_qa_ct/...``;
- ``sha256`` and ``size``: what the fetched file must be;
- ``url``: where it comes from: the raw file at its commit on GitHub, the PyPI archive
  (wheel or sdist) that holds it, or ``repo:`` for the few files the corpus builder wrote
  (the manifests, READMEs, the class map and nibabel's licence excerpt), which ship in
  ``tools/test-data/files/``;
- ``member``: the file's name inside the archive (empty for a raw file).

Sources: ``dicom/MANIFEST.csv`` (origin, version, path_in_source, sha256 per file) and the
TotalSegmentator files of ``labeled-ct/`` (one pinned commit, see its README). Never edit the
output by hand; a test fails when it differs from the manifests. Run:
``python tools/gen_test_data_registry.py [--data ../shared/data]``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
OUT_DIR = REPO / "tools" / "test-data"
REGISTRY = OUT_DIR / "registry.csv"
SHIPPED = OUT_DIR / "files"
COLUMNS = ("path", "sha256", "size", "url", "member")

GITHUB_RAW = "https://raw.githubusercontent.com"
PYPI_FILES = "https://files.pythonhosted.org/packages"
#: PyPI releases the corpus takes files from: (project, version) -> (archive file name,
#: prefix of the members inside it). The sdist of deid-data is the only archive with a prefix.
PYPI_ARCHIVES: dict[tuple[str, str], tuple[str, str]] = {
    ("pydicom", "3.0.2"): ("pydicom-3.0.2-py3-none-any.whl", ""),
    ("pydicom-data", "1.0.0"): ("pydicom_data-1.0.0-py3-none-any.whl", ""),
    ("nibabel", "5.4.2"): ("nibabel-5.4.2-py3-none-any.whl", ""),
    ("deid-data", "0.0.20"): ("deid-data-0.0.20.tar.gz", "deid-data-0.0.20/"),
}
#: labeled-ct/totalsegmentator: TotalSegmentator's test files at one commit (its README).
TOTALSEG = ("wasserth/TotalSegmentator", "0e65a448d557382b1e925276212b3bec7f5aff83")
#: Files the corpus builder wrote: not at any origin, shipped in tools/test-data/files/.
WRITTEN_HERE = (
    "dicom/MANIFEST.csv",
    "dicom/README.md",
    "labeled-ct/totalsegmentator/README.md",
    "labeled-ct/totalsegmentator/class_map.json",
    "dicom/nibabel/COPYING",  # lines 1-45 of nibabel's COPYING plus a note saying so
)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _github(repo: str, commit: str, path: str) -> str:
    return f"{GITHUB_RAW}/{repo}/{commit}/{quote(path)}"


def _pypi(project: str, version: str) -> tuple[str, str]:
    try:
        name, prefix = PYPI_ARCHIVES[(project, version)]
    except KeyError:
        raise SystemExit(
            f"MANIFEST names PyPI {project} {version}: add its archive to PYPI_ARCHIVES"
        ) from None
    tag = "source" if name.endswith((".tar.gz", ".zip")) else "py3"
    return f"{PYPI_FILES}/{tag}/{project[0]}/{project}/{name}", prefix


def _where(origin: str, version: str, path_in_source: str) -> tuple[str, str]:
    """(url, member) of one MANIFEST row."""
    if origin.startswith("github:"):
        archive, _, member = path_in_source.partition("!")
        return _github(origin.removeprefix("github:"), version, archive), member
    if origin.startswith("PyPI package "):
        url, prefix = _pypi(origin.removeprefix("PyPI package "), version)
        return url, prefix + path_in_source
    raise SystemExit(f"MANIFEST origin {origin!r} is neither github: nor a PyPI package")


def rows(data: Path) -> list[dict[str, str]]:
    """The registry rows of the corpus at ``data``, sorted by path."""
    out: list[dict[str, str]] = []
    with (data / "dicom" / "MANIFEST.csv").open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if f"dicom/{r['relative_path']}" in WRITTEN_HERE:
                continue
            url, member = _where(r["origin"], r["version"], r["path_in_source"])
            out.append(
                {
                    "path": f"dicom/{r['relative_path']}",
                    "sha256": r["sha256"],
                    "size": r["size_bytes"],
                    "url": url,
                    "member": member,
                }
            )
    ts = data / "labeled-ct" / "totalsegmentator"
    for f in sorted(p for p in ts.rglob("*") if p.is_file()):
        rel = f.relative_to(data).as_posix()
        if rel in WRITTEN_HERE:
            continue
        url = _github(TOTALSEG[0], TOTALSEG[1], f.relative_to(ts).as_posix())
        out.append(
            {
                "path": rel,
                "sha256": sha256_file(f),
                "size": str(f.stat().st_size),
                "url": url,
                "member": "",
            }
        )
    for rel in WRITTEN_HERE:
        f = data / rel
        out.append(
            {
                "path": rel,
                "sha256": sha256_file(f),
                "size": str(f.stat().st_size),
                "url": f"repo:{rel}",
                "member": "",
            }
        )
    return sorted(out, key=lambda r: r["path"])


def render(data: Path) -> str:
    """The registry as committed (CSV, one row per file, sorted by path)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows(data))
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Write the registry and the shipped files from the corpus at ``--data``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the corpus (../shared/data)")
    args = ap.parse_args(argv)
    if not (args.data / "dicom" / "MANIFEST.csv").is_file():
        print(f"no corpus at {args.data} (dicom/MANIFEST.csv missing)", file=sys.stderr)
        return 2
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    REGISTRY.write_text(render(args.data), encoding="utf-8")
    for rel in WRITTEN_HERE:
        dst = SHIPPED / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.data / rel, dst)
    print(f"wrote {REGISTRY} and {len(WRITTEN_HERE)} files under {SHIPPED}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
