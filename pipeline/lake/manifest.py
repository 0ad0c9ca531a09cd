"""Run manifests: one JSON file per run under ``runs/``.

A manifest records the command, the effective configuration and its hash, the versions of the
key libraries, per-stage counts (``in``, ``out``, ``quarantined``, ``skipped``) and timings,
the status, the audit log's head at the end of the run (so a truncated audit log is caught), and
the version of every research table after each stage and at the end (``table_versions``: what
``pacsflow sql --as-of RUN`` reads and ``pacsflow vacuum`` keeps).
It is written atomically when the run starts (status ``running``) and again when it ends.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline._deps import library_versions
from pipeline.errors import Cancelled
from pipeline.lake.audit import AuditLog, Witness
from pipeline.lake.delta import table_versions
from pipeline.lake.identity import open_lake
from pipeline.lake.paths import LakePaths

if TYPE_CHECKING:
    from pipeline.lake.keys import LakeKeys

logger = logging.getLogger(__name__)

__all__ = [
    "RUN_STATUSES",
    "RunManifest",
    "RunRecorder",
    "StageCounts",
    "list_manifests",
    "mark_abandoned",
    "new_run_id",
    "pinned_versions",
    "resolve_run",
    "versions_of_run",
]

#: What a manifest's ``status`` can say. ``running``: started, not finished (or its process
#: died and no run since has looked); ``abandoned``: its process died without finishing
#: (marked by the next run, which holds the lake's lock); ``cancelled``: stopped by
#: SIGINT/SIGTERM, finished batches kept.
RUN_STATUSES = ("running", "succeeded", "failed", "unreconciled", "cancelled", "abandoned")


def new_run_id(now: datetime | None = None) -> str:
    """A sortable, unique run id such as ``20261128T183000Z-3f9a1c``."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass
class StageCounts:
    """Counts of one stage in one run. ``seen == out + quarantined + skipped`` must hold."""

    seen: int = 0
    out: int = 0
    quarantined: int = 0
    skipped: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reconciles(self) -> bool:
        """True when every object seen is accounted for exactly once."""
        return self.seen == self.out + self.quarantined + self.skipped


