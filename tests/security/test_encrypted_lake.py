"""Issue #18 §2: with encryption at rest, a copy of the lake folder without the key reveals no
identifier.

Finding: `deid.encrypt_vault` covered the vault only: the index kept PatientID and the original
UIDs in clear (research `instances` -> vault `sop_pseudonym` -> `object_key` -> index mapped a
patient token to the MRN without the key), written-back SEG/SR under `restricted/results/` held
PatientName, ID and birth date in clear.

The test runs the whole pipeline (crawl, deid, verify, tensors, infer, write-back) through the
CLI into a lake encrypted at rest (the default), then reads every file of the lake as someone
holding a copy but not the key would: every byte, and every value of every Parquet column
(Parquet pages are compressed, so a byte scan alone would miss them). No identifier of the
archive is found: names and their parts, IDs, birth dates, addresses, accession numbers,
original UIDs, file locations. The same scan finds them in a lake made without encryption, so
the scan itself is shown to work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from bundle_factory import make_bundle, write_registry
from security.lakes import cli

from pipeline.lake.keys import generate_key_file


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("encrypted-lake")
    synthesize(
        root / "archive", patients=2, seed=1821, ct_slices=8, rows=32, columns=32,
        include_bad=True, include_mr=True,
    )  # fmt: skip
    write_registry(root / "models.yaml", make_bundle(root / "bundles" / "tiny", seed=3))
    return root


def _run(root: Path, name: str, encrypt: bool) -> Path:
    key = generate_key_file(root / f"{name}.key")
    config = root / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "lake": str(root / name),
                "key_file": str(key),
                "encrypt_at_rest": encrypt,
                "source": {"uri": str(root / "archive")},
                "compute": {"workers": 1, "device": "cpu"},
                "infer": {"model": "tiny", "registry": str(root / "models.yaml")},
                "writeback": {"dest": str(root / f"{name}-results")},
            }
        )
    )
    done = cli("run", config)
    assert done.exit_code == 0, done.output
    assert any((root / f"{name}-results").rglob("*.dcm"))  # write-back worked
    return root / name


def _identifiers(archive: Path) -> set[str]:
    truth = json.loads((archive / "ground_truth.json").read_text())
    found: set[str] = set()
    for p in truth["patients"]:
        for key in ("PatientID", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers"):
            if p.get(key):
                found.add(str(p[key]))
        name = str(p["PatientName"])
        found.add(name)
        found.update(part for part in name.replace("^", " ").split() if len(part) >= 4)
    for s in truth["studies"]:
        for key in ("StudyInstanceUID", "AccessionNumber"):
            if s.get(key):
                found.add(str(s[key]))
    for s in truth["series"]:
        found.add(s["SeriesInstanceUID"])
        found.update(s["sop_instance_uids"])
        found.update(s["files"])
    return {f for f in found if len(f) >= 6}


def _values(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [v for x in value.values() for v in _values(x)]
    if isinstance(value, list):
        return [v for x in value for v in _values(x)]
    return [str(value)] if value is not None else []


def _scan(lake: Path, needles: set[str]) -> dict[str, set[str]]:
    """Which identifiers each file shows: in its bytes, and (Parquet) in its values."""
    encoded = {n: (n.encode("utf-8"), n.encode("latin-1", "ignore")) for n in needles}
    hits: dict[str, set[str]] = {}
    for path in sorted(lake.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        seen = {n for n, forms in encoded.items() if any(f and f in data for f in forms)}
        if path.suffix == ".parquet":
            text = "\n".join(v for row in pq.read_table(path).to_pylist() for v in _values(row))
            seen |= {n for n in needles if n in text}
        if seen:
            hits[str(path.relative_to(lake))] = seen
    return hits


def test_a_copy_of_an_encrypted_lake_reveals_no_identifier(root: Path) -> None:
    needles = _identifiers(root / "archive")
    assert len(needles) > 50
    sealed = _run(root, "sealed", encrypt=True)
    assert json.loads((sealed / "pacsflow-lake.json").read_text())["encrypted_at_rest"] is True
    assert _scan(sealed, needles) == {}
    assert not list((sealed / "restricted" / "results").glob("*.dcm"))  # confirmed: none kept


def test_the_scan_finds_identifiers_in_a_lake_without_encryption(root: Path) -> None:
    needles = _identifiers(root / "archive")
    clear = _run(root, "clear", encrypt=False)
    hits = _scan(clear, needles)
    assert any(p.startswith("restricted/index") for p in hits)
    assert any(p.startswith("restricted/vault") for p in hits)
    assert all(p.startswith("restricted/") for p in hits)  # research/ is clean either way


def test_the_sealed_lake_still_answers_with_its_key(root: Path) -> None:
    sealed = root / "sealed"
    key = root / "sealed.key"
    for args in (
        ("verify",),
        ("status",),
        ("sql", "SELECT count(*) FROM lineage WHERE delivery_status = 'confirmed'"),
    ):
        done = cli(*args, "--lake", sealed, "--key-file", key)
        assert done.exit_code == 0, (args, done.output)
    rerun = cli("run", root / "sealed.yaml")
    assert rerun.exit_code == 0, rerun.output
    assert "0 objects built" in rerun.output  # the rerun finds everything done (sealed joins)
    assert "0 findings rows" in rerun.output


def test_no_retrieved_original_is_left_in_the_cache_after_a_run(root: Path) -> None:
    """The DIMSE retrieval cache holds original objects: a sealed lake empties it at the end
    of every run (a later single-stage command retrieves again)."""
    sealed = root / "sealed"
    cached = sealed / "restricted" / "cache" / "ab12" / "instance.dcm"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"an original object")
    done = cli("tensors", "--lake", sealed, "--key-file", root / "sealed.key", "--workers", "1")
    assert done.exit_code == 0, done.output
    assert not (sealed / "restricted" / "cache").exists()
