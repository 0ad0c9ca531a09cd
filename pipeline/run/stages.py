"""The stages of the pipeline, declared once: what each reads and writes, how it runs.

A :class:`Stage` is a small object: its ``name``, whether it reads the identified
(``restricted``) zone, the lake tables it ``reads`` and ``writes``, the object ``events`` it
produces (what ``pacsflow status`` counts objects by), ``skip(ctx)`` (why it
does not run under this config, or None) and ``run(ctx) -> StageOutcome``. The stages'
functions (``pipeline.<stage>.stage.run``) keep their own signatures; a stage object adapts
them to the one :class:`StageContext` the runner builds, and words the one summary line.

``pacsflow run`` runs :data:`PIPELINE` in order (those ``cfg.run`` switches on); each
single-stage command runs one of them through the same runner (lock, manifest, audit,
progress, reconciliation, cancellation): :mod:`pipeline.run.runner`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.lake import RESEARCH_TABLES, LakePaths, StageCounts

if TYPE_CHECKING:
    from pipeline.lake import RunRecorder
    from pipeline.lake.keys import LakeKeys

__all__ = [
    "PIPELINE",
    "ProgressFactory",
    "Stage",
    "StageContext",
    "StageOutcome",
    "enabled_stages",
    "object_states",
    "stage_named",
]

#: stage name -> a context manager yielding ``progress`` (``progress(n)``, ``progress.total(n)``)
ProgressFactory = Callable[[str], contextlib.AbstractContextManager[Any]]


def _no_progress(_name: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext(None)


@dataclass
class StageContext:
    """Everything a stage needs, built once per run by the runner and passed down.

    Attributes:
        cfg: the effective configuration (``cfg.lake`` is set).
        keys: the lake's keys (pseudonyms, vault, sealed columns, audit MAC).
        lake: the lake's paths, carrying ``keys`` (a lake sealed at rest needs them).
        recorder: the run's manifest and audit log (entered).
        client: the Dask client, or None to run in-process (started on first use).
        progress: stage name -> progress context (totals, rates, ETA).
        options: per-command choices that are not config: ``model`` (infer, write-back),
            ``dest`` (write-back), ``source`` (crawl).
    """

    cfg: PipelineConfig
    keys: LakeKeys
    lake: LakePaths
    recorder: RunRecorder
    progress: ProgressFactory = _no_progress
    options: dict[str, Any] = field(default_factory=dict)
    open_client: Callable[[], Any] = lambda: None
    _client: Any = field(default=None, repr=False)
    _client_opened: bool = field(default=False, repr=False)

    @property
    def client(self) -> Any:
        """The run's Dask client (None: in-process), started when a stage first asks for it:
        a run whose stages fail early, or need no Dask (verify, write-back), starts none."""
        if not self._client_opened:
            self._client = self.open_client()
            self._client_opened = True
        return self._client

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.recorder.run_id

    def audit(self, event: str, **fields: Any) -> None:
        """Append ``event`` to the lake's audit log, tagged with the run id."""
        self.recorder.audit.append(event, run_id=self.run_id, **fields)


@dataclass
class StageOutcome:
    """What a stage did: its counts, its summary line, and what fails the run after it was
    recorded (``problem``: leaks found, objects left pending); ``report``: lines to print
    after the summary (e.g. where the leaks are, without their values)."""

    counts: StageCounts
    line: str
    problem: str | None = None
    report: list[str] = field(default_factory=list)


class Stage(Protocol):
    """One stage of the pipeline (see the module docstring)."""

    name: ClassVar[str]
    restricted: ClassVar[bool]
    reads: ClassVar[tuple[str, ...]]
    writes: ClassVar[tuple[str, ...]]
    events: ClassVar[tuple[str, ...]]  # the object events it produces (queries.OBJECT_EVENTS)

    def skip(self, ctx: StageContext) -> str | None:
        """Why this stage does nothing under ``ctx`` (a line to print), or None to run it."""
        ...

    def run(self, ctx: StageContext) -> StageOutcome:
        """Run the stage; raise a :class:`pipeline.errors.PacsflowError` to fail the run."""
        ...


def _line(
    name: str, c: StageCounts, out: str, skipped: str, details: str = "", unit: str = ""
) -> str:
    """The one wording of a summary line: ``name: seen N[ unit], <out> N, quarantined N,
    <skipped> N[, details] in T s``."""
    unit = f" {unit}" if unit else ""
    details = f", {details}" if details else ""
    return (
        f"{name}: seen {c.seen}{unit}, {out} {c.out}, quarantined {c.quarantined}, "
        f"{skipped} {c.skipped}{details} in {c.seconds:.1f} s"
    )


