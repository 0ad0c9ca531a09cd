"""Every notebook in notebooks/ runs top to bottom (nbclient, a real kernel) on a small lake.

The lake is synthesised, crawled, de-identified, tensorised and inferred (a tiny test model)
here. Notebooks find it through ``PACSFLOW_LAKE`` in the kernel's environment, or at
``../demo-out/lake`` relative to the notebook (``01_index.ipynb`` hard-codes that path): the
notebooks are copied into a temporary ``notebooks/`` folder beside a ``demo-out/lake`` link to
the lake, and run from there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
TIMEOUT_S = 120
KEY = b"n" * 32


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``demo-out/lake`` (crawled, de-identified, tensorised, inferred with a
    tiny test model)."""
    from bundle_factory import make_bundle

    from pipeline.config import load_config
    from pipeline.connectors import FolderSource
    from pipeline.crawl import run as crawl_run
    from pipeline.deid.stage import run as deid_run
    from pipeline.infer.stage import run as infer_run
    from pipeline.lake import LakePaths
    from pipeline.synth import synthesize
    from pipeline.tensors.stage import run as tensors_run

    root = tmp_path_factory.mktemp("notebooks")
    archive = root / "archive"
    synthesize(archive, patients=1, seed=0, ct_slices=16, rows=64, columns=64, include_bad=True)
    lake = LakePaths(root / "demo-out" / "lake")
    bundle = make_bundle(root / "tiny", seed=5)
    cfg = load_config(
        overrides={
            "compute": {"partition_size": 64, "device": "cpu"},
            "infer": {"model": str(bundle)},
        },
        environ={},
    )
    crawl_run(cfg, lake, FolderSource(archive), run_id="c1")
    deid_run(cfg, lake, key=KEY, run_id="d1")
    tensors_run(cfg, lake, run_id="t1")
    infer_run(cfg, lake, run_id="i1")
    return root


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name: str, demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    folder = demo_root / "notebooks"
    folder.mkdir(exist_ok=True)
    path = folder / name
    shutil.copyfile(NOTEBOOKS / name, path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # committed with outputs cleared (diffs stay readable, no data)
        assert not cell.get("outputs"), f"{name}: commit the notebook with outputs cleared"
    # the kernel (ipykernel's python3: this interpreter) inherits the environment
    monkeypatch.setenv("PACSFLOW_LAKE", str(demo_root / "demo-out" / "lake"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # debugpy's frozen-modules note
    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()  # raises CellExecutionError, with the traceback, on a failing cell
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
