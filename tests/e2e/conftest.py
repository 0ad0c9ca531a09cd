"""Fixtures of the end-to-end tests.

- ``small_demo_run`` (session): one small ``pacsflow demo`` (2 patients, 24 slices of
  128x128) run as ``make demo`` leaves it: a folder with ``small.yaml`` and ``demo-out/`` (the
  archive, the lake, ``demo.key``, the results), made by the installed console script in that
  folder with no ``PACSFLOW_*`` variable set; gives ``(folder, the demo's stdout)``. The demo
  tests (``test_demo_e2e.py``) and the README's commands (``test_readme_commands.py``) read the
  same run rather than running the demo twice (about a minute each on 2 cores); the demo tests
  run first (file order) and look at the lake as the one run left it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "pacsflow"
SMALL = "synth: {patients: 2, ct_slices: 24, rows: 128, columns: 128}\n"


def demo_env() -> dict[str, str]:
    """The environment of a shell that ran ``make demo``: no pacsflow variables set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PACSFLOW")}


@pytest.fixture(scope="session")
def small_demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if not EXE.exists():
        pytest.skip("the pacsflow console script is not installed (pip install -e .)")
    work = tmp_path_factory.mktemp("small-demo")
    (work / "small.yaml").write_text(SMALL)
    done = subprocess.run(
        [str(EXE), "demo", "--out", "demo-out", "--config", "small.yaml"],
        cwd=work,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return work, done.stdout