@dataclass
class RunManifest:
    """The content of ``runs/<run_id>.json``."""

    run_id: str
    command: str
    started_at: str
    status: str = "running"
    finished_at: str | None = None
    seconds: float | None = None
    config_hash: str | None = None
    config: dict[str, Any] | None = None
    versions: dict[str, str | None] = field(default_factory=dict)
    stages: dict[str, StageCounts] = field(default_factory=dict)
    error: str | None = None
    audit_head: dict[str, Any] | None = None
    lake_id: str | None = None
    key_fingerprint: str | None = None
    #: the version of each research table when the run last recorded (``{table: version}``)
    table_versions: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        """Serialise as pretty JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_file(cls, path: Path) -> RunManifest:
        """Read a manifest written by :meth:`RunRecorder`."""
        data = json.loads(path.read_text(encoding="utf-8"))
        data["stages"] = {k: StageCounts(**v) for k, v in data.get("stages", {}).items()}
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


class RunRecorder:
    """Context manager that records one run: manifest at start and end, audit records around it.

    Entering opens the lake (:func:`pipeline.lake.identity.open_lake`): it must be a lake of
    ``keys``, or, with ``create``, a missing or empty folder that becomes one (sealed at rest
    when ``encrypted``); nothing is written before that check passed.

    Examples
    --------
    >>> with RunRecorder(lake, "crawl", keys=keys, create=True) as run:  # doctest: +SKIP
    ...     run.stage("crawl", StageCounts(seen=10, out=9, quarantined=1))
    """

    def __init__(
        self,
        lake: LakePaths,
        command: str,
        *,
        keys: LakeKeys,
        witness: Witness | str | None = None,
        create: bool = False,
        encrypted: bool = False,
        config_hash: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.lake = lake.with_keys(keys)
        self.keys = keys
        self.create = create
        self.encrypted = encrypted
        self.manifest = RunManifest(
            run_id=new_run_id(),
            command=command,
            started_at=datetime.now(UTC).isoformat(timespec="microseconds"),
            config_hash=config_hash,
            config=config,
            versions=library_versions(),
        )
        self.audit = AuditLog(lake, keys, witness=witness)
        self._t0 = 0.0

    @property
    def run_id(self) -> str:
        """This run's id."""
        return self.manifest.run_id

    @property
    def path(self) -> Path:
        """Where the manifest is written."""
        return self.lake.runs / f"{self.run_id}.json"

    def stage(self, name: str, counts: StageCounts) -> None:
        """Record a finished stage's counts and the research tables' versions (and write the
        manifest so far)."""
        self.manifest.stages[name] = counts
        self._record_versions()
        self._write()

    def table_version(self, table: str, version: int) -> None:
        """Record that this run left research table ``table`` at ``version`` (the recorder
        also records every table's latest version after each stage and at the end; a later
        version of the same table wins)."""
        have = self.manifest.table_versions.get(table)
        if have is None or version > have:
            self.manifest.table_versions[table] = int(version)

    def _record_versions(self) -> None:
        for table, version in table_versions(self.lake).items():
            self.table_version(table, version)

    def restricted_stage(self, name: str, counts: StageCounts, **extra: Any) -> None:
        """:meth:`stage` for a stage that read the restricted zone, with its read in the audit
        log (counts only, never values)."""
        self.stage(name, counts)
        self.audit.append(
            "restricted_read",
            run_id=self.run_id,
            stage=name,
            objects=counts.seen,
            quarantined=counts.quarantined,
            **extra,
        )

    def _write(self) -> None:
        from pipeline.dicom.atomic import atomic_write_text  # pydicom: not at import

        atomic_write_text(self.path, self.manifest.to_json())

    def cancel_now(self, signal_name: str) -> None:
        """Mark the manifest ``cancelled`` at once (a second signal: the process exits right
        after, without unwinding); the audit log gets its ``run_finished`` record."""
        m = self.manifest
        m.status = "cancelled"
        m.error = f"{signal_name} (twice: stopped at once)"
        m.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
        m.seconds = round(time.perf_counter() - self._t0, 3)
        record = self.audit.append(
            "run_finished", run_id=self.run_id, status=m.status, seconds=m.seconds
        )
        m.audit_head = {"seq": record["seq"], "mac": record["mac"]}
        self._write()

    def __enter__(self) -> RunRecorder:
        identity = open_lake(self.lake, self.keys, create=self.create, encrypted=self.encrypted)
        self.lake.create()
        self.manifest.lake_id = identity.lake_id
        self.manifest.key_fingerprint = identity.key_fingerprint
        self._t0 = time.perf_counter()
        self._write()
        self.audit.append(
            "run_started",
            run_id=self.run_id,
            command=self.manifest.command,
            config_hash=self.manifest.config_hash,
        )
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.lake.encrypted_at_rest:  # the DIMSE cache holds originals: none left at rest
            shutil.rmtree(self.lake.restricted / "cache", ignore_errors=True)
        m = self.manifest
        m.seconds = round(time.perf_counter() - self._t0, 3)
        m.finished_at = datetime.now(UTC).isoformat(timespec="seconds")
        if isinstance(exc, Cancelled):
            m.status = "cancelled"
            m.error = exc.signal_name
        elif exc is not None:
            m.status = "failed"
            m.error = type(exc).__name__
        elif not all(c.reconciles for c in m.stages.values()):
            m.status = "unreconciled"
        else:
            m.status = "succeeded"
        record = self.audit.append(
            "run_finished",
            run_id=self.run_id,
            status=m.status,
            seconds=m.seconds,
            counts={
                k: f"{v.seen}/{v.out}/{v.quarantined}/{v.skipped}" for k, v in m.stages.items()
            },
        )
        m.audit_head = {"seq": record["seq"], "mac": record["mac"]}
        try:
            self._record_versions()
        except Exception:
            if exc is None:
                raise
            # the run failed already: its error, not a second one, is what the caller sees
            logger.warning("run %s: research table versions not recorded", self.run_id)
        self._write()


