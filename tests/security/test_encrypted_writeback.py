"""Issue #18 §2: write-back works identically with the vault encrypted.

Finding: `deid.encrypt_vault: true` silently turned write-back off: it compared the vault's
ciphertexts, which differ per object, logged "slices come from more than one original series",
built 0 objects, and the run reported success."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from bundle_factory import make_bundle, write_registry

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.errors import LakeError
from pipeline.infer.stage import run as infer_run
from pipeline.lake import LakePaths, read_table
from pipeline.lake.crypto import VaultCipher, is_encrypted
from pipeline.review.app import original_study_uid
from pipeline.review.phi import patient_identifiers
from pipeline.tensors.stage import run as tensors_run
from pipeline.writeback.stage import run as writeback_run

KEY = b"e" * 32


def _cfg(root: Path, encrypt: bool) -> Any:
    return load_config(
        overrides={
            "compute": {"partition_size": 8, "device": "cpu"},
            "infer": {"model": "tiny", "registry": str(root / "models.yaml")},
            "deid": {"encrypt_vault": encrypt},
        },
        environ={},
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("encrypted-writeback")
    synthesize(
        root / "archive", patients=1, seed=1802, ct_slices=8, rows=32, columns=32,
        include_bad=False, include_mr=False,
    )  # fmt: skip
    write_registry(root / "models.yaml", make_bundle(root / "bundles" / "tiny", seed=4))
    return root


def _write_back(root: Path, encrypt: bool) -> tuple[LakePaths, dict[str, pydicom.Dataset]]:
    cfg = _cfg(root, encrypt)
    lake = LakePaths(root / f"lake-{encrypt}")
    crawl_run(cfg, lake, FolderSource(root / "archive"), run_id="c")
    deid_run(cfg, lake, key=KEY, run_id="d")
    tensors_run(cfg, lake, run_id="t")
    infer_run(cfg, lake, run_id="i")
    dest = root / f"results-{encrypt}"
    result = writeback_run(cfg, lake, run_id="w", dest=str(dest), key=KEY)
    assert not result.pending
    assert result.counts.quarantined == 0  # no volume refused
    assert result.counts.extra["built"] >= 2
    objects = {}
    for path in sorted(dest.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        objects[ds.SOPInstanceUID] = ds
    return lake, objects


Built = dict[bool, tuple[LakePaths, dict[str, pydicom.Dataset]]]


@pytest.fixture(scope="module")
def built(root: Path) -> Built:
    return {encrypt: _write_back(root, encrypt) for encrypt in (False, True)}


def test_write_back_is_the_same_with_the_vault_encrypted(built: Built) -> None:
    clear_lake, clear = built[False]
    sealed_lake, sealed = built[True]
    vault = read_table(sealed_lake, "vault").to_pylist()
    assert vault
    assert all(is_encrypted(r["SOPInstanceUID"]) for r in vault)
    assert all(is_encrypted(r["PatientID"]) for r in vault)
    assert len(clear) >= 2
    assert sorted(clear) == sorted(sealed)  # the same objects, with the same UIDs
    for uid, ds in clear.items():
        other = sealed[uid]
        assert other.Modality == ds.Modality
        assert other.StudyInstanceUID == ds.StudyInstanceUID  # the original study
        assert other.PatientID == ds.PatientID
        assert not is_encrypted(str(other.StudyInstanceUID))
    del clear_lake


def test_the_review_app_reads_an_encrypted_vault_with_the_key(built: Built) -> None:
    """The identifier check of reviewers' comments and the viewer link decrypt the vault with
    the lake's key; without it they refuse rather than pass unchecked."""
    clear_lake, _ = built[False]
    sealed_lake, _ = built[True]
    series = read_table(sealed_lake, "vault").column("series_pseudonym").to_pylist()[0]
    cipher = VaultCipher(KEY)
    expected = patient_identifiers(clear_lake, series)
    assert expected
    assert patient_identifiers(sealed_lake, series, cipher) == expected
    with pytest.raises(LakeError, match="encrypted"):
        patient_identifiers(sealed_lake, series)
    study = original_study_uid(clear_lake, series)
    assert study is not None
    assert original_study_uid(sealed_lake, series, cipher) == study
    assert original_study_uid(sealed_lake, series) is None
