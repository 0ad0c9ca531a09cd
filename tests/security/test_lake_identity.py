"""Issue #18 §1: one key per lake, and lakes that know they are lakes.

Each test reproduces a finding made on the demo lake as a user or an attacker would, through
the real CLI; on the code before the fix each of them passed the bad case."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from security.lakes import Lake, cli, make_lake

from pipeline.lake.identity import LAKE_FORMAT, MARKER
from pipeline.lake.keys import LakeKeys, generate_key_file, load_key


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    return make_lake(tmp_path_factory.mktemp("identity"))


def _patients(lake: Lake) -> int:
    rows = duckdb.sql(
        "SELECT count(DISTINCT patient_token) FROM "
        f"read_parquet('{lake.root}/research/tables/instances/**/*.parquet')"
    ).fetchall()
    return int(rows[0][0])


def test_the_lake_records_its_key_fingerprint_never_the_key(lake: Lake) -> None:
    marker = json.loads((lake.root / MARKER).read_text())
    keys = LakeKeys(load_key(lake.key))
    assert marker["format"] == LAKE_FORMAT
    assert marker["key_fingerprint"] == keys.fingerprint
    key_text = lake.key.read_text().split()[1]
    for path in lake.root.rglob("*"):
        if path.is_file():
            assert key_text.encode() not in path.read_bytes(), path
    manifests = [json.loads(p.read_text()) for p in (lake.root / "runs").glob("*.json")]
    assert manifests
    assert {m["key_fingerprint"] for m in manifests} == {keys.fingerprint}
    status = cli("status", "--lake", lake.root, "--key-file", lake.key)
    assert status.exit_code == 0, status.output
    assert f"key fingerprint: {keys.fingerprint}" in status.output


@pytest.mark.parametrize("verb", ["deid", "tensors", "verify", "sql", "writeback", "run"])
def test_another_key_is_refused_by_every_command_naming_both_fingerprints(
    lake: Lake, tmp_path: Path, verb: str
) -> None:
    """Finding: `run` with another key_file gave a patient a second token (patients 3 -> 4),
    `verify` passed, and `writeback --key-file OTHER` wrote duplicates into the PACS."""
    other = generate_key_file(tmp_path / "other.key")
    before = _patients(lake)
    args: list[str | Path] = {
        "deid": ["deid", "--workers", "1"],
        "tensors": ["tensors", "--workers", "1"],
        "verify": ["verify"],
        "sql": ["sql", "SELECT 1"],
        "writeback": ["writeback", "--dest", tmp_path / "results"],
        "run": ["run", _config(tmp_path, lake, other)],
    }[verb]
    where = [] if verb == "run" else ["--lake", lake.root, "--key-file", other]
    result = cli(*args, *where)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert "wrong key" in line
    assert LakeKeys(load_key(lake.key)).fingerprint in line
    assert LakeKeys(load_key(other)).fingerprint in line
    assert _patients(lake) == before
    assert not (tmp_path / "results").exists()


def _config(tmp_path: Path, lake: Lake, key: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"lake: {lake.root}\nkey_file: {key}\nsource:\n  uri: {lake.archive}\n"
        "compute:\n  workers: 1\nrun:\n  tensors: false\n  infer: false\n  writeback: false\n"
    )
    return path


@pytest.mark.parametrize("verb", ["verify", "deid", "tensors", "sql", "status", "audit"])
def test_a_folder_that_is_not_a_lake_is_refused_and_left_untouched(
    tmp_path: Path, verb: str
) -> None:
    """Finding: `verify --lake <typo>` answered "no identifying value found", exit 0; `deid`
    and `tensors` on an unrelated folder created research/ restricted/ runs/ in it."""
    key = generate_key_file(tmp_path / "k.key")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8\xff")
    extra = {"sql": ["SELECT 1"]}.get(verb, [])
    for target in (folder, tmp_path / "typo"):
        result = cli(verb, *extra, "--lake", target, "--key-file", key)
        assert result.exit_code == 2, result.output
        assert "not a pacsflow lake" in result.output or "no lake at" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["holiday.jpg"]
    assert not (tmp_path / "typo").exists()


def test_crawl_refuses_a_non_empty_folder_that_is_not_a_lake(tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "k.key")
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = cli("crawl", "--source", tmp_path, "--lake", folder, "--key-file", key)
    assert result.exit_code == 2, result.output
    assert "not empty and not a pacsflow lake" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_init_makes_a_lake_once_and_a_newer_format_is_refused(tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "k.key")
    root = tmp_path / "lake"
    first = cli("init", "--lake", root, "--key-file", key)
    assert first.exit_code == 0, first.output
    assert "created lake" in first.output
    again = cli("init", "--lake", root, "--key-file", key)
    assert again.exit_code == 0
    assert "already a lake" in again.output
    marker = json.loads((root / MARKER).read_text())
    marker["format"] = LAKE_FORMAT + 1
    (root / MARKER).write_text(json.dumps(marker))
    for verb in ("verify", "status"):
        result = cli(verb, "--lake", root, "--key-file", key)
        assert result.exit_code == 2, result.output
        assert "newer than this pacsflow reads" in result.output


def test_a_lake_made_before_the_marker_is_named_as_such(tmp_path: Path) -> None:
    key = generate_key_file(tmp_path / "k.key")
    old = tmp_path / "old"
    (old / "restricted" / "index").mkdir(parents=True)
    (old / "research" / "tables").mkdir(parents=True)
    result = cli("deid", "--lake", old, "--key-file", key, "--workers", "1")
    assert result.exit_code == 2
    assert "made before lake format 1" in result.output


def test_derived_keys_are_distinct_and_stable() -> None:
    a, b = LakeKeys(b"a" * 32), LakeKeys(b"b" * 32)
    derived = {a.pseudonym_key, a.encryption_key[:32], a.audit_key, b.pseudonym_key}
    assert len(derived) == 4
    assert b"a" * 32 not in derived
    assert a.fingerprint == LakeKeys(b"a" * 32).fingerprint != b.fingerprint
