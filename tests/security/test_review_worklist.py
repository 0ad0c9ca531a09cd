"""Issue #23 §2, §3 and §6: the worklist a QA radiologist reads, against the real app over HTTP.

- findings vs measurements: the registry's ``outputs`` makes tissue classes per-series
  measurements (the finding page's measurements panel), not worklist rows (they were 7 rows
  per volume); a detected box is a finding; of a classification only the predicted class is;
- the worklist is grouped by pseudonymous patient and study, with counts of findings and
  decisions per study (rows were truncated UIDs), and thumbnails cropped around the finding;
- each sampling mode says what it did, per model (``positives``, ``negatives`` and
  ``lowest-confidence`` each said "46 of 46" without explanation);
- measurements read well: ``elongation 1.16`` (was ``1.16 1``), ``diameter 12.3 mm``, no raw
  ``diameter_mm`` keys; a 0 % bar is seen; no empty "no scores" panel; acceptance by finding
  size; agreement between two readers; the static report without 16-line key cells.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from test_review_support import (
    WAIT_S,
    audit_records,
    csrf_token,
    logged_in,
    review_settings,
    serve,
    shared_lake,
)

from pipeline.config import PipelineConfig, load_config
from pipeline.lake import LakePaths, read_table, write_partition

pytestmark = pytest.mark.slow

TISSUES = ["soft_tissue", "adipose_tissue", "bone", "lung"]
REGISTRY = """models:
  tiny:
    bundle: tiny
    outputs:
      findings: [lung_nodule]
      measurements: [soft_tissue, adipose_tissue, bone, lung]
"""


def _extra_rows(lake: LakePaths) -> dict[str, dict[str, Any]]:
    """Findings of the kinds the tiny model does not make, beside its tissue rows: a nodule
    candidate (with diameter and elongation), a detected box, and a classification (the
    predicted class and another one), each on a volume of the lake."""
    rows = sorted(read_table(lake, "findings").to_pylist(), key=lambda r: r["finding_key"])
    lungs = [r for r in rows if r["label"] == "lung"]
    base, other = lungs[0], lungs[-1]
    measured = {
        "voxel_count": {"value": 9, "unit": "voxels"},
        "volume_ml": {"value": 0.98, "unit": "ml"},
        "mean_hu": {"value": -41.6, "unit": "[hnsf'U]"},
        "diameter_mm": {"value": 12.34, "unit": "mm"},
        "elongation": {"value": 1.16, "unit": "1"},
    }
    prefix = base["finding_key"].rsplit("/", 1)[0]
    k = (base["bbox"][0] + base["bbox"][3]) // 2 if base.get("bbox") else 0
    # its mask: the model's, with the nodule's 3x3 voxels as value 9
    mask = np.load(lake.research / base["mask_path"])
    mask[k, 20:23, 20:23] = 9
    mask_path = str(Path(base["mask_path"]).with_name("nodule.npy"))
    np.save(lake.research / mask_path, mask)
    nodule = {
        **base,
        "finding_key": f"{prefix}/lung_nodule_1",
        "label": "lung_nodule_1",
        "label_value": 9,
        "mask_path": mask_path,
        "voxel_count": 9,
        "volume_ml": 0.98,
        "mean_hu": -41.6,
        "bbox": [k, 20, 20, k, 22, 22],
        "measurements": json.dumps(measured),
    }
    box = {
        **other,
        "finding_key": other["finding_key"].rsplit("/", 1)[0] + "/lung_nodule_box_1",
        "label": "lung_nodule_box_1",
        "box_class": "lung_nodule",
        "box_mm": [0.0, 0.0, 0.0, 25.0, 25.0, 25.0],
        "size_mm": [25.0, 25.0, 25.0],
        "score": 0.91,
        "mask_path": None,
        "mask_checksum": None,
        "voxel_count": None,
        "volume_ml": None,
        "mean_hu": None,
        "bbox": [0, 10, 10, 1, 20, 20],
        "measurements": json.dumps({"score": {"value": 0.91, "unit": "1"}}),
    }
    classes = {}
    for label, score, predicted in (("malignant", 0.8, True), ("benign", 0.2, False)):
        classes[label] = {
            **other,
            "finding_key": other["finding_key"].rsplit("/", 1)[0] + f"/{label}",
            "label": label,
            "task": "classification",
            "predicted": predicted,
            "score": score,
            "mask_path": None,
            "mask_checksum": None,
            "voxel_count": None,
            "volume_ml": None,
            "mean_hu": None,
            "bbox": None,
            "measurements": json.dumps({"probability": {"value": score, "unit": "1"}}),
        }
    extra = {"nodule": nodule, "box": box, **classes}
    write_partition(lake, "findings", list(extra.values()), part="issue23-extra")
    return extra


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, session_key_file: Path
) -> tuple[LakePaths, PipelineConfig, dict[str, dict[str, Any]]]:
    """A copy of the shared review lake with the extra findings, and a config whose model
    registry says which of the tiny model's outputs are measurements."""
    shared = shared_lake(tmp_path_factory, session_key_file)
    root = tmp_path_factory.mktemp("review-worklist")
    shutil.copytree(shared.root, root / "lake")
    lake = LakePaths(root / "lake")
    extra = _extra_rows(lake)
    (root / "models.yaml").write_text(REGISTRY)
    cfg = load_config(
        overrides={
            "lake": str(lake.root),
            "review": review_settings(),
            "infer": {"registry": str(root / "models.yaml")},
        },
        environ={},
    )
    return lake, cfg, extra


