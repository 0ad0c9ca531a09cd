"""The DIMSE retrieval cache stays under its bound: whole studies, oldest first, never the one
in use."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import load_config
from pipeline.connectors.dimse import DimseSource, trim_cache


def _study(cache: Path, name: str, files: int, size: int, mtime: int) -> Path:
    folder = cache / name
    folder.mkdir(parents=True)
    for i in range(files):
        f = folder / f"{i}.dcm"
        f.write_bytes(b"x" * size)
        os.utime(f, ns=(mtime, mtime))
    return folder


def test_oldest_studies_go_first_and_the_one_in_use_stays(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = _study(cache, "a" * 64, 3, 1000, 1_000_000_000)
    mid = _study(cache, "b" * 64, 3, 1000, 2_000_000_000)
    new = _study(cache, "c" * 64, 3, 1000, 3_000_000_000)
    assert trim_cache(cache, 10_000) == 0  # under the bound: nothing goes
    freed = trim_cache(cache, 6_000, keep=old)  # the oldest is in use: the next one goes
    assert freed == 3000
    assert old.exists()
    assert not mid.exists()
    assert new.exists()
    assert trim_cache(cache, 2_000) == 6000
    assert not any(cache.iterdir())


def test_the_bound_comes_from_the_config(tmp_path: Path) -> None:
    cfg = load_config(overrides={"source": {"dimse": {"cache_max_gb": 0.5}}}, environ={})
    source = DimseSource.from_uri("dimse://PACS@127.0.0.1:4242", cfg.source, cache_dir=tmp_path)
    assert source.cache_max_bytes == 500_000_000
    unbounded = load_config(environ={})
    assert (
        DimseSource.from_uri(
            "dimse://PACS@127.0.0.1:4242", unbounded.source, cache_dir=tmp_path
        ).cache_max_bytes
        is None
    )
