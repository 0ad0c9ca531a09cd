"""A whole synthetic archive (3 patients) is readable in full and accepted by Orthanc (STOW-RS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dicom_factory import with_file_meta
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 20261128  # no other test uses this seed, so its UIDs are this test's own in the shared PACS


def test_whole_archive_reads_in_full_and_orthanc_accepts_it(
    tmp_path: Path, dicomweb: DICOMwebClient
) -> None:
    from pipeline.synth import synthesize

    result = synthesize(tmp_path, patients=3, seed=SEED, ct_slices=16, rows=128, columns=128)
    truth = json.loads(result.ground_truth.read_text())
    bad = {b["path"] for b in truth["bad_objects"]}
    files = [
        p
        for p in sorted(tmp_path.rglob("*"))
        if p.is_file() and p.name != "ground_truth.json" and str(p.relative_to(tmp_path)) not in bad
    ]
    assert len(files) == result.n_instances == sum(s["n_instances"] for s in truth["series"])

    by_study: dict[str, int] = {}
    batch: list[Dataset] = []
    stored = 0
    for path in files:
        ds = with_file_meta(dcmread(path, force=True))
        assert ds.pixel_array.size > 0, path  # every good object decodes in full
        by_study[ds.StudyInstanceUID] = by_study.get(ds.StudyInstanceUID, 0) + 1
        batch.append(ds)
        if len(batch) == 50 or path == files[-1]:
            response = dicomweb.store_instances(batch)
            assert len(response.get("FailedSOPSequence", [])) == 0
            assert len(response.ReferencedSOPSequence) == len(batch)
            stored += len(batch)
            batch = []
    assert stored == len(files)

    for study_uid, n in by_study.items():
        found = dicomweb.search_for_instances(study_instance_uid=study_uid)
        assert len(found) == n, study_uid
    assert len(by_study) == len(truth["studies"]) == result.n_studies