@pytest.fixture(scope="module")
def base(
    world: tuple[LakePaths, PipelineConfig, dict[str, dict[str, Any]]], session_key_file: Path
) -> Iterator[str]:
    lake, cfg, _ = world
    with serve(cfg, lake, session_key_file) as url:
        yield url


def _keys(html: str) -> list[str]:
    return re.findall(r'<tr class="finding-row" data-key="([^"]+)"', html)


def _decide(s: requests.Session, base: str, key: str, decision: str) -> None:
    page = s.get(base + "/finding", params={"key": key}, timeout=WAIT_S)
    r = s.post(
        base + "/decide",
        data={"csrf": csrf_token(page.text), "key": key, "decision": decision},
        timeout=WAIT_S,
        allow_redirects=False,
    )
    assert r.status_code == 303, r.text


def test_worklist_lists_findings_not_measurements(
    world: tuple[LakePaths, PipelineConfig, dict[str, dict[str, Any]]], base: str
) -> None:
    _, _, extra = world
    lead = logged_in(base, "lena")
    html = lead.get(base + "/", params={"per_page": 1000}, timeout=WAIT_S).text
    keys = set(_keys(html))
    # the candidate, the box and the predicted class; no tissue class, no unpredicted class
    assert keys == {extra["nodule"]["finding_key"], extra["box"]["finding_key"],
                    extra["malignant"]["finding_key"]}  # fmt: skip
    assert "(3 of 3 findings)" in html
    assert not any(k.endswith(tuple(f"/{t}" for t in TISSUES)) for k in keys)
    # the label filter offers findings' labels only
    assert "<option>soft_tissue</option>" not in html


