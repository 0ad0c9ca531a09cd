"""The CLI contract: every verb present, light imports, clear answers for verbs not built yet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.main import app

CONTRACT_VERBS = (
    "synth",
    "keygen",
    "crawl",
    "deid",
    "tensors",
    "infer",
    "writeback",
    "fhir",
    "review",
    "run",
    "demo",
    "status",
    "sql",
    "verify",
)
#: every verb of the CLI contract (DESIGN.md), all built now
CONTRACT = (
    "synth",
    "crawl",
    "status",
    "demo",
    "keygen",
    "deid",
    "sql",
    "verify",
    "tensors",
    "infer",
    "writeback",
    "fhir",
    "run",
    "review",
)
HEAVY = ("torch", "monai", "pynetdicom", "dicomweb_client", "highdicom")

runner = CliRunner()


def _modules_after(code: str) -> set[str]:
    out = (
        subprocess.run(
            [
                sys.executable,
                "-c",
                code + "\nimport sys, json\n"
                "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    return set(json.loads(out))


def test_help_lists_every_contract_verb() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in CONTRACT_VERBS:
        assert f" {verb} " in result.output, verb


@pytest.mark.parametrize(
    "code",
    [
        "import pipeline",
        "from pipeline.cli.main import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass",
    ],
    ids=["import pipeline", "pacsflow --help"],
)
def test_light_imports(code: str) -> None:
    loaded = _modules_after(code)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_console_script_help_runs() -> None:
    exe = Path(sys.executable).parent / "pacsflow"
    if not exe.exists():
        pytest.skip("pacsflow console script not installed in this environment")
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "crawl" in done.stdout


@pytest.mark.parametrize("verb", CONTRACT)
def test_every_contract_verb_exists_and_documents_itself(verb: str) -> None:
    result = runner.invoke(app, [verb, "--help"])
    assert result.exit_code == 0, result.output
    assert "not implemented" not in result.output


def test_stage_verbs_take_the_common_flags() -> None:
    # writeback runs on the driver (it re-identifies and talks to one destination): no workers
    for verb in ("crawl", "deid", "tensors", "infer"):
        result = runner.invoke(app, [verb, "--help"])
        for flag in ("--config", "--workers", "--scheduler", "--lake"):
            assert flag in result.output, (verb, flag)


def test_status_reports_versions_codecs_devices() -> None:
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["environment"]
    assert report["versions"]["pydicom"]
    syntaxes = {c["transfer_syntax"]: c for c in report["codecs"]}
    assert syntaxes["1.2.840.10008.1.2.5"]["decode"]  # RLE
    assert syntaxes["1.2.840.10008.1.2.4.90"]["decode"]  # JPEG 2000 lossless
    assert report["devices"][0]["name"] == "cpu"
    text = runner.invoke(app, ["status"]).output
    assert "pixel codecs" in text
    assert "compute devices" in text


def test_bad_config_key_exits_2_with_suggestion(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("crawl:\n  incremantal: false\n")
    result = runner.invoke(app, ["crawl", "--config", str(cfg), "--lake", "l", "--source", "s"])
    assert result.exit_code == 2
    assert "did you mean 'incremental'" in result.output


def test_crawl_missing_source_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["crawl", "--source", str(tmp_path / "nope"), "--lake", str(tmp_path / "lake")]
    )
    assert result.exit_code == 1
    assert "archive folder not found" in result.output


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    key = tmp_path / "secrets" / "pacsflow.key"
    first = runner.invoke(app, ["keygen", str(key)])
    assert first.exit_code == 0, first.output
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    before = key.read_bytes()
    again = runner.invoke(app, ["keygen", str(key)])
    assert again.exit_code == 2
    assert "refusing to overwrite" in again.output
    assert key.read_bytes() == before