def mark_abandoned(lake: LakePaths, audit: AuditLog | None = None) -> list[str]:
    """Mark every manifest still ``running`` as ``abandoned``; return their run ids.

    Only call it holding the lake's lock (:func:`pipeline.lake.lock.lake_lock`): then no
    other run is alive, and a ``running`` manifest is one whose process died (kill -9, a
    power cut, an out-of-memory kill). Each gets an ``run_abandoned`` audit record.
    """
    from pipeline.dicom.atomic import atomic_write_text  # pydicom: not at import

    marked = []
    for m in list_manifests(lake):
        if m.status != "running":
            continue
        m.status = "abandoned"
        m.error = "the process ended without finishing the run (killed or crashed)"
        atomic_write_text(lake.runs / f"{m.run_id}.json", m.to_json())
        if audit is not None:
            audit.append("run_abandoned", run_id=m.run_id, command=m.command)
        marked.append(m.run_id)
    return marked


def list_manifests(lake: LakePaths) -> list[RunManifest]:
    """Every run manifest of the lake, oldest first (by start time: run ids sort by the second
    only, and two runs may start in one second)."""
    if not lake.runs.is_dir():
        return []
    manifests = [RunManifest.from_file(p) for p in lake.runs.glob("*.json")]
    return sorted(manifests, key=_start_order)


def _start_order(manifest: RunManifest) -> tuple[datetime, str]:
    try:
        started = datetime.fromisoformat(manifest.started_at)
    except (TypeError, ValueError):
        started = datetime.min.replace(tzinfo=UTC)
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return started, manifest.run_id


def _manifest_of(lake: LakePaths, run: str) -> Path:
    from pipeline.errors import LakeError

    if not run or "/" in run or run.startswith("."):
        raise LakeError(f"no run {run!r} in this lake")
    matches = sorted(lake.runs.glob(f"{run}*.json")) if lake.runs.is_dir() else []
    exact = [p for p in matches if p.stem == run]
    if exact:
        matches = exact
    if not matches:
        raise LakeError(f"no run {run!r} in this lake (see `pacsflow status` for its runs)")
    if len(matches) > 1:
        raise LakeError(f"{run!r} names {len(matches)} runs: give more of the run id")
    return matches[0]


def resolve_run(lake: LakePaths, run: str) -> str:
    """The id of the run ``run`` names: a run id, or a prefix of exactly one.

    Raises
    ------
    LakeError
        No run, or several.
    """
    return _manifest_of(lake, run).stem


def versions_of_run(lake: LakePaths, run: str) -> tuple[str, dict[str, int]]:
    """The research table versions a run recorded: ``(run id, {table: version})``.

    ``run`` is a run id or a prefix of exactly one.

    Raises
    ------
    LakeError
        No run, several runs, or a run that recorded no table version (a run from before
        versioned tables, or one that wrote none).
    """
    from pipeline.errors import LakeError

    manifest = RunManifest.from_file(_manifest_of(lake, run))
    if not manifest.table_versions:
        raise LakeError(f"run {manifest.run_id} recorded no research table versions")
    return manifest.run_id, dict(manifest.table_versions)


def pinned_versions(lake: LakePaths) -> dict[str, set[int]]:
    """Every research table version a kept run manifest records (``{table: versions}``): what
    ``pacsflow vacuum`` must keep readable."""
    out: dict[str, set[int]] = {}
    for manifest in list_manifests(lake):
        for table, version in manifest.table_versions.items():
            out.setdefault(table, set()).add(int(version))
    return out