class CrawlStage:
    """Archive headers into the restricted index (identified: reads the archive)."""

    name: ClassVar[str] = "crawl"
    restricted: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ("index", "units", "quarantine")
    writes: ClassVar[tuple[str, ...]] = ("index", "units", "quarantine")
    events: ClassVar[tuple[str, ...]] = ("index", "quarantine")

    def skip(self, ctx: StageContext) -> str | None:
        return None

    def run(self, ctx: StageContext) -> StageOutcome:
        from pipeline.connectors import open_source
        from pipeline.crawl import run as crawl_run
        from pipeline.crawl import skipped_text

        uri = ctx.options.get("source") or ctx.cfg.source.uri
        if not uri:
            raise ConfigError("crawl: no source.uri in the config (or switch run.crawl off)")
        source = open_source(
            uri,
            ctx.cfg.source,
            follow_symlinks=ctx.cfg.crawl.follow_symlinks,
            cache_dir=ctx.lake.restricted / "cache",
            limits=ctx.cfg.limits,
        )
        # probe the source before a Dask cluster starts (ctx.client): an unreachable PACS, or
        # refused credentials, fail within the source's timeouts, and say so first
        source.check()
        with ctx.progress(self.name) as progress:
            r = crawl_run(
                ctx.cfg,
                ctx.lake,
                source,
                run_id=ctx.run_id,
                client=ctx.client,
                progress=progress,
                checked=True,
            )
        c = r.counts
        skipped = c.extra.get("skipped_by_reason", {})
        unchanged = replace(c, skipped=c.extra.get("unchanged", c.skipped))
        details = f"skipped {sum(skipped.values())}{skipped_text(skipped)}"
        return StageOutcome(c, _line(self.name, unchanged, "indexed", "unchanged", details))


class DeidStage:
    """The restricted index into the research tables (PS3.15 Annex E) and the vault."""

    name: ClassVar[str] = "deid"
    restricted: ClassVar[bool] = True
    reads: ClassVar[tuple[str, ...]] = ("index", "vault")
    writes: ClassVar[tuple[str, ...]] = (
        "vault",
        "quarantine",
        "instances",
        "series",
        "studies",
        "patients",
    )
    events: ClassVar[tuple[str, ...]] = ("deidentified",)

    def skip(self, ctx: StageContext) -> str | None:
        return None

    def run(self, ctx: StageContext) -> StageOutcome:
        from pipeline.deid.stage import run as deid_run

        with ctx.progress(self.name) as progress:
            r = deid_run(
                ctx.cfg,
                ctx.lake,
                key=ctx.keys.secret,
                run_id=ctx.run_id,
                client=ctx.client,
                progress=progress,
            )
        c = r.counts
        details = []
        if c.extra.get("exported"):
            details.append(f"{c.extra['exported']} exported")
        if c.extra.get("export_failed"):
            details.append(f"{c.extra['export_failed']} exports failed (see the log)")
        line = _line(self.name, c, "de-identified", "own results skipped", ", ".join(details))
        failed = int(c.extra.get("export_failed", 0))
        problem = (
            f"deid: {failed} de-identified DICOM export(s) failed (the log says why); rerun "
            "to write them"
            if failed
            else None
        )
        return StageOutcome(c, line, problem)


class VerifyStage:
    """The leak scan of everything under research/ (fails the run on a hit)."""

    name: ClassVar[str] = "verify"
    restricted: ClassVar[bool] = True  # it reads the identifiers it looks for
    reads: ClassVar[tuple[str, ...]] = ("index", "vault", *RESEARCH_TABLES)
    writes: ClassVar[tuple[str, ...]] = ()
    events: ClassVar[tuple[str, ...]] = ()

    def skip(self, ctx: StageContext) -> str | None:
        return None

    def run(self, ctx: StageContext) -> StageOutcome:
        import time

        from pipeline.deid.verify import verify

        t0 = time.perf_counter()
        files = 0

        with ctx.progress(self.name) as progress:

            def scanned(n: int) -> None:
                nonlocal files
                files += n
                if progress is not None:
                    progress(n)

            if progress is not None and hasattr(progress, "total"):
                scanned.total = progress.total  # type: ignore[attr-defined]
            leaks = verify(ctx.lake, ctx.keys.secret, progress=scanned)
        leaky = len({leak.path for leak in leaks})
        counts = StageCounts(
            seen=files,
            out=files - leaky,
            quarantined=leaky,
            seconds=round(time.perf_counter() - t0, 3),
            extra={"leaks": len(leaks)},
        )
        ctx.audit("verify", leaks=len(leaks))
        report = [
            f"  {leak.path}"
            + (f" column {leak.column} row {leak.row}" if leak.column else "")
            + f": {leak.kind}"
            for leak in leaks[:50]
        ]
        return StageOutcome(
            counts,
            f"verify: leaks found = {len(leaks)} in {files} files under research/ "
            f"in {counts.seconds:.1f} s",
            problem=f"verify: {len(leaks)} identifying value(s) reached research/"
            if leaks
            else None,
            report=report,
        )


