"""The secret key file and the keyed pseudonyms."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.deid.keys import Pseudonymizer, generate_key_file, load_key
from pipeline.errors import ConfigError

UID = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def test_key_file_round_trip_and_permissions(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "k.key")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    key = load_key(path)
    assert len(key) == 32
    assert load_key(generate_key_file(tmp_path / "k2.key")) != key
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_key_file(path)


def test_load_key_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACSFLOW_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match="pacsflow keygen"):
        load_key(None)
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(tmp_path / "missing.key")
    loose = generate_key_file(tmp_path / "loose.key")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_key(loose)
    bad = tmp_path / "bad.key"
    bad.write_text("hello\n")
    bad.chmod(0o600)
    with pytest.raises(ConfigError, match="not a pacsflow key file"):
        load_key(bad)
    good = generate_key_file(tmp_path / "env.key")
    monkeypatch.setenv("PACSFLOW_KEY_FILE", str(good))
    assert load_key(None) == load_key(good)


def test_uids_are_valid_deterministic_and_keyed() -> None:
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    originals = [f"1.2.826.0.1.3680043.8.498.{i}" for i in range(2000)]
    mapped = [a.uid(u) for u in originals]
    assert all(UID.match(u) and len(u) <= 64 for u in mapped)
    assert len(set(mapped)) == len(originals)  # no collisions
    assert mapped == [a.uid(u) for u in originals]
    assert not set(mapped) & {b.uid(u) for u in originals}  # another key: disjoint
    assert not set(mapped) & set(originals)


def test_same_mapping_in_another_process(tmp_path: Path) -> None:
    key_file = generate_key_file(tmp_path / "k.key")
    code = (
        "import sys; from pipeline.deid.keys import Pseudonymizer, load_key; "
        "p = Pseudonymizer(load_key(sys.argv[1])); "
        "print(p.uid('1.2.3.4'), p.token('PAT-1'), p.date_offset_days('PAT-1'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(key_file)], capture_output=True, text=True, check=True
    ).stdout.split()
    here = Pseudonymizer(load_key(key_file))
    assert out == [here.uid("1.2.3.4"), here.token("PAT-1"), str(here.date_offset_days("PAT-1"))]


def test_tokens_and_date_offsets() -> None:
    p = Pseudonymizer(b"k" * 32)
    token = p.token("PAT-001")
    assert re.fullmatch(r"[A-Z2-7]{16}", token)
    assert p.token("PAT-001", domain="accession") != token
    offsets = {p.date_offset_days(f"PAT-{i}") for i in range(500)}
    assert all(-3650 <= d <= -1 for d in offsets)
    assert len(offsets) > 400  # patients are independent
    assert p.date_offset_days("PAT-7") == p.date_offset_days(" PAT-7 ")


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Pseudonymizer(b"short")
