"""``pacsflow review --report FILE.html``: one self-contained HTML file (images and plots as
data URIs, CSS inline, no script, no network) with every finding and its review status.

The report is meant to be shared, so every comment and corrected label is checked again
against its patient's identifiers (:mod:`pipeline.review.phi`; decisions stored before that
check existed may hold some): one that holds any, or cannot be checked, is left out and said
so."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import LakeError
from pipeline.lake.io import atomic_write_text
from pipeline.lake.paths import LakePaths
from pipeline.review.measurements import Outputs, metrics_extras
from pipeline.review.phi import check_free_text, patient_identifiers
from pipeline.review.render import VolumeCache, metrics_plots
from pipeline.review.store import Catalog, metrics_by_version
from pipeline.review.thumbs import thumbnail_png

__all__ = ["WITHHELD", "build_report", "write_report"]

#: What the report shows in place of a comment or corrected label that may identify a patient.
WITHHELD = "[withheld: it may identify the patient]"


def build_report(
    lake: LakePaths,
    *,
    max_images: int = 500,
    run_id: str | None = None,
    registry: Path | None = None,
) -> tuple[str, int]:
    """The report's HTML and the number of findings in it (those of infer run ``run_id``
    only, when given). Findings only: the outputs the model registry at ``registry`` names
    per-series measurements are left out (:mod:`pipeline.codes.outputs`)."""
    from pipeline.review.app import data_uri, measurements, templates

    catalog = Catalog(lake)
    findings = Outputs(registry).split(catalog.findings())[0]
    if run_id is not None:
        findings = [f for f in findings if f.get("run_id") == _run_of(lake, run_id, findings)]
    latest = catalog.latest()
    volumes = VolumeCache(lake, size=4)
    rows: list[dict[str, Any]] = []
    identifiers: dict[str, set[str] | None] = {}
    for i, f in enumerate(findings):
        r = latest.get(f["finding_key"])
        texts = _shareable_texts(lake, f, r, identifiers) if r else (None, None)
        image = None
        if i < max_images and f.get("tensor_path"):
            image = data_uri(thumbnail_png(volumes, f, side=160))
        rows.append(
            {
                **f,
                "image": image,
                "other_measurements": measurements(f),
                "status": r["decision"] if r else "unreviewed",
                "reviewer": r["reviewer"] if r else None,
                "corrected_label": texts[0],
                "comment": texts[1],
            }
        )
    versions = metrics_by_version(findings, latest)
    extras = metrics_extras(findings, latest, catalog.reviews())
    plots = {
        (m.model, m.model_version): {n: data_uri(p) for n, p in metrics_plots(m).items()}
        for m in versions
    }
    shown = min(max_images, len(findings))
    html = (
        templates()
        .get_template("report.html")
        .render(
            user=None,
            role=None,
            perms=frozenset(),
            csrf="",
            standalone=True,
            generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
            run_id=run_id,
            findings=rows,
            reviewed=sum(1 for f in findings if f["finding_key"] in latest),
            versions=versions,
            plots=plots,
            extras=extras,
            images_shown=shown,
            images_left_out=len(findings) - shown,
        )
    )
    return html, len(findings)


def _shareable_texts(
    lake: LakePaths,
    finding: dict[str, Any],
    review: dict[str, Any],
    cache: dict[str, set[str] | None],
) -> tuple[str | None, str | None]:
    """A decision's corrected label and comment as the report may show them: each checked
    against the patient's identifiers, and :data:`WITHHELD` in place of one that holds any
    or cannot be checked (an encrypted vault)."""
    series = str(finding.get("SeriesInstanceUID") or "")
    out: list[str | None] = []
    for column in ("corrected_label", "comment"):
        text = review.get(column)
        if not text:
            out.append(None)
            continue
        if series not in cache:
            try:
                cache[series] = patient_identifiers(lake, series)
            except LakeError:
                cache[series] = None
        known = cache[series]
        out.append(text if known is not None and check_free_text(text, known)[0] else WITHHELD)
    return out[0], out[1]


def _run_of(lake: LakePaths, run: str, findings: list[dict[str, Any]]) -> str:
    """The id of the infer run ``run`` names (an id or a unique prefix of a run manifest's).

    Raises:
        ConfigError: no such run, several, or a run that wrote no findings (an empty report
            would look like a run without findings).
    """
    from pipeline.errors import ConfigError, LakeError
    from pipeline.lake.manifest import resolve_run

    wrote = {str(f.get("run_id")) for f in findings}
    if run in wrote:
        return run
    try:
        run_id = resolve_run(lake, run)
    except LakeError as exc:
        raise ConfigError(f"--run: {exc}") from None
    if run_id not in wrote:
        raise ConfigError(
            f"--run: run {run_id} wrote no findings (give an infer run: `pacsflow status` "
            "lists the runs); no report written"
        )
    return run_id


def write_report(
    lake: LakePaths,
    out: Path,
    *,
    max_images: int = 500,
    run_id: str | None = None,
    registry: Path | None = None,
) -> int:
    """Write the report to ``out`` atomically; return the number of findings in it."""
    html, n = build_report(lake, max_images=max_images, run_id=run_id, registry=registry)
    atomic_write_text(out, html)
    return n
