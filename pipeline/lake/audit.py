"""The append-only, hash-chained audit log under ``restricted/audit/``.

Each record is one JSON line holding ``seq``, ``time``, ``event``, ``run_id``, ``details``, the
SHA-256 of the previous record (``prev``) and its own SHA-256 (``hash``, over the canonical JSON
of every other field). Editing, deleting or reordering any record breaks the chain, which
:func:`verify_chain` (and ``pacsflow status``) detects. Appends take an exclusive ``flock`` so
several processes on one host can write safely.

Records carry no PHI: ``details`` holds counts, stage names, pseudonyms, archive-relative
locations and hashes. Keys that name identifying attributes are refused outright.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import LakeError
from pipeline.lake.paths import LakePaths

__all__ = ["GENESIS", "AuditLog", "ChainCheck", "verify_chain"]

GENESIS = "0" * 64
_LOG_NAME = "audit.jsonl"
_FORBIDDEN_KEYS = frozenset(
    k.lower()
    for k in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientAddress",
        "OtherPatientIDs",
        "AccessionNumber",
        "ReferringPhysicianName",
        "name",
        "birth_date",
        "address",
    )
)
_Scalar = str | int | float | bool | None


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _check_details(details: Mapping[str, Any], path: str = "details") -> None:
    for key, value in details.items():
        if key.lower() in _FORBIDDEN_KEYS:
            raise ValueError(
                f"audit {path}.{key}: identifying attributes never enter the audit log"
            )
        if isinstance(value, Mapping):
            _check_details(value, f"{path}.{key}")
        elif isinstance(value, list | tuple):
            if not all(isinstance(v, _Scalar) for v in value):
                raise ValueError(f"audit {path}.{key}: lists hold scalars only")
        elif not isinstance(value, _Scalar):
            raise ValueError(f"audit {path}.{key}: unsupported type {type(value).__name__}")


@dataclass(frozen=True)
class ChainCheck:
    """Outcome of :func:`verify_chain`: ``ok``, the number of records and the first problem."""

    ok: bool
    records: int
    reason: str = ""


class AuditLog:
    """Appends records to a lake's audit log.

    Parameters
    ----------
    lake:
        The lake whose ``restricted/audit/audit.jsonl`` to append to.
    """

    def __init__(self, lake: LakePaths) -> None:
        self.path = lake.audit / _LOG_NAME

    def append(self, event: str, *, run_id: str | None = None, **details: Any) -> dict[str, Any]:
        """Append one record and return it (with its ``seq`` and ``hash``).

        Raises
        ------
        ValueError
            When ``details`` holds a forbidden key or a non-JSON-scalar value.
        LakeError
            When the last record of the log is not valid JSON (the log was damaged).
        """
        if not event or not isinstance(event, str):
            raise ValueError("audit event must be a non-empty string")
        _check_details(details)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                prev, seq = _tail(fh)
                record: dict[str, Any] = {
                    "seq": seq,
                    "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "event": event,
                    "run_id": run_id,
                    "details": details,
                    "prev": prev,
                }
                record["hash"] = _digest(record)
                fh.seek(0, os.SEEK_END)
                fh.write(_canonical(record) + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return record

    def records(self) -> list[dict[str, Any]]:
        """All records, oldest first (no chain check; see :func:`verify_chain`)."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            return [json.loads(line) for line in fh if line.strip()]


def _tail(fh: Any) -> tuple[str, int]:
    """Hash and next sequence number after the last record of an open log."""
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    if size == 0:
        return GENESIS, 0
    block = min(size, 65536)
    while True:
        fh.seek(size - block)
        chunk = fh.read(block)
        lines = chunk.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or block == size:
            break
        block = min(size, block * 2)
    try:
        last = json.loads(lines[-1])
        return str(last["hash"]), int(last["seq"]) + 1
    except (ValueError, KeyError) as exc:
        raise LakeError(
            "the last audit record is damaged; run `pacsflow status --lake LAKE` to check the chain"
        ) from exc


def verify_chain(lake: LakePaths) -> ChainCheck:
    """Check every record's hash and link; return the first break found.

    Returns
    -------
    ChainCheck
        ``ok`` is True for an intact (or absent) log.
    """
    path = lake.audit / _LOG_NAME
    if not path.exists():
        return ChainCheck(True, 0)
    prev = GENESIS
    n = 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                return ChainCheck(False, n, f"line {lineno}: not valid JSON")
            if record.get("seq") != n:
                return ChainCheck(False, n, f"line {lineno}: sequence {record.get('seq')} != {n}")
            if record.get("prev") != prev:
                return ChainCheck(False, n, f"line {lineno}: link to previous record broken")
            if record.get("hash") != _digest(record):
                return ChainCheck(False, n, f"line {lineno}: record hash mismatch (edited)")
            prev = record["hash"]
            n += 1
    return ChainCheck(True, n)
