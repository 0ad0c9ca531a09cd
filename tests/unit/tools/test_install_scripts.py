"""The install scripts that `make test` runs, on a machine that lacks their package.

Each script runs under ``set -euo pipefail`` with a PATH holding only the tools it needs and a
stub ``apt-get`` that "installs" a fake binary printing a long version text (a real Orthanc
prints several lines; a long text makes a reader that stops early certain to SIGPIPE it). The
script must install, print the first version line and exit 0 (issue #18 §0: `Orthanc --version
| head -1` exited 141 right after a real install), and exit 0 at once when already installed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
_TOOLS = (
    *("bash", "env", "id", "printf", "tee", "chmod"),
    *("head", "sed", "cat", "seq", "mkdir", "touch"),
)


def _stub_path(tmp_path: Path, binary: str, extra: str = "") -> tuple[Path, Path]:
    """A bin folder with the real tools linked in and a stub apt-get; returns (bin, log)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in _TOOLS:
        real = shutil.which(tool)
        assert real, tool
        (bindir / tool).symlink_to(real)
    log = tmp_path / "apt.log"
    fake = bindir / binary
    script = f"""#!/bin/bash
echo "$*" >> {log}
if [ "$1" = install ]; then
  cat > {fake} <<'BIN'
#!/bin/bash
echo "{binary} 9.9.9"
for i in $(seq 1 20000); do echo "line $i of a long version and licence text"; done
BIN
  chmod +x {fake}
  {extra}
fi
"""
    apt = bindir / "apt-get"
    apt.write_text(script)
    apt.chmod(apt.stat().st_mode | stat.S_IXUSR)
    return bindir, log


def _run(script: str, bindir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("the install scripts run apt-get as root or through sudo; this runs neither")
    return subprocess.run(
        [str(bindir / "bash"), str(ROOT / "tools" / script)],
        env={"PATH": str(bindir), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_install_orthanc_on_a_machine_without_it(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    bindir, log = _stub_path(
        tmp_path, "Orthanc", f"mkdir -p {plugins}; touch {plugins}/libOrthancDicomWeb.so"
    )
    env = {
        "PACSFLOW_ORTHANC_PLUGIN_DIR": str(plugins),
        "PACSFLOW_POLICY_RC_D": str(tmp_path / "policy-rc.d"),
    }
    done = _run("install-orthanc.sh", bindir, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == ["Orthanc 9.9.9"]
    calls = log.read_text().splitlines()
    assert calls[0] == "update -q"
    assert calls[1].startswith("install -y -q --no-install-recommends orthanc orthanc-dicomweb")
    policy = tmp_path / "policy-rc.d"
    assert policy.read_text() == "#!/bin/sh\nexit 101\n"
    assert os.access(policy, os.X_OK)
    # installed now: a second run does nothing
    again = _run("install-orthanc.sh", bindir, env)
    assert again.returncode == 0
    assert again.stdout == ""
    assert len(log.read_text().splitlines()) == 2


def test_install_chromium_on_a_machine_without_it(tmp_path: Path) -> None:
    driver = tmp_path / "bin" / "chromedriver"
    bindir, log = _stub_path(
        tmp_path, "chromium", f"printf '#!/bin/bash\\n' > {driver}; chmod +x {driver}"
    )
    env = {"PACSFLOW_CHROMIUM": str(bindir / "chromium"), "PACSFLOW_CHROMEDRIVER": str(driver)}
    done = _run("install-chromium.sh", bindir, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == ["chromium 9.9.9"]
    assert (
        log.read_text()
        .splitlines()[1]
        .startswith("install -y -q --no-install-recommends chromium chromium-driver")
    )
    again = _run("install-chromium.sh", bindir, env)
    assert again.returncode == 0
    assert again.stdout == ""


def test_install_imaging_tools_on_a_machine_without_them(tmp_path: Path) -> None:
    tesseract = tmp_path / "bin" / "tesseract"
    bindir, log = _stub_path(
        tmp_path,
        "dcm2niix",
        f"printf '#!/bin/bash\\necho tesseract 9.9.9\\nseq 1 20000\\n' > {tesseract}; "
        f"chmod +x {tesseract}",
    )
    done = _run("install-imaging-tools.sh", bindir, {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "dcm2niix: dcm2niix 9.9.9",
        "tesseract: tesseract 9.9.9",
    ]
    calls = log.read_text().splitlines()
    assert calls[1].startswith(
        "install -y -q --no-install-recommends dcm2niix tesseract-ocr tesseract-ocr-eng"
    )
    again = _run("install-imaging-tools.sh", bindir, {})
    assert again.returncode == 0
    assert again.stdout == ""
    assert len(log.read_text().splitlines()) == 2


def test_the_old_orthanc_check_fails_under_pipefail(tmp_path: Path) -> None:
    """The stub reproduces the finding: the old last line exits 141 with it."""
    bindir, _ = _stub_path(tmp_path, "Orthanc")
    old = tmp_path / "old.sh"
    old.write_text("set -euo pipefail\napt-get install x\nOrthanc --version | head -1\n")
    done = _run_raw(bindir, old)
    assert done.returncode == 141


def _run_raw(bindir: Path, script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bindir / "bash"), str(script)],
        env={"PATH": str(bindir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