class TensorsStage:
    """De-identified series into geometry-exact volumes and the tensors table."""

    name: ClassVar[str] = "tensors"
    restricted: ClassVar[bool] = True  # reads the archive's objects (pixels and geometry)
    reads: ClassVar[tuple[str, ...]] = ("index", "vault", "tensors")
    writes: ClassVar[tuple[str, ...]] = ("tensors", "quarantine", "series")
    events: ClassVar[tuple[str, ...]] = ("tensorised",)

    def skip(self, ctx: StageContext) -> str | None:
        return None

    def run(self, ctx: StageContext) -> StageOutcome:
        from pipeline.tensors.stage import run as tensors_run

        with ctx.progress(self.name) as progress:
            r = tensors_run(
                ctx.cfg, ctx.lake, run_id=ctx.run_id, client=ctx.client, progress=progress
            )
        c = r.counts
        details = (
            f"{c.extra.get('volumes', 0)} volumes stored, "
            f"{c.extra.get('refused_series', 0)} series refused"
        )
        return StageOutcome(c, _line(self.name, c, "tensorised", "skipped", details, "objects"))


class InferStage:
    """A MONAI bundle over the stored volumes: masks and the findings table."""

    name: ClassVar[str] = "infer"
    restricted: ClassVar[bool] = False
    reads: ClassVar[tuple[str, ...]] = ("tensors", "findings")
    writes: ClassVar[tuple[str, ...]] = ("findings",)  # and the masks beside it
    events: ClassVar[tuple[str, ...]] = ("inferred",)

    def skip(self, ctx: StageContext) -> str | None:
        if not any(ctx.lake.table("tensors").rglob("*.parquet")):
            return "infer: no volumes yet, nothing to do"
        return None

    def run(self, ctx: StageContext) -> StageOutcome:
        from pipeline.infer.stage import run as infer_run

        # one machine with a GPU: the model runs in this process, on the GPU (local worker
        # processes would each load it there); on a cluster GPU workers declare the resource
        local_gpu = ctx.cfg.compute.device == "cuda" and not ctx.cfg.compute.scheduler
        with ctx.progress(self.name) as progress:
            r = infer_run(
                ctx.cfg,
                ctx.lake,
                run_id=ctx.run_id,
                client=None if local_gpu else ctx.client,
                progress=progress,
                model=ctx.options.get("model"),
            )
        c = r.counts
        engine = c.extra.get("engine", {})
        waiting, total = engine.get("seconds_waiting", 0.0), engine.get("seconds_total", 0.0)
        details = f"{c.extra.get('findings', 0)} findings rows, model {r.model_ref}"
        if total:
            details += f", waiting for data {100 * waiting / total:.0f}%"
        return StageOutcome(c, _line(self.name, c, "inferred", "skipped", details, "volumes"))


class WritebackStage:
    """Findings back to the PACS as SEG and TID 1500 SR, re-identified, idempotent."""

    name: ClassVar[str] = "writeback"
    restricted: ClassVar[bool] = True  # re-identifies: reads the vault and the archive
    reads: ClassVar[tuple[str, ...]] = (
        "findings",
        "tensors",
        "vault",
        "index",
        "outbox",
        "corrections",
    )
    writes: ClassVar[tuple[str, ...]] = ("outbox",)
    events: ClassVar[tuple[str, ...]] = ("written_back",)

    def skip(self, ctx: StageContext) -> str | None:
        if not (ctx.options.get("dest") or ctx.cfg.writeback.dest):
            return "writeback: no writeback.dest in the config, skipped"
        return None

    def run(self, ctx: StageContext) -> StageOutcome:
        from pipeline.writeback.stage import run as writeback_run

        dest = ctx.options.get("dest") or ctx.cfg.writeback.dest
        assert dest is not None  # skip() said so

        def audit(**counts: Any) -> None:
            ctx.audit("reidentified", stage=self.name, **counts)

        with ctx.progress(self.name) as progress:
            r = writeback_run(
                ctx.cfg,
                ctx.lake,
                run_id=ctx.run_id,
                dest=dest,
                key=ctx.keys.secret,
                model=ctx.options.get("model"),
                progress=progress,
                audit=audit,
                corrections=ctx.options.get("corrections"),
            )
        c, e = r.counts, r.counts.extra
        refused = int(e.get("refused_volumes", 0))
        details = (
            f"{e.get('built', 0)} objects built, {e.get('confirmed', 0)} confirmed, "
            f"{e.get('skipped', 0)} already there, {refused} volumes refused "
            f"(see the log), {len(r.pending)} objects pending"
        )
        return StageOutcome(
            c,
            _line(self.name, c, "written", "skipped", details, "volumes"),
            _writeback_problem(c.seen, refused, len(r.pending)),
        )


