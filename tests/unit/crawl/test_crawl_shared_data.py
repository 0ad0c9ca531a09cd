"""Crawl the real DICOM corpus in ../shared/data/dicom and reconcile it with its MANIFEST."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.lake import LakePaths, read_table

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

_UIDS = ("sop_class_uid", "study_instance_uid", "series_instance_uid", "sop_instance_uid")
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_NOT_DICOM_KINDS = {
    "license-text",
    "reference-json",
    "reference-nifti",
    "readme",
    "reference-bval",
    "reference-bvec",
}


def test_every_real_object_is_indexed_or_quarantined_for_a_true_reason(
    shared_data: Path, tmp_path: Path
) -> None:
    root = shared_data / "dicom"
    with open(root / "MANIFEST.csv", newline="", encoding="utf-8") as fh:
        manifest = {r["relative_path"]: r for r in csv.DictReader(fh)}
    lake = LakePaths(tmp_path / "lake")
    cfg = load_config(overrides={"compute": {"partition_size": 100}}, environ={})
    counts = crawl_run(cfg, lake, FolderSource(root), run_id="shared").counts
    assert counts.reconciles
    assert counts.seen == len(manifest) + 2  # + MANIFEST.csv and README.md themselves

    index = {r["location"]: r for r in read_table(lake, "index").to_pylist()}
    quarantine = {r["location"]: r for r in read_table(lake, "quarantine").to_pylist()}
    assert not index.keys() & quarantine.keys()

    for path, row in manifest.items():
        kind = row["kind"]
        if kind == "dicom" and all(row[k] for k in _UIDS) and path in index:
            rec = index[path]
            assert rec["SOPInstanceUID"] == row["sop_instance_uid"], path
            assert rec["SeriesInstanceUID"] == row["series_instance_uid"], path
            assert rec["SOPClassUID"] == row["sop_class_uid"], path
            if row["transfer_syntax_uid"]:
                assert rec["TransferSyntaxUID"] == row["transfer_syntax_uid"], path
            else:  # no file meta: the uncompressed syntax the dataset was read with
                assert rec["TransferSyntaxUID"] in _UNCOMPRESSED, path
        elif kind == "dicom":
            reason = quarantine[path]["reason"]
            if all(row[k] for k in _UIDS):
                # complete headers but cut short: pydicom reports the pixel data shortfall
                assert reason == "truncated", path
                assert "less than expected" in row["pixel_decode"], path
            else:
                assert reason in {"missing_attribute", "truncated"}, path
        elif kind == "dicomdir":
            assert quarantine[path]["reason"] == "directory_record", path
        elif kind == "dicom-fragment":  # parses (or barely) but has no SOP Class
            assert quarantine[path]["reason"] in {"missing_attribute", "not_dicom"}, path
        else:
            assert kind in _NOT_DICOM_KINDS, kind
            assert quarantine[path]["reason"] == "not_dicom", path
    dicom_rows = [r for r in manifest.values() if r["kind"] == "dicom"]
    assert len(index) >= 660  # of 695 DICOM objects, about 30 lack a study/series/SOP UID
    assert len(index) == sum(1 for r in dicom_rows if r["relative_path"] in index)
