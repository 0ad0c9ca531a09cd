"""The deid stage on a crawled synthetic archive: research tables, incremental, verify, SQL."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from dicom_factory import make_ct, write

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.keys import generate_key_file, load_key
from pipeline.deid.stage import run as deid_run
from pipeline.deid.verify import verify
from pipeline.lake import LakePaths, read_table

KEY = b"s" * 32


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.synth import synthesize

    out = tmp_path_factory.mktemp("deid") / "archive"
    synthesize(out, patients=2, seed=11, ct_slices=8, rows=64, columns=64)
    us = make_ct(number=99, series_uid="1.2.826.0.1.3680043.8.498.999")
    us.Modality = "US"
    us.BurnedInAnnotation = "YES"
    write(us, out / "extra" / "us.dcm")
    return out


def _lake(archive: Path, root: Path, key: bytes = KEY) -> tuple[LakePaths, object]:
    cfg = load_config(overrides={"compute": {"partition_size": 16}}, environ={})
    lake = LakePaths(root)
    crawl_run(cfg, lake, FolderSource(archive), run_id="c1")
    result = deid_run(cfg, lake, key=key, run_id="d1")
    return lake, result


def _sorted(table: pa.Table) -> list[dict[str, object]]:
    return sorted(table.to_pylist(), key=lambda r: str(r["SOPInstanceUID"]))


def test_research_tables_are_built_and_clean(archive: Path, tmp_path: Path) -> None:
    lake, result = _lake(archive, tmp_path / "lake")
    truth = json.loads((archive / "ground_truth.json").read_text())
    n_good = sum(s["n_instances"] for s in truth["series"])
    instances = read_table(lake, "instances")
    assert instances.num_rows == n_good
    assert result.counts.quarantined == 1  # the ultrasound with burned-in annotation
    q = [r for r in read_table(lake, "quarantine").to_pylist() if r["stage"] == "deid"]
    assert [r["reason"] for r in q] == ["burned_in_phi"]
    series = read_table(lake, "series").to_pylist()
    assert len(series) == len(truth["series"])
    axial = [s for s in series if s["Modality"] == "CT" and s["n_instances"] == 8]
    assert axial
    assert all(s["volume_ok"] for s in axial)
    assert read_table(lake, "patients").num_rows == 2
    assert verify(lake) == []
    from collections import Counter

    from pipeline.crawl import object_states

    states = Counter(object_states(lake).column("state").to_pylist())
    assert states["deidentified"] == n_good
    assert states["quarantined"] == 1 + len(truth["bad_objects"]) + 1  # + ground_truth.json
    originals = {uid for s in truth["series"] for uid in s["sop_instance_uids"]}
    assert not originals & set(instances.column("SOPInstanceUID").to_pylist())


def test_rerun_deidentifies_nothing_new_and_same_key_same_tables(
    archive: Path, tmp_path: Path
) -> None:
    lake, _ = _lake(archive, tmp_path / "a")
    cfg = load_config(environ={})
    again = deid_run(cfg, lake, key=KEY, run_id="d2")
    assert again.counts.seen == 0
    other, _ = _lake(archive, tmp_path / "b")
    assert _sorted(read_table(lake, "instances")) == _sorted(read_table(other, "instances"))
    different, _ = _lake(archive, tmp_path / "c", key=b"t" * 32)
    a = set(read_table(lake, "instances").column("SOPInstanceUID").to_pylist())
    b = set(read_table(different, "instances").column("SOPInstanceUID").to_pylist())
    assert not a & b


def test_intervals_between_a_patients_studies_are_kept(archive: Path, tmp_path: Path) -> None:
    lake, _ = _lake(archive, tmp_path / "lake")
    truth = json.loads((archive / "ground_truth.json").read_text())
    import datetime as dt

    vault = read_table(lake, "vault").to_pylist()
    pseudo_of = {r["StudyInstanceUID"]: r["study_pseudonym"] for r in vault}
    studies = {r["StudyInstanceUID"]: r for r in read_table(lake, "studies").to_pylist()}
    for patient in truth["patients"]:
        dates = []
        for study in truth["studies"]:
            if study["StudyInstanceUID"] in patient["studies"]:
                original = dt.datetime.strptime(study["StudyDate"], "%Y%m%d").date()
                shifted = studies[pseudo_of[study["StudyInstanceUID"]]]["StudyDate"]
                dates.append((original, shifted))
        offsets = {(s - o).days for o, s in dates}
        assert len(offsets) == 1  # one offset per patient: intervals preserved exactly
        assert offsets != {0}


def test_verify_finds_a_planted_leak(archive: Path, tmp_path: Path) -> None:
    lake, _ = _lake(archive, tmp_path / "lake")
    truth = json.loads((archive / "ground_truth.json").read_text())
    name = truth["patients"][0]["PatientName"]
    (lake.research / "notes.txt").write_text(f"patient {name.replace('^', ' ')} was here")
    leaks = verify(lake)
    assert [leak.kind for leak in leaks] == ["patient name"]
    assert name not in repr(leaks)
    import pyarrow.parquet as pq

    uid = truth["series"][0]["sop_instance_uids"][0]
    birth = truth["patients"][1]["PatientBirthDate"]
    iso = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    table = pa.table(
        {"k": [1, 2], "blob": ['{"ok": 1}', json.dumps({"x": {"y": [uid]}})], "when": [iso, None]}
    )
    pq.write_table(table, lake.research / "tables" / "extra.parquet")
    kinds = sorted((leak.column, leak.row, leak.kind) for leak in verify(lake) if leak.column)
    assert kinds == [("blob", 1, "original UID"), ("when", 0, "birth date")]


def test_deid_cli_needs_a_key_and_sql_and_verify_work(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from pipeline.cli.main import app

    monkeypatch.delenv("PACSFLOW_KEY_FILE")
    runner = CliRunner()
    lake = tmp_path / "lake"
    key = generate_key_file(tmp_path / "k.key")
    assert load_key(key)
    where = ["--lake", str(lake), "--key-file", str(key), "--workers", "1"]
    crawl = runner.invoke(app, ["crawl", "--source", str(archive), *where])
    assert crawl.exit_code == 0, crawl.output
    no_key = runner.invoke(app, ["deid", "--lake", str(lake), "--workers", "1"])
    assert no_key.exit_code == 2
    assert "pacsflow keygen" in no_key.output
    done = runner.invoke(
        app, ["deid", "--lake", str(lake), "--key-file", str(key), "--workers", "1"]
    )
    assert done.exit_code == 0, done.output
    monkeypatch.setenv("PACSFLOW_KEY_FILE", str(key))
    q = runner.invoke(app, ["sql", "--lake", str(lake), "SELECT count(*) AS n FROM instances"])
    assert q.exit_code == 0, q.output
    assert q.output.split()[-1].isdigit()
    bad = runner.invoke(app, ["sql", "--lake", str(lake), "SELECT * FROM index"])
    assert bad.exit_code == 2  # the restricted index is not a view
    ok = runner.invoke(app, ["verify", "--lake", str(lake)])
    assert ok.exit_code == 0, ok.output
    assert "no identifying value" in ok.output


def test_export_dicom_reads_back_clean_with_pixels_intact(archive: Path, tmp_path: Path) -> None:
    import numpy as np
    from pydicom import dcmread

    export = tmp_path / "export"
    cfg = load_config(
        overrides={"compute": {"partition_size": 16}, "deid": {"export_dicom": str(export)}},
        environ={},
    )
    lake = LakePaths(tmp_path / "lake")
    crawl_run(cfg, lake, FolderSource(archive), run_id="c1")
    result = deid_run(cfg, lake, key=KEY, run_id="d1")
    files = sorted(export.rglob("*.dcm"))
    assert len(files) == result.counts.out
    truth = json.loads((archive / "ground_truth.json").read_text())
    phi = [p["PatientName"] for p in truth["patients"]] + [
        p["PatientID"] for p in truth["patients"]
    ]
    vault = {r["sop_pseudonym"]: r for r in read_table(lake, "vault").to_pylist()}
    index = {r["object_key"]: r for r in read_table(lake, "index").to_pylist()}
    for path in files[::7]:
        raw = path.read_bytes()
        assert not any(p.encode() in raw for p in phi), path.name
        ds = dcmread(path)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientIdentityRemoved == "YES"
        original = dcmread(
            archive / index[vault[ds.SOPInstanceUID]["object_key"]]["location"], force=True
        )
        if "TransferSyntaxUID" not in getattr(original, "file_meta", {}):
            original.file_meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
        assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_verify_reads_numeric_arrays_by_header_and_text_arrays_whole(
    archive: Path, tmp_path: Path
) -> None:
    """Tensors and masks are numbers: only their .npy header can spell anything. An array of
    strings is scanned whole, and so is a header that names an identifier."""
    import numpy as np

    lake, _ = _lake(archive, tmp_path / "lake")
    truth = json.loads((archive / "ground_truth.json").read_text())
    pid = truth["patients"][0]["PatientID"]
    np.save(lake.research / "numbers.npy", np.arange(1000, dtype=np.int16))
    assert verify(lake) == []
    np.save(lake.research / "words.npy", np.array(["fine", pid]))
    assert [leak.path.rsplit("/", 1)[-1] for leak in verify(lake)] == ["words.npy"]
