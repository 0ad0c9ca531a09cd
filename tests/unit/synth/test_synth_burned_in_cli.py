"""``pacsflow synth --burned-in N``: the burned-in text objects of the bench, with their text
boxes written outside the archive (issue #21 §5)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.synth.burned_in import burned_in_object

runner = CliRunner()
SMALL = ["--small", "--patients", "1", "--no-mr", "--no-bad", "--slices", "8"]


def test_synth_writes_burned_in_objects_and_truth_outside(tmp_path: Path) -> None:
    out = tmp_path / "archive"
    result = runner.invoke(app, ["synth", str(out), *SMALL, "--seed", "4", "--burned-in", "3"])
    assert result.exit_code == 0, result.output
    truth = tmp_path / "archive-burned-in-truth.json"
    assert "3 objects with burned-in text" in result.output
    table = json.loads(truth.read_text())
    files = sorted((out / "burned_in").glob("*.dcm"))
    assert [f.name for f in files] == sorted(table)
    for i, path in enumerate(files):  # the bench's objects: same seed, same index
        ds = pydicom.dcmread(path)
        assert ds.BurnedInAnnotation == "YES"
        assert ds.SOPInstanceUID == burned_in_object(i, 4)[0].SOPInstanceUID
        assert table[path.name]
        assert {"frame", "kind", "x0", "y1"} <= set(table[path.name][0])
    assert not list(out.rglob("*burned-in-truth*"))  # (ground_truth.json is the CT/MR one)


def test_synth_refuses_burned_in_truth_inside_the_archive(tmp_path: Path) -> None:
    out = tmp_path / "archive"
    inside = out / "truth.json"
    result = runner.invoke(
        app, ["synth", str(out), *SMALL, "--burned-in", "1", "--burned-in-truth", str(inside)]
    )
    assert result.exit_code == 2
    assert "inside the archive" in result.output
    assert not out.exists()
