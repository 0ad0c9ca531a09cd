"""The FHIR stage: written-back results -> FHIR R4 transaction Bundles -> a folder or a server.

Per written-back result (:func:`pipeline.fhir.export.written_back_results`):

1. **Build** the Bundle (:func:`pipeline.fhir.bundle.build_bundle`: every resource validated,
   ids deterministic) and keep it in ``restricted/fhir/bundles/<bundle id>.json`` (sealed when
   the lake is encrypted at rest: it holds identifiers);
2. **Skip** it when the latest ``fhir_outbox`` row of that Bundle at that destination is
   ``confirmed`` with the same content hash (a changed Bundle, e.g. a report turned final by a
   review decision, is sent again: its ids are the same, so the server updates);
3. **Deliver**: a folder gets ``<bundle id>.json`` (atomically; sealed when the folder lies in
   the lake's restricted zone of a lake encrypted at rest); a server gets ``POST [base]`` of the
   transaction, retried with backoff;
4. **Confirm**: the folder's file is read back and hashed; the server is asked for every
   resource again (``GET [type]/[id]``), and the DiagnosticReport's status must be the one sent;
5. every status change is a row of ``restricted/fhir_outbox`` (latest wins). Rows are
   flushed after each Bundle, so a killed export keeps what it confirmed; a rerun sends the
   rest, and a Bundle sent but not yet recorded is sent again, which changes nothing on the
   server (PUT of the same ids): each result is delivered once.

An authentication failure (401/403) or a server out of reach after the retries stops the
stage with one line; the Bundles not confirmed stay pending for the next run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pipeline.compute import set_total
from pipeline.config import PipelineConfig
from pipeline.enums import Zone
from pipeline.errors import FhirError
from pipeline.fhir.bundle import BuiltBundle, build_bundle
from pipeline.fhir.client import FhirClient, is_server
from pipeline.fhir.export import written_back_results
from pipeline.lake import LakePaths, StageCounts, atomic_write_bytes, read_table, write_partition
from pipeline.lake.crypto import FileCipher

logger = logging.getLogger(__name__)

__all__ = ["FhirRunResult", "default_dest", "public_dest", "run"]

Progress = Callable[[int], None]
BUNDLES: Final = Path("fhir") / "bundles"


@dataclass
class FhirRunResult:
    """What one FHIR export did, in numbers; ``error``: the line that stopped it."""

    run_id: str
    dest: str
    counts: StageCounts
    pending: list[str] = field(default_factory=list)  # bundle ids not confirmed
    error: str | None = None


def default_dest(lake: LakePaths) -> Path:
    """The embedded default destination: ``restricted/fhir/outbox/`` of the lake."""
    return lake.restricted / "fhir" / "outbox"


def public_dest(dest: str) -> str:
    """The destination as recorded: no credentials, no query."""
    return re.sub(r"//[^/@]*@", "//", dest).split("?", 1)[0] if is_server(dest) else dest


def _client(cfg: PipelineConfig, dest: str) -> FhirClient:
    verify = cfg.fhir.verify_tls
    return FhirClient.from_env(
        dest,
        token_env=cfg.fhir.token_env,
        section="fhir",
        verify=str(verify) if isinstance(verify, Path) else verify,
        timeout_s=cfg.fhir.timeout_s,
        retries=cfg.fhir.retries,
        backoff_s=cfg.fhir.backoff_s,
        backoff_max_s=cfg.fhir.backoff_max_s,
    )


def _folder_cipher(lake: LakePaths, folder: Path) -> FileCipher | None:
    """The cipher of Bundles written into ``folder``: the lake's file cipher when the folder
    is inside an encrypted restricted zone, else None (a folder outside the lake is the
    user's choice of a clear export)."""
    folder.mkdir(parents=True, exist_ok=True)
    if lake.zone_of(folder) is Zone.RESTRICTED:
        return lake.file_cipher()
    return None


def _confirmed(lake: LakePaths, dest: str) -> dict[str, dict[str, Any]]:
    """bundle id -> its latest outbox row at ``dest``."""
    latest: dict[str, dict[str, Any]] = {}
    for row in read_table(lake, "fhir_outbox").to_pylist():
        if row["dest"] != dest:
            continue
        have = latest.get(row["bundle_id"])
        if have is None or row["updated_at"] >= have["updated_at"]:
            latest[row["bundle_id"]] = row
    return latest


def _confirm_server(client: FhirClient, built: BuiltBundle) -> str | None:
    """None when the server holds every resource of ``built`` (the report with the status
    sent); else what is missing."""
    for rtype, rid in built.resources:
        got = client.read(rtype, rid)
        if got is None:
            return f"{rtype} not found when read back"
        if rtype == "DiagnosticReport" and got.get("status") != built.report_status:
            return f"DiagnosticReport read back with status {got.get('status')!r}"
    return None


def run(
    cfg: PipelineConfig,
    lake: LakePaths,
    *,
    run_id: str,
    dest: str | None = None,
    progress: Progress | None = None,
    audit: Callable[..., None] | None = None,
) -> FhirRunResult:
    """Export every written-back result of ``lake`` to ``dest`` (default ``fhir.dest``, else
    :func:`default_dest`).

    Raises
    ------
    ConfigError
        A malformed server URL, an unset token variable, a malformed registry.
    """
    t0 = time.perf_counter()
    target = dest or cfg.fhir.dest or str(default_dest(lake))
    server = is_server(target)
    public = public_dest(target)
    client = _client(cfg, target) if server else None
    folder = None if server else Path(target)
    folder_cipher = _folder_cipher(lake, folder) if folder is not None else None
    files = lake.file_cipher()
    results = written_back_results(lake, registry=cfg.infer.registry)
    if audit is not None:
        audit(objects=results.reidentified, results=len(results.records))
    latest = _confirmed(lake, public)
    set_total(progress, len(results.records))
    counts = {"results": 0, "built": 0, "sent": 0, "confirmed": 0, "skipped": 0, "failed": 0}
    counts["unsupported"] = results.unsupported
    counts["incomplete"] = results.incomplete
    finals = 0
    pending: list[str] = []
    error: str | None = None
    rows: list[dict[str, Any]] = []
    flushed = 0

    def row(built: BuiltBundle, key: str, status: str, detail: str | None, attempts: int) -> None:
        rows.append(
            {
                "bundle_id": built.bundle_id,
                "result_key": key,
                "dest": public,
                "status": status,
                "detail": detail,
                "attempts": attempts,
                "report_status": built.report_status,
                "bundle_sha256": built.sha256,
                "n_resources": len(built.resources),
                "path": str(BUNDLES / f"{built.bundle_id}.json"),
                "run_id": run_id,
                "updated_at": dt.datetime.now(dt.UTC),
            }
        )

    def flush() -> None:
        nonlocal flushed
        if rows:
            flushed += 1
            write_partition(lake, "fhir_outbox", rows, part=f"{run_id}-{flushed:06d}")
            rows.clear()

    try:
        for record in results.records:
            counts["results"] += 1
            if progress:
                progress(1)
            built = build_bundle(record, patient_system=cfg.fhir.patient_identifier_system)
            finals += built.report_status == "final"
            have = latest.get(built.bundle_id)
            if have and have["status"] == "confirmed" and have["bundle_sha256"] == built.sha256:
                counts["skipped"] += 1
                continue
            if error is not None:  # the server is refusing or away: left pending
                pending.append(built.bundle_id)
                continue
            data = built.json_text.encode("utf-8")
            name = f"{built.bundle_id}.json"
            atomic_write_bytes(
                lake.restricted / BUNDLES / name,
                files.encrypt(data, name) if files is not None else data,
            )
            counts["built"] += 1
            row(built, record.result_key, "built", None, 0)
            if folder is not None:
                out = folder / name
                atomic_write_bytes(
                    out, folder_cipher.encrypt(data, name) if folder_cipher is not None else data
                )
                counts["sent"] += 1
                back = out.read_bytes()
                if folder_cipher is not None:
                    back = folder_cipher.decrypt(back, name)
                if hashlib.sha256(back).hexdigest() == built.sha256:
                    counts["confirmed"] += 1
                    row(built, record.result_key, "confirmed", None, 1)
                else:
                    counts["failed"] += 1
                    pending.append(built.bundle_id)
                    row(built, record.result_key, "failed", "read back differs", 1)
                flush()
                continue
            assert client is not None
            try:
                client.transaction(built.json_text)
            except FhirError as exc:
                counts["failed"] += 1
                pending.append(built.bundle_id)
                row(built, record.result_key, "failed" if exc.transient else "refused", str(exc), 1)
                logger.warning("fhir: bundle of %s not delivered: %s", record.result_key, exc)
                if exc.transient or exc.status in (401, 403):
                    error = str(exc)  # the others would fail alike: stop, keep them pending
                flush()
                continue
            counts["sent"] += 1
            row(built, record.result_key, "sent", None, 1)
            try:
                missing = _confirm_server(client, built) if cfg.fhir.confirm else None
            except FhirError as exc:
                missing = f"not read back: {exc}"
                error = str(exc) if exc.transient or exc.status in (401, 403) else None
            if missing is None:
                counts["confirmed"] += 1
                row(built, record.result_key, "confirmed", None, 1)
            else:
                counts["failed"] += 1
                pending.append(built.bundle_id)
                row(built, record.result_key, "failed", missing, 1)
            flush()
    finally:
        flush()
        if client is not None:
            client.close()
    seconds = round(time.perf_counter() - t0, 3)
    n = counts["results"]
    stage_counts = StageCounts(
        seen=n,
        out=counts["confirmed"],
        quarantined=n - counts["confirmed"] - counts["skipped"],
        skipped=counts["skipped"],
        seconds=seconds,
        extra={**counts, "final_reports": finals, "pending": len(pending)},
    )
    logger.info(
        "fhir: %d results, %d bundles confirmed at %s, %d unchanged, %d pending, %.1f s",
        n,
        counts["confirmed"],
        "the server" if server else "the folder",
        counts["skipped"],
        len(pending),
        seconds,
    )
    return FhirRunResult(run_id, public, stage_counts, pending, error)