class FhirStage:
    """Written-back results as FHIR R4 transaction Bundles to a folder (default: the lake's
    restricted zone) or a FHIR server, re-identified, idempotent (docs/fhir.md)."""

    name: ClassVar[str] = "fhir"
    restricted: ClassVar[bool] = True  # re-identifies: reads the vault and the outbox
    reads: ClassVar[tuple[str, ...]] = (
        "outbox",
        "findings",
        "reviews",
        "vault",
        "index",
        "fhir_outbox",
    )
    writes: ClassVar[tuple[str, ...]] = ("fhir_outbox",)
    events: ClassVar[tuple[str, ...]] = ()

    def skip(self, ctx: StageContext) -> str | None:
        return None  # the folder destination is the embedded default

    def run(self, ctx: StageContext) -> StageOutcome:
        from pipeline.fhir.stage import run as fhir_run

        def audit(**counts: Any) -> None:
            ctx.audit("reidentified", stage=self.name, **counts)

        with ctx.progress(self.name) as progress:
            r = fhir_run(
                ctx.cfg,
                ctx.lake,
                run_id=ctx.run_id,
                dest=ctx.options.get("fhir_dest"),
                progress=progress,
                audit=audit,
            )
        c, e = r.counts, r.counts.extra
        details = (
            f"{e.get('confirmed', 0)} bundles confirmed at {r.dest}, "
            f"{e.get('final_reports', 0)} reports final, {len(r.pending)} pending"
        )
        problem = None
        if r.error:
            problem = f"fhir: {r.error} ({len(r.pending)} bundle(s) pending: rerun to send them)"
        elif r.pending:
            problem = f"fhir: {len(r.pending)} bundle(s) not confirmed (rerun to send them)"
        return StageOutcome(
            c, _line(self.name, c, "exported", "unchanged", details, "results"), problem
        )


def _writeback_problem(volumes: int, refused: int, pending: int) -> str | None:
    """The one line that fails a run whose write-back left work undone (None: all done).

    Args:
        volumes: the volumes write-back looked at.
        refused: volumes it cannot write back (e.g. resampled tensors, missing vault rows).
        pending: objects built but not confirmed at the destination.
    """
    parts = []
    if pending:
        parts.append(f"{pending} object(s) not confirmed at the destination (rerun to send them)")
    if refused:
        parts.append(f"{refused} of {volumes} volume(s) refused (the log says why)")
    return "writeback: " + "; ".join(parts) if parts else None


#: The pipeline, in order.
PIPELINE: tuple[Stage, ...] = (
    CrawlStage(),
    DeidStage(),
    VerifyStage(),
    TensorsStage(),
    InferStage(),
    WritebackStage(),
    FhirStage(),
)


def stage_named(name: str) -> Stage:
    """The stage called ``name``."""
    for stage in PIPELINE:
        if stage.name == name:
            return stage
    raise KeyError(name)


def enabled_stages(cfg: PipelineConfig) -> list[Stage]:
    """The stages ``cfg.run`` switches on, in order."""
    return [s for s in PIPELINE if getattr(cfg.run, s.name)]


def object_states(lake: LakePaths) -> Any:
    """Every object's latest state, from the events the stages of :data:`PIPELINE` declare
    (an Arrow table; see :func:`pipeline.lake.duck.object_states`)."""
    from pipeline.lake.duck import object_states as states

    return states(lake, [e for stage in PIPELINE for e in stage.events])


def tables_written(stages: Iterator[Stage] | tuple[Stage, ...]) -> set[str]:
    """Every table the ``stages`` write."""
    return {t for s in stages for t in s.writes}
