"""The scheduling files of deploy/ work as written (issue #24): the systemd units pass
``systemd-analyze verify``, the cron entry is well formed, and the cron wrapper refuses a
credentials file others can read and passes pacsflow's exit status on."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
UNITS = ("pacsflow-nightly.service", "pacsflow-nightly.timer")
SCRIPT = DEPLOY / "cron" / "pacsflow-nightly.sh"


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / name)
    return parser


def test_units_parse_and_name_each_other() -> None:
    service, timer = _unit(UNITS[0]), _unit(UNITS[1])
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["EnvironmentFile"] == "/etc/pacsflow/pacsflow.env"
    assert " run /etc/pacsflow/nightly.yaml" in service["Service"]["ExecStart"]
    assert timer["Timer"]["Unit"] == UNITS[0]
    assert timer["Timer"]["Persistent"] == "true"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at an executable that does
    exe = tmp_path / "pacsflow"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/opt/pacsflow/.venv/bin/pacsflow", str(exe)))
    done = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    calendar = _unit(UNITS[1])["Timer"]["OnCalendar"]
    done = subprocess.run(
        ["systemd-analyze", "calendar", calendar], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_cron_entry_is_well_formed() -> None:
    jobs = [
        ln
        for ln in (DEPLOY / "cron" / "pacsflow.cron").read_text().splitlines()
        if ln.strip() and not ln.startswith("#") and not re.match(r"^[A-Z_]+=", ln)
    ]
    assert len(jobs) == 1
    fields = jobs[0].split()
    minute, hour, dom, month, dow, user, command = fields
    assert re.fullmatch(r"\d+", minute)
    assert 0 <= int(minute) < 60
    assert re.fullmatch(r"\d+", hour)
    assert 0 <= int(hour) < 24
    assert (dom, month, dow) == ("*", "*", "*")
    assert user == "pacsflow"
    assert command == "/opt/pacsflow/deploy/cron/pacsflow-nightly.sh"
    assert os.access(SCRIPT, os.X_OK)
    assert (REPO / command.removeprefix("/opt/pacsflow/")).exists()


def _fake_home(tmp_path: Path, status: int) -> Path:
    """A checkout whose .venv/bin/pacsflow exits ``status`` with a one-line reason."""
    home = tmp_path / "home"
    exe = home / ".venv" / "bin" / "pacsflow"
    exe.parent.mkdir(parents=True)
    exe.write_text(
        "#!/bin/sh\n"
        'echo "args: $*"\n'
        'echo "key: $PACSFLOW_KEY_FILE"\n'
        + (f'echo "pacsflow: no space left on /data" >&2\nexit {status}\n' if status else "")
    )
    exe.chmod(0o755)
    return home


def _run_script(tmp_path: Path, home: Path, env_mode: int) -> subprocess.CompletedProcess[str]:
    env_file = tmp_path / "pacsflow.env"
    env_file.write_text("PACSFLOW_KEY_FILE=/etc/pacsflow/lake.key\nPACS_PASSWORD=secret\n")
    env_file.chmod(env_mode)
    env = {
        "PATH": os.environ["PATH"],
        "PACSFLOW_HOME": str(home),
        "PACSFLOW_ENV_FILE": str(env_file),
        "PACSFLOW_CONFIG": "/etc/pacsflow/nightly.yaml",
        "PACSFLOW_LOG_DIR": str(tmp_path / "logs"),
    }
    return subprocess.run(
        [str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_cron_script_refuses_credentials_others_can_read(tmp_path: Path) -> None:
    done = _run_script(tmp_path, _fake_home(tmp_path, 0), 0o644)
    assert done.returncode == 2
    assert "is mode 644: it holds PACS credentials, make it 0600" in done.stderr
    assert not (tmp_path / "logs").exists()


def test_cron_script_runs_quietly_and_logs(tmp_path: Path) -> None:
    done = _run_script(tmp_path, _fake_home(tmp_path, 0), 0o600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # cron mails nothing on success
    (log,) = (tmp_path / "logs").glob("nightly-*.log")
    text = log.read_text()
    assert "args: --json-logs run /etc/pacsflow/nightly.yaml" in text
    assert "key: /etc/pacsflow/lake.key" in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_cron_script_passes_the_exit_status_and_the_reason_on(tmp_path: Path) -> None:
    done = _run_script(tmp_path, _fake_home(tmp_path, 4), 0o600)
    assert done.returncode == 4
    assert "pacsflow nightly run failed (exit 4): pacsflow: no space left on /data" in done.stdout
    assert "log: " in done.stdout
