"""The deid stage's lake behaviour: hive partitions, superseded rows, export of earlier runs,
the burned-in allow-list, the encrypted vault, bounded verify, stale aggregates."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from dicom_factory import make_ct, write

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.deid.vault import ENCRYPTED_COLUMNS, VaultCipher, is_encrypted
from pipeline.deid.verify import iter_needles, verify
from pipeline.errors import LakeError
from pipeline.lake import LakePaths, read_table
from pipeline.lake.delta import current_version, data_files
from pipeline.lake.duck import arrow_table, connect, scan_sql
from pipeline.lake.io import commit_rows

KEY = b"k" * 32
SERIES = "1.2.826.0.1.3680043.8.498.4242"


def _archive(root: Path, n: int = 4) -> Path:
    for i in range(n):
        ds = make_ct(number=i + 1, series_uid=SERIES)
        write(ds, root / f"ct{i}.dcm")
    mr = make_ct(number=1, series_uid=SERIES + ".7")
    mr.Modality = "MR"
    write(mr, root / "mr.dcm")
    return root


def _cfg(**deid: object) -> object:
    return load_config(overrides={"compute": {"partition_size": 3}, "deid": deid}, environ={})


def _run(cfg: object, archive: Path, lake: LakePaths, run: str) -> object:
    crawl_run(cfg, lake, FolderSource(archive), run_id=f"c{run}")  # type: ignore[arg-type]
    return deid_run(cfg, lake, key=KEY, run_id=run)  # type: ignore[arg-type]


def test_research_tables_are_hive_partitioned_and_read_everywhere(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "a")
    lake = LakePaths(tmp_path / "lake")
    _run(_cfg(), archive, lake, "20260101T000000Z-aaaaaa")
    inst = lake.table("instances")
    # a Delta table, and each file's checksum (pipeline.lake.integrity)
    folders = ["Modality=CT", "Modality=MR", "_delta_log", "_pacsflow_checksums.jsonl"]
    assert sorted(p.name for p in inst.iterdir()) == folders
    assert sorted(p.name for p in lake.table("series").iterdir()) == folders
    # the partition column lives in the folder name only (the hive convention)
    one = next(inst.glob("Modality=CT/*.parquet"))
    assert "Modality" not in pq.read_schema(one).names
    # pyarrow with the declared schema, pandas, Dask and DuckDB all read the files of the
    # latest version (listed by the Delta log) as they are
    assert sorted(read_table(lake, "instances").column("Modality").to_pylist()) == ["CT"] * 4 + [
        "MR"
    ]
    files = data_files(lake, "instances")
    df = pd.read_parquet(files, partitioning="hive")
    assert len(df) == 5
    import dask.dataframe as dd

    assert len(dd.read_parquet(files).compute()) == 5
    con = connect()
    rows = con.execute(
        f"SELECT Modality, count(*) FROM {scan_sql(lake, 'instances')} GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert rows == [("CT", 4), ("MR", 1)]
    # typed columns analysis uses, shifted dates
    row = read_table(lake, "instances").to_pylist()[0]
    assert row["KVP"] is not None or row["StudyDate"] is not None
    assert row["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"


def test_a_changed_object_replaces_its_row_and_nothing_duplicates(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "a")
    lake = LakePaths(tmp_path / "lake")
    cfg = _cfg()
    _run(cfg, archive, lake, "20260101T000000Z-aaaaaa")
    before = {r["SOPInstanceUID"]: r for r in read_table(lake, "instances").to_pylist()}
    # the PACS corrects a header: same SOP Instance UID, new content (and a new mtime)
    changed = make_ct(number=2, series_uid=SERIES)
    changed.Manufacturer = "CORRECTED"
    write(changed, archive / "ct1.dcm")
    os.utime(archive / "ct1.dcm", ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
    result = _run(cfg, archive, lake, "20260102T000000Z-bbbbbb")
    assert result.counts.seen == 1  # type: ignore[attr-defined]
    assert result.counts.extra["superseded"] == 1  # type: ignore[attr-defined]
    after = read_table(lake, "instances").to_pylist()
    assert len(after) == len(before) == 5
    assert len({r["SOPInstanceUID"] for r in after}) == 5
    assert [r["Manufacturer"] for r in after].count("CORRECTED") == 1
    series = read_table(lake, "series").to_pylist()
    assert sorted(s["n_instances"] for s in series) == [1, 4]


def test_export_writes_objects_deidentified_in_earlier_runs(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "a")
    lake = LakePaths(tmp_path / "lake")
    _run(_cfg(), archive, lake, "20260101T000000Z-aaaaaa")  # no export
    out = tmp_path / "export"
    again = deid_run(_cfg(export_dicom=str(out)), lake, key=KEY, run_id="20260102T000000Z-b")  # type: ignore[arg-type]
    assert again.counts.seen == 0
    assert again.counts.extra["exported"] == 5
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 5
    sops = {r["SOPInstanceUID"] for r in read_table(lake, "instances").to_pylist()}
    assert {f.stem for f in files} == sops
    third = deid_run(_cfg(export_dicom=str(out)), lake, key=KEY, run_id="20260103T000000Z-c")  # type: ignore[arg-type]
    assert "exported" not in third.counts.extra  # nothing missing: nothing rewritten


def test_burned_in_allow_list_clears_a_class_but_never_burned_in_yes(tmp_path: Path) -> None:
    archive = tmp_path / "a"
    us = make_ct(number=1, series_uid=SERIES + ".1")
    us.Modality = "US"
    write(us, archive / "us.dcm")
    yes = make_ct(number=2, series_uid=SERIES + ".2")
    yes.Modality = "US"
    yes.BurnedInAnnotation = "YES"
    write(yes, archive / "us_yes.dcm")
    lake = LakePaths(tmp_path / "strict")
    assert _run(_cfg(), archive, lake, "r1").counts.quarantined == 2  # type: ignore[attr-defined]
    lake = LakePaths(tmp_path / "allowed")
    result = _run(_cfg(allow_burned_in=["US"]), archive, lake, "r1")
    assert (result.counts.out, result.counts.quarantined) == (1, 1)  # type: ignore[attr-defined]
    q = [r for r in read_table(lake, "quarantine").to_pylist() if r["stage"] == "deid"]
    assert [r["reason"] for r in q] == ["burned_in_phi"]
    assert "BurnedInAnnotation is YES" in q[0]["message"]


def test_encrypted_vault_hides_originals_and_round_trips(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "a")
    lake = LakePaths(tmp_path / "lake")
    _run(_cfg(encrypt_vault=True), archive, lake, "r1")
    vault = read_table(lake, "vault").to_pylist()
    originals = {str(make_ct(number=1, series_uid=SERIES).StudyInstanceUID), "PAT-001"}
    raw = b"".join(p.read_bytes() for p in lake.table("vault").rglob("*.parquet"))
    for col in ENCRYPTED_COLUMNS:
        assert all(v is None or is_encrypted(v) for v in (r[col] for r in vault)), col
    for value in originals:
        assert value.encode() not in raw
    cipher = VaultCipher(KEY)
    clear = [cipher.decrypt_row(r) for r in vault]
    assert all(r["SOPInstanceUID"].startswith("1.2.826.0.1.3680043") for r in clear)
    # deterministic: a second lake from the same input holds byte-identical ciphertexts
    lake2 = LakePaths(tmp_path / "lake2")
    _run(_cfg(encrypt_vault=True), archive, lake2, "r1")
    key_cols = ["object_key", *ENCRYPTED_COLUMNS]
    assert sorted(
        tuple(r[c] for c in key_cols) for r in read_table(lake2, "vault").to_pylist()
    ) == sorted(tuple(r[c] for c in key_cols) for r in vault)
    # another key cannot read it; verify needs the key and still finds planted leaks
    with pytest.raises(LakeError, match="cannot be decrypted"):
        VaultCipher(b"x" * 32).decrypt_row(vault[0])
    with pytest.raises(LakeError, match="needs the key file"):
        verify(lake)
    assert verify(lake, KEY) == []
    (lake.research / "notes.txt").write_text(f"see {clear[0]['SOPInstanceUID']}")
    assert [leak.kind for leak in verify(lake, KEY)] == ["original UID"]


def test_verify_in_small_needle_chunks_finds_the_same(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "a")
    lake = LakePaths(tmp_path / "lake")
    _run(_cfg(), archive, lake, "r1")
    chunks = list(iter_needles(lake, max_needles=3))
    assert len(chunks) > 1
    assert all(len(c) < 3 + 40 for c in chunks)
    uid = read_table(lake, "vault").to_pylist()[-1]["SeriesInstanceUID"]
    (lake.research / "notes.txt").write_text(f"series {uid}")
    assert verify(lake, max_needles=3) == verify(lake)
    assert [leak.path for leak in verify(lake, max_needles=3)] == ["research/notes.txt"]


def test_aggregates_are_rebuilt_after_a_run_killed_before_them(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "a")
    lake = LakePaths(tmp_path / "lake")
    _run(_cfg(), archive, lake, "r1")
    for name in ("series", "studies", "patients"):  # killed before their first commit
        shutil.rmtree(lake.table(name))
    again = deid_run(_cfg(), lake, key=KEY, run_id="r2")  # type: ignore[arg-type]
    assert again.counts.seen == 0
    con = connect()
    n = arrow_table(con, f"SELECT sum(n_instances) AS n FROM {scan_sql(lake, 'series')}")
    assert n.column("n").to_pylist() == [5]
    # killed between a batch's instances commit and the aggregates' commit: the aggregates
    # name an older instances version, and the next run rebuilds them
    rows = read_table(lake, "instances").to_pylist()
    rows[0]["SeriesInstanceUID"] = "2.25.1234"
    commit_rows(lake, "instances", rows[:1])
    before = current_version(lake, "series")
    third = deid_run(_cfg(), lake, key=KEY, run_id="r3")  # type: ignore[arg-type]
    assert third.counts.seen == 0
    assert current_version(lake, "series") == before + 1  # type: ignore[operator]
    uids = read_table(lake, "series", columns=["SeriesInstanceUID"]).column(0).to_pylist()
    assert "2.25.1234" in uids
    # and nothing when they are current
    deid_run(_cfg(), lake, key=KEY, run_id="r4")  # type: ignore[arg-type]
    assert current_version(lake, "series") == before + 1  # type: ignore[operator]


@pytest.mark.shared_data
def test_real_phi_files_crawled_deidentified_and_verified_clean(
    shared_data: Path, tmp_path: Path
) -> None:
    """The PHI-bearing files of ../shared/data/dicom/deid-data through crawl, deid (with a
    DICOM export) and verify: nothing identifying under research/, and the export carries none
    of the originals' identifiers either."""
    folder = shared_data / "dicom" / "deid-data"
    lake = LakePaths(tmp_path / "lake")
    out = tmp_path / "export"
    # these are secondary captures and ultrasound: cleared here so that the headers go through
    # the engine (BurnedInAnnotation YES stays quarantined whatever the allow-list says)
    allow = ["US", "SC", "OT", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.6.1"]
    cfg = _cfg(export_dicom=str(out), allow_burned_in=allow)
    crawl_run(cfg, lake, FolderSource(folder), run_id="c1")  # type: ignore[arg-type]
    result = deid_run(cfg, lake, key=KEY, run_id="d1")  # type: ignore[arg-type]
    assert result.counts.out >= 8  # type: ignore[attr-defined]
    assert result.counts.quarantined == 1  # type: ignore[attr-defined]
    assert verify(lake) == []
    needles = {n for n in iter_needles(lake).__next__() if len(n) >= 6}
    exported = b"".join(p.read_bytes() for p in out.rglob("*.dcm"))
    assert exported
    leaked = sorted(n for n in needles if n.encode() in exported)
    assert leaked == []