def test_worklist_groups_by_study_with_counts(
    world: tuple[LakePaths, PipelineConfig, dict[str, dict[str, Any]]], base: str
) -> None:
    lake, _, extra = world
    series = read_table(lake, "series").to_pylist()
    study_of = {s["SeriesInstanceUID"]: s for s in series}
    dates = {s["StudyInstanceUID"]: s["StudyDate"] for s in read_table(lake, "studies").to_pylist()}
    lead = logged_in(base, "lena")
    html = lead.get(base + "/", timeout=WAIT_S).text
    bodies = re.findall(r'<tbody class="study" data-patient="([^"]*)" data-study="([^"]*)">'
                        r'(.*?)</tbody>', html, re.S)  # fmt: skip
    expected: dict[tuple[str, str], set[str]] = {}
    for f in (extra["nodule"], extra["box"], extra["malignant"]):
        s = study_of[f["SeriesInstanceUID"]]
        expected.setdefault((s["patient_token"], s["StudyInstanceUID"]), set()).add(
            f["finding_key"]
        )
    assert {(p, st): set(_keys(body)) for p, st, body in bodies} == expected
    assert len(bodies) == len(expected)  # one group per study, not one per row
    for p, st, body in bodies:
        n = len(expected[(p, st)])
        assert f'<span class="n-findings">{n}</span>' in body
        assert '<span class="n-decided">0</span>' in body
        assert "(shifted)" in body
        assert "series" in body
        assert re.search(r'<img class="thumb"[^>]+src="/thumb.png\?key=', body)
        # the study's shifted date and the patient's token are in its header
        when = dates.get(st)
        assert when is not None
        assert f'<span class="study-date">{when.isoformat()}</span>' in body
        assert f"<code>{p[:10]}" in body
    # a decision counts in its study's header
    _decide(lead, base, extra["nodule"]["finding_key"], "accept")
    html = lead.get(base + "/", timeout=WAIT_S).text
    body = next(b for _, _, b in re.findall(
        r'<tbody class="study" data-patient="([^"]*)" data-study="([^"]*)">(.*?)</tbody>',
        html, re.S) if extra["nodule"]["finding_key"] in b)  # fmt: skip
    assert '<span class="n-decided">1</span>' in body


def test_thumbnail_is_a_crop_around_the_finding(
    world: tuple[LakePaths, PipelineConfig, dict[str, dict[str, Any]]], base: str
) -> None:
    from PIL import Image

    lake, _, extra = world
    lead = logged_in(base, "lena")
    key = extra["nodule"]["finding_key"]
    r = lead.get(base + "/thumb.png", params={"key": key}, timeout=WAIT_S)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert img.size == (112, 112)
    # the outline is drawn, and the crop is around a 3x3-voxel finding: its outline spans a
    # good part of the image (on the whole 48-voxel slice it would be a speck of ~7 px)
    px = img.load()
    red = [(x, y) for x in range(112) for y in range(112) if px[x, y] == (255, 60, 40)]
    assert red
    span = max(x for x, _ in red) - min(x for x, _ in red)
    assert span >= 20, span
    # a box (no mask) gets its outline too
    assert lead.get(base + "/thumb.png", params={"key": extra["box"]["finding_key"]},
                    timeout=WAIT_S).status_code == 200  # fmt: skip
    # attacks: anonymous, unknown and traversal keys
    anon = requests.get(base + "/thumb.png", params={"key": key}, timeout=WAIT_S,
                        allow_redirects=False)  # fmt: skip
    assert anon.status_code == 303
    assert "/login" in anon.headers["location"]
    for bad in ("../../etc/passwd", "", "x" * 5000, "<script>"):
        assert lead.get(base + "/thumb.png", params={"key": bad}, timeout=WAIT_S).status_code == 404
    assert any(
        a["event"] == "review_thumbnail_viewed" and a["details"].get("finding_key") == key
        for a in audit_records(lake)
    )


def test_finding_page_shows_the_series_measurements_readably(
    world: tuple[LakePaths, PipelineConfig, dict[str, dict[str, Any]]], base: str
) -> None:
    _, _, extra = world
    lead = logged_in(base, "lena")
    html = lead.get(base + "/finding", params={"key": extra["nodule"]["finding_key"]},
                    timeout=WAIT_S).text  # fmt: skip
    panel = re.search(r'<table id="series-measurements".*?</table>', html, re.S)
    assert panel is not None
    names = re.findall(r"<tr data-key=\"[^\"]+\"><td>([^<]+)</td>", panel.group(0))
    assert sorted(names) == ["adipose tissue", "bone", "lung", "soft tissue"]
    assert " mL</td>" in panel.group(0)
    assert " HU</td>" in panel.group(0)
    # readable measurement names and units, once
    assert "<dt>diameter</dt><dd>12.3 mm</dd>" in html
    assert "<dt>elongation</dt><dd>1.16</dd>" in html
    assert "<dt>mean density</dt><dd>-42 HU</dd>" in html
    assert "diameter_mm" not in html
    assert "1.16 1" not in html
    assert "[hnsf" not in html


