"""`pacsflow run` with a real PACS at both ends: a private Orthanc (on loopback) is the source
(crawled over QIDO-RS/WADO-RS) and the destination (STOW-RS) of the whole pipeline, with the
project's default model. Every lesion `pacsflow synth` put into the CT phantoms must come back as
a finding and as a SEG segment and an SR measurement group in Orthanc, in its original study;
`verify` finds no leak; the counts reconcile; a second run adds nothing to the PACS."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from dicom_factory import with_file_meta
from pydicom import dcmread
from typer.testing import CliRunner

from pipeline.cli.main import app
from pipeline.lake import LakePaths, read_table
from pipeline.lake.keys import LakeKeys
from pipeline.lake.queries import finding_name
from pipeline.synth.lesions import match_lesions

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = b"o" * 32
SEED = 8300


def _original_ct_series(truth: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in truth["series"] if s.get("lesions")]


def _store(server: Any, archive: Path, truth: dict[str, Any]) -> int:
    client = server.dicomweb_client()
    n = 0
    for series in truth["series"]:
        batch = [with_file_meta(dcmread(archive / f, force=True)) for f in series["files"]]
        response = client.store_instances(batch)
        assert not response.get("FailedSOPSequence"), series["SeriesInstanceUID"]
        n += len(batch)
    return n


def _instances(server: Any) -> int:
    return int(server.rest("GET", "/statistics").json()["CountInstances"])


def _run(config: Path) -> str:
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_orthanc_to_orthanc_every_lesion_comes_back(
    tmp_path: Path, orthanc_control: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.synth import synthesize

    synth = synthesize(
        tmp_path / "archive",
        patients=2,
        seed=SEED,
        ct_slices=40,
        rows=256,
        columns=256,
        include_bad=False,
        include_mr=False,
    )
    truth = json.loads(synth.ground_truth.read_text())
    lesion_series = _original_ct_series(truth)
    assert sum(len(s["lesions"]) for s in lesion_series) >= 2, "the seed should give lesions"

    (tmp_path / "pacs").mkdir()
    proc, server = orthanc_control.start(tmp_path / "pacs")
    try:
        stored = _store(server, tmp_path / "archive", truth)
        monkeypatch.setenv("PACS_USER", server.username)
        monkeypatch.setenv("PACS_PASSWORD", server.password)
        key = tmp_path / "k.key"
        key.write_text(f"pacsflow-key-v1\n{base64.b64encode(KEY).decode()}\n")
        key.chmod(0o600)
        config = tmp_path / "night.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "lake": str(tmp_path / "lake"),
                    "key_file": str(key),
                    "source": {
                        "uri": f"dicomweb+{server.dicomweb_url}",
                        "auth": {"username_env": "PACS_USER", "password_env": "PACS_PASSWORD"},
                    },
                    "compute": {"workers": 1, "device": "cpu"},
                    "writeback": {"dest": f"dicomweb+{server.dicomweb_url}"},
                }
            )
        )
        output = _run(config)
        assert "verify: leaks found = 0" in output
        lake = LakePaths(tmp_path / "lake", keys=LakeKeys(KEY))
        run_id = output.strip().splitlines()[-1].split()[1].rstrip(":")
        manifest = json.loads((lake.root / "runs" / f"{run_id}.json").read_text())
        for name, stage in manifest["stages"].items():
            if {"seen", "out", "quarantined", "skipped"} <= set(stage):
                assert stage["seen"] == stage["out"] + stage["quarantined"] + stage["skipped"], name
        assert manifest["stages"]["crawl"]["seen"] == stored

        findings = read_table(lake, "findings").to_pylist()
        outbox = [r for r in read_table(lake, "outbox").to_pylist() if r["status"] == "confirmed"]
        inferred = {f["tensor_key"] for f in findings}
        assert len(outbox) == 2 * len(inferred)
        assert _instances(server) == stored + len(outbox)

        # every lesion: one lung_nodule finding whose box holds the lesion's centre, in a volume
        # of the lesion's series (matched through the vault: the research side is pseudonymous)
        matches = match_lesions(lake, truth)
        assert len(matches) == sum(len(s["lesions"]) for s in lesion_series)
        for m in matches:
            assert len(m.findings) == 1, m.lesion
            (found,) = m.findings
            assert found["volume_ml"] == pytest.approx(m.lesion["volume_ml"], rel=0.5)
            assert 40 <= found["mean_hu"] <= 140
        client = server.dicomweb_client()
        for series in lesion_series:
            mine = [
                f
                for m in matches
                if m.series_uid == series["SeriesInstanceUID"]
                for f in m.findings
            ]
            # SEG and SR of the volume, found by QIDO-RS in the original study
            study = series["StudyInstanceUID"]
            # the segments' unique names (label and instance apart since issue #24)
            nodules = {finding_name(f["label"], f["instance"]) for f in mine}
            (volume,) = {f["tensor_key"] for f in mine}
            ours = {r["kind"]: r for r in outbox if r["tensor_key"] == volume}
            assert set(ours) == {"SEG", "SR"}
            for kind, row in ours.items():
                assert row["StudyInstanceUID"] == study
                hits = client.search_for_instances(
                    study, search_filters={"SOPInstanceUID": row["result_uid"], "Modality": kind}
                )
                assert len(hits) == 1, kind
            seg, sr = (
                client.retrieve_instance(study, ours[k]["SeriesInstanceUID"], ours[k]["result_uid"])
                for k in ("SEG", "SR")
            )
            labels = {s.SegmentLabel for s in seg.SegmentSequence}
            assert nodules <= labels
            tracked = {
                entry.TextValue
                for item in sr.ContentSequence
                if item.ConceptNameCodeSequence[0].CodeValue == "126010"
                for group in item.ContentSequence
                for entry in group.ContentSequence
                if entry.ConceptNameCodeSequence[0].CodeValue == "112039"
            }
            assert nodules <= tracked

        # nothing new: the PACS holds the same objects after a second night; the crawl finds
        # our own SEG and SR there, and they are skipped, never research data nor quarantined
        before = _instances(server)
        again = _run(config)
        assert _instances(server) == before
        run_id = again.strip().splitlines()[-1].split()[1].rstrip(":")
        stages = json.loads((lake.root / "runs" / f"{run_id}.json").read_text())["stages"]
        assert stages["deid"]["skipped"] == len(outbox)
        assert stages["deid"]["extra"]["own_results"] == len(outbox)
        assert stages["deid"]["quarantined"] == 0
        modalities = {r["Modality"] for r in read_table(lake, "series").to_pylist()}
        assert modalities == {"CT"}
    finally:
        orthanc_control.stop(proc)
