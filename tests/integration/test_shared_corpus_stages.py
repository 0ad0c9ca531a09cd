"""crawl -> deid -> tensors over the whole of ../shared/data/dicom in one lake (issue #20).

``pacsflow deid`` over the whole corpus died at pydicom's ``badVR.dcm`` (Number of Frames
``1A``) with "unexpected ValueError" from building ``header_json``, and de-identified nothing
after it. A bad value now quarantines its object with the reason, and every object is
accounted for at each stage (indexed or quarantined with a named reason; counts add up).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from pipeline.lake import LakePaths, read_table

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _fuzz_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_fuzz", REPO / "bench" / "fuzz.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_object_of_the_corpus_is_accounted_for_at_each_stage(
    shared_data: Path, tmp_path: Path
) -> None:
    fuzz = _fuzz_module()
    lake = tmp_path / "lake"
    result = fuzz.run_chain(shared_data / "dicom", lake)
    assert result["problems"] == []
    crawl, deid, tensors = (result["counts"][s] for s in ("crawl", "deid", "tensors"))
    assert crawl[0] > 700  # seen
    assert crawl[1] >= 660  # indexed
    assert deid[0] == crawl[1]  # every indexed object went through deid
    assert deid[1] > 300  # and most were de-identified (the rest: burned-in PHI and bad values)
    # every de-identified volume candidate went through tensors (reconciled in problems);
    # non-image objects (SR, PR, KO, SEG, ...) are no candidates (issue #21)
    assert 0 < tensors[0] < deid[1]
    quarantine = read_table(LakePaths(lake), "quarantine").to_pylist()
    bad_vr = [r for r in quarantine if r["location"].endswith("test_files/badVR.dcm")]
    assert [(r["stage"], r["reason"]) for r in bad_vr] == [("deid", "malformed_value")]
    assert "NumberOfFrames" in bad_vr[0]["message"]
    assert "1A" not in bad_vr[0]["message"]  # the attribute is named, never its value


def test_non_image_series_are_no_volume_candidates(shared_data: Path, tmp_path: Path) -> None:
    """dcm_qa_xa30's Enhanced SR "PhoenixZIPReport" documents, in an MR study, were a refused
    series in ``tensors`` and seven quarantined objects at the tensors stage (issue #21)."""
    fuzz = _fuzz_module()
    lake = tmp_path / "lake"
    result = fuzz.run_chain(shared_data / "dicom" / "dcm_qa_xa30", lake)
    assert result["problems"] == []
    paths = LakePaths(lake)
    instances = read_table(paths, "instances").to_pylist()
    sr = {r["SeriesInstanceUID"] for r in instances if r["SOPClassUID"].endswith(".88.22")}
    assert len(sr) == 1
    assert not [r for r in read_table(paths, "quarantine").to_pylist() if r["stage"] == "tensors"]
    tensors = read_table(paths, "tensors").to_pylist()
    assert not [r for r in tensors if r["SeriesInstanceUID"] in sr]
    assert {r["status"] for r in tensors} == {"ok"}  # the image series still makes its volume
    (row,) = [r for r in read_table(paths, "series").to_pylist() if r["SeriesInstanceUID"] in sr]
    assert row["volume_ok"] is None
    assert row["volume_reason"].startswith("no volume candidate")
