"""A write-back destination is recorded under one name whatever form it was given in: a folder
by its absolute path (as the folder connector's ``source_id``), a URI without credentials.
Found by the demo test: ``pacsflow demo --out demo-out`` then ``--out /abs/demo-out`` sent
all 12 SEG/SR objects a second time, the outbox keyed by the path as typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.connectors import open_source
from pipeline.writeback.stage import _dest_aliases, _public_dest


def test_a_folder_is_recorded_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "results").mkdir()
    monkeypatch.chdir(tmp_path)
    absolute = str((tmp_path / "results").resolve())
    for given in ("results", "./results", "results/", absolute, "../" + tmp_path.name + "/results"):
        assert _public_dest(given) == absolute, given
    assert _public_dest("results") == open_source("results").source_id
    # rows written before (the path as typed) still count as this destination
    assert _dest_aliases("results") == [absolute, "results"]
    assert _dest_aliases(absolute) == [absolute]


def test_a_uri_loses_its_credentials_and_keeps_its_form() -> None:
    assert _public_dest("dicomweb+http://u:p@127.0.0.1:8042/dicom-web") == (
        "dicomweb+http://127.0.0.1:8042/dicom-web"
    )
    assert _public_dest("dimse://ORTHANC@127.0.0.1:4242") == "dimse://ORTHANC@127.0.0.1:4242"
    assert _dest_aliases("dicomweb+http://u:p@h:1/r") == ["dicomweb+http://h:1/r"]