def test_sampling_modes_say_what_they_did(
    world: tuple[LakePaths, PipelineConfig, dict[str, dict[str, Any]]], base: str
) -> None:
    lead = logged_in(base, "lena")

    def note(**params: str) -> str:
        html = lead.get(base + "/", params=params, timeout=WAIT_S).text
        m = re.search(r'<div class="note sampling" id="sampling" data-mode="([^"]+)">(.*?)</div>',
                      html, re.S)  # fmt: skip
        assert m is not None
        return m.group(2)

    pos = note(sample="positives")
    assert "Positives only: 3 of the 3 findings" in pos
    # per model, what a positive is and the counts
    assert "tiny@" in pos
    assert "positive = a detected box" in pos
    assert "3 positive, 0 negative" in pos
    neg = note(sample="negatives", percent="50", seed="7")
    assert "A random 50% of the 0 negatives" in neg
    assert "seed 7" in neg
    low = note(sample="lowest-confidence")
    assert "2 have a score; 1 have none" in low
    assert "What the sampling modes mean" in note()


def test_metrics_read_well(
    world: tuple[LakePaths, PipelineConfig, dict[str, dict[str, Any]]], base: str
) -> None:
    _, _, extra = world
    lead = logged_in(base, "lena")
    rudi = logged_in(base, "rudi")
    # one rejected (a 0 % group), two readers on one finding, one accepted
    _decide(lead, base, extra["box"]["finding_key"], "reject")
    _decide(rudi, base, extra["box"]["finding_key"], "reject")
    _decide(lead, base, extra["malignant"]["finding_key"], "accept")
    html = lead.get(base + "/metrics", timeout=WAIT_S).text
    assert "no scores" not in html  # no empty panel
    assert 'class="plot plot-size"' in html
    assert re.search(r"<td>size</td><td>≥ 20 mm</td>", html)  # the 25 mm box
    assert 'class="agreement"' in html
    assert '<span class="pairs">1</span>' in html
    assert '<strong class="agree-rate">100.0%</strong>' in html


def test_zero_bar_is_visible() -> None:
    from PIL import Image

    from pipeline.review.render import rate_plot
    from pipeline.review.store import acceptance

    png = rate_plot({"A": acceptance(["reject", "reject"]), "B": acceptance(["accept"])}, "t")
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    reds = int(np.all(arr == (0xD6, 0x45, 0x41), axis=2).sum())
    assert reds > 20  # the 0 % bar's stub on the axis


def test_report_reads_well(
    world: tuple[LakePaths, PipelineConfig, dict[str, dict[str, Any]]],
) -> None:
    from PIL import Image

    from pipeline.review.report import build_report

    lake, cfg, extra = world
    html, n = build_report(lake, registry=cfg.infer.registry)
    assert n == 3
    assert set(_keys(html)) == {extra[k]["finding_key"] for k in ("nodule", "box", "malignant")}
    # no finding key spelled out in a cell (it wrapped into 16-line cells); readable names
    assert f"<code>{extra['nodule']['finding_key']}</code>" not in html
    assert "<li>diameter 12.3 mm</li>" in html
    assert "<li>elongation 1.16</li>" in html
    # thumbnails are crops around the lesion, 160 px
    uris = re.findall(r'<img class="thumb" src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) == 3
    import base64

    img = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert img.size == (160, 160)
