"""Every notebook in notebooks/ runs top to bottom (nbclient, a real kernel) on a small lake,
and shows what it says it shows.

The lake is synthesised, crawled, de-identified, tensorised and inferred (a tiny test model)
here. Notebooks find it through ``PACSFLOW_LAKE`` in the kernel's environment, or at
``../demo-out/lake`` relative to the notebook: the notebooks are copied into a temporary
``notebooks/`` folder beside a ``demo-out/lake`` folder, and run from there.

Beyond "no cell failed", each notebook's outputs are checked: the tables it prints, the
tensor shape (a 3-tuple equal to the ``tensors`` table's), the viewer widget's model, and
that no output holds an identifier of the synthetic patients (names, IDs, accession numbers,
birth dates, original UIDs).
"""

from __future__ import annotations

import ast
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.lake import LakePaths

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
TIMEOUT_S = 120
KEY = b"n" * 32
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


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


@pytest.fixture(scope="module")
def phi(demo_root: Path) -> set[str]:
    """Identifying values of the synthetic archive, as they were before de-identification."""
    import pydicom

    found: set[str] = set()
    for path in (demo_root / "archive").rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # the archive holds deliberately broken files
            continue
        for keyword in (
            "PatientName", "PatientID", "AccessionNumber", "PatientBirthDate",
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
        ):  # fmt: skip
            value = str(ds.get(keyword, "") or "")
            found.add(value)
            if keyword == "PatientName":
                found.update(value.split("^"))
    return {v for v in found if len(v) >= 6}


def _execute(name: str, demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
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
    return nb


def _outputs(nb: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    for cell in nb.cells:
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                yield cell, out


def _texts(out: dict[str, Any]) -> list[str]:
    """The text an output shows: a stream, or every textual representation of a result."""
    if out.get("output_type") == "stream":
        return [out.get("text", "")]
    data = out.get("data", {})
    return [str(v) for k, v in data.items() if k.startswith("text/") or k.endswith("json")]


def _result(nb: Any, marker: str) -> str:
    """The text/plain result of the code cell whose source holds ``marker``."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
    results = [o for o in cell.outputs if o.get("output_type") == "execute_result"]
    assert results, f"the cell with {marker!r} shows no result"
    return str(results[-1]["data"]["text/plain"])


def _printed(nb: Any, marker: str) -> str:
    cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


# --------------------------------------------------------------------------------------------
# what each notebook must show
# --------------------------------------------------------------------------------------------


def _check_index(nb: Any, lake: LakePaths) -> None:
    from pipeline.lake.duck import RESEARCH_VIEWS

    counts = ast.literal_eval(_result(nb, "RESEARCH_VIEWS"))
    assert set(counts) == set(RESEARCH_VIEWS)
    assert counts["patients"] >= 1
    assert counts["series"] >= 1
    assert counts["instances"] >= counts["series"]
    assert counts["findings"] >= 1  # the demo lake ran the model
    html = _result(nb, "FROM instances i JOIN series s")
    assert "CT" in html
    assert "1.2.840.10008.1.2" in html  # transfer syntaxes
    assert "patient_token" in _result(nb, "FROM studies")


def _check_tensors(nb: Any, lake: LakePaths) -> None:
    shapes = _result(nb, "batch['image'].shape")
    assert re.search(r"torch\.Size\(\[\d+, 1, 16, 64, 64\]\)", shapes), shapes
    assert "chest radiograph(s)" in _printed(nb, "PlanarDataset")


def _check_findings(nb: Any, lake: LakePaths) -> None:
    import duckdb

    from pipeline.lake.duck import scan_sql

    con = duckdb.connect()
    key, shape = con.execute(
        f"SELECT f.tensor_key, t.shape FROM {scan_sql(lake, 'findings')} f "
        f"JOIN {scan_sql(lake, 'tensors')} t USING (tensor_key) "
        "ORDER BY f.tensor_key, f.label_value LIMIT 1"
    ).fetchone()
    m = re.search(r"shape \(slices, rows, cols\): ([\[(][^\])]*[\])])", _printed(nb, "spacing mm"))
    assert m, "the geometry cell prints no shape"
    printed = tuple(ast.literal_eval(m[1]))
    assert len(printed) == 3, f"the shape printed is not the volume's: {printed}"
    assert printed == tuple(shape), f"printed {printed}, tensors says {tuple(shape)} for {key}"
    # the viewer cell shows an ipyniivue widget whose model the kernel created
    viewer = [
        o
        for c, o in _outputs(nb)
        if "volume_viewer(" in c.source and WIDGET_VIEW in o.get("data", {})
    ]
    assert len(viewer) == 1, "the viewer cell shows no widget"
    model_id = viewer[0]["data"][WIDGET_VIEW]["model_id"]
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    assert model_id in state, "the widget's model is not in the notebook's widget state"
    assert state[model_id]["state"].get("height") == 420
    assert len(state[model_id]["state"].get("volumes", [])) == 2  # the volume and its mask


CHECKS: dict[str, Callable[[Any, LakePaths], None]] = {
    "01_index.ipynb": _check_index,
    "02_tensors.ipynb": _check_tensors,
    "03_findings.ipynb": _check_findings,
}


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_shows_its_results(
    name: str, demo_root: Path, phi: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert name in CHECKS, f"{name}: add the checks of its outputs to CHECKS"
    nb = _execute(name, demo_root, monkeypatch)
    outputs = [o for _, o in _outputs(nb)]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr" and "Traceback" in o["text"]]
    assert phi, "the synthetic archive yielded no identifiers to look for"
    shown = "\n".join(t for o in outputs for t in _texts(o))
    leaked = sorted(v for v in phi if v in shown)
    assert not leaked, f"{name} shows {len(leaked)} identifiers of the source archive"
    CHECKS[name](nb, LakePaths(demo_root / "demo-out" / "lake"))


# --------------------------------------------------------------------------------------------
# what the notebooks say (no kernel needed)
# --------------------------------------------------------------------------------------------


def _cells(kind: str) -> Iterator[tuple[str, str]]:
    import json

    for name in NAMES:
        for cell in json.loads((NOTEBOOKS / name).read_text())["cells"]:
            if cell["cell_type"] == kind:
                yield name, "".join(cell["source"])


def test_notebooks_read_the_research_zone_only() -> None:
    restricted = re.compile(
        r"current_index|read_table\(\s*lake\s*,\s*['\"](index|quarantine|units|vault|outbox)"
    )
    for name, source in _cells("code"):
        assert not restricted.search(source), f"{name} reads the restricted zone: {source[:80]}"


def test_notebook_text_is_current() -> None:
    for name, text in _cells("markdown"):
        # `make demo` runs every stage: no notebook sends the reader to run one again
        assert not re.search(r"pacsflow (crawl|deid|tensors|infer)\b", text), name
        assert not re.search(r"\(#\d+\)", text), f"{name} points at an issue number: {text[:80]}"
