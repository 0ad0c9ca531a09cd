"""The append-only, keyed, hash-chained audit log under ``restricted/audit/``.

Each record is one JSON line: ``seq``, ``time``, ``event``, ``run_id``, who (``user``: the
person, e.g. a reviewer, else the OS user; ``os_user``, ``host``, ``pid``, ``program``),
``details``, the previous record's MAC (``prev``) and its own ``mac``: HMAC-SHA256 under the
audit key derived from the lake's secret key (:class:`pipeline.lake.keys.LakeKeys`) over the
canonical JSON of every other field. So

- editing, deleting, inserting or reordering a record breaks the chain, and rewriting the whole
  chain needs the key (a shell account on the lake's host is not enough);
- deleting records at the end (truncation) or rolling the log back is caught by the
  **witness**, which keeps the head (lake id, ``seq``, ``mac``) outside the lake after every
  append: by default syslog (journald where it runs, facility authpriv, tag
  ``pacsflow-audit``) and a file in the user's state folder, which :func:`verify_chain` reads
  back; ``audit.witness`` names another file (best append-only or on another host);
- each record is written with one ``write`` on an ``O_APPEND`` descriptor under ``flock`` and
  fsynced, so a crash or a full disk can only leave the *last* line short. Such a line (no
  newline at the end) is reported as **torn**, not as tampering; appends refuse until
  :func:`repair_torn` (``pacsflow audit repair``) cuts it (kept aside for forensics, or completed
  when it is a whole record) and records the repair itself.

Records carry no PHI: ``details`` holds counts, stage names, pseudonyms, archive-relative
locations and hashes. Keys that name identifying attributes are refused outright.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import hmac
import json
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import LakeError

if TYPE_CHECKING:
    from pipeline.lake.keys import LakeKeys
    from pipeline.lake.paths import LakePaths

__all__ = [
    "GENESIS",
    "AuditLog",
    "ChainCheck",
    "RepairResult",
    "Witness",
    "actor",
    "default_witness_file",
    "read_records",
    "repair_torn",
    "verify_chain",
]

GENESIS = "0" * 64
_LOG_NAME = "audit.jsonl"
_SYSLOG_TAG = "pacsflow-audit"
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
        "address_of_patient",
    )
)
_Scalar = str | int | float | bool | None


def _canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(key: bytes, record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()


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


def actor() -> dict[str, Any]:
    """Who is acting, as the OS sees it: OS user, host, process id and program."""
    try:
        os_user = getpass.getuser()
    except (KeyError, OSError):
        os_user = str(os.geteuid())
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return {
        "os_user": os_user,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "program": program,
    }


class Witness:
    """Keeps the audit chain's head outside the lake.

    Parameters
    ----------
    spec:
        ``"default"``: syslog and the file :func:`default_witness_file` (the user's state
        folder, read back by ``status``); ``"syslog"``; ``"none"``; or a file path (one line
        per append: ``<lake id> <seq> <mac> <time>``; created with mode 0600).
    """

    def __init__(self, spec: str | Path | None = "default") -> None:
        text = str(spec) if spec is not None else "default"
        self.spec = text
        self.syslog = text in ("default", "syslog")
        self.path: Path | None
        if text == "default":
            self.path = default_witness_file()
        elif text in ("syslog", "none"):
            self.path = None
        else:
            self.path = Path(text).expanduser()

    def __repr__(self) -> str:
        return f"Witness({self.spec!r})"

    def record(self, lake_id: str, seq: int, mac: str, time: str) -> None:
        """Keep one head (best effort for syslog; a file witness that cannot be written fails)."""
        if self.syslog:
            import syslog

            syslog.openlog(_SYSLOG_TAG, 0, syslog.LOG_AUTHPRIV)
            syslog.syslog(syslog.LOG_INFO, f"lake={lake_id} seq={seq} mac={mac}")
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{lake_id} {seq} {mac} {time}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def last(self, lake_id: str) -> tuple[int, str] | None:
        """The newest head this witness kept for ``lake_id`` (file witnesses only)."""
        if self.path is None or not self.path.exists():
            return None
        head: tuple[int, str] | None = None
        with open(self.path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[0] == lake_id and parts[1].isdigit():
                    seq = int(parts[1])
                    if head is None or seq >= head[0]:
                        head = (seq, parts[2])
        return head


@dataclass(frozen=True)
class ChainCheck:
    """Outcome of :func:`verify_chain`.

    ``ok``: intact (or absent); ``records``: records read; ``reason``: the first problem;
    ``torn``: the only problem is a torn last line (repairable, not tampering); ``keyed``: the
    MACs were checked (a key was given); ``witnessed``: the witness's head was found in the log.
    """

    ok: bool
    records: int
    reason: str = ""
    torn: bool = False
    keyed: bool = False
    witnessed: bool = False
    head: tuple[int, str] | None = None


def default_witness_file() -> Path:
    """``$XDG_STATE_HOME/pacsflow/audit-witness.log`` (``~/.local/state/...`` by default):
    outside every lake, so a lake's copy or a rollback of it does not carry it along."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "pacsflow" / "audit-witness.log"


def _lake_id(lake: LakePaths) -> str:
    from pipeline.lake.identity import read_marker

    identity = read_marker(lake)
    if identity is None:
        raise LakeError(f"{lake.root} has no lake marker: no audit log can be kept for it")
    return identity.lake_id


class AuditLog:
    """Appends records to a lake's audit log.

    Parameters
    ----------
    lake:
        The lake whose ``restricted/audit/audit.jsonl`` to append to (it must have a marker).
    keys:
        The lake's keys (the audit MAC key signs every record).
    witness:
        Where the head is kept outside the lake (see :class:`Witness`).
    """

    def __init__(
        self, lake: LakePaths, keys: LakeKeys, *, witness: Witness | str | None = None
    ) -> None:
        self.lake = lake
        self.path = lake.audit / _LOG_NAME
        self._key = keys.audit_key
        self.witness = witness if isinstance(witness, Witness) else Witness(witness)
        self._actor = actor()

    def append(
        self, event: str, *, run_id: str | None = None, user: str | None = None, **details: Any
    ) -> dict[str, Any]:
        """Append one record and return it (with its ``seq`` and ``mac``).

        ``user`` is the person acting when pacsflow knows one (a reviewer); else the OS user.

        Raises
        ------
        ValueError
            When ``details`` holds a forbidden key or a non-JSON-scalar value.
        LakeError
            When the log's last line is torn (run ``pacsflow audit repair``) or damaged, or
            the record cannot be written (a full disk: it may be left torn).
        """
        if not event or not isinstance(event, str):
            raise ValueError("audit event must be a non-empty string")
        _check_details(details)
        lake_id = _lake_id(self.lake)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            prev, seq = _tail(fd)
            record: dict[str, Any] = {
                "seq": seq,
                "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                "event": event,
                "run_id": run_id,
                "user": user or self._actor["os_user"],
                **self._actor,
                "details": details,
                "prev": prev,
            }
            record["mac"] = _mac(self._key, record)
            try:
                _write_all(fd, _canonical(record) + b"\n")
                os.fsync(fd)
            except OSError as exc:
                raise LakeError(
                    f"cannot write the audit log ({exc.strerror}): the action is not recorded; "
                    "free space, then `pacsflow audit repair --lake LAKE` if it reports a torn "
                    "last record"
                ) from exc
        finally:
            os.close(fd)  # closing drops the flock
        self.witness.record(lake_id, record["seq"], record["mac"], record["time"])
        return record

    def records(self) -> list[dict[str, Any]]:
        """All whole records, oldest first (no chain check; see :func:`verify_chain`)."""
        return read_records(self.lake)


def read_records(lake: LakePaths) -> list[dict[str, Any]]:
    """A lake's audit records that parse, oldest first (no key needed, no chain check)."""
    return [r for _, r in _read_lines(lake.audit / _LOG_NAME) if r is not None]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_lines(path: Path) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Each line (with its newline, if any) and its JSON, or None when not valid JSON."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                yield line, json.loads(line)
            except ValueError:
                yield line, None


def _tail(fd: int) -> tuple[str, int]:
    """MAC and next sequence number after the last record of an open log."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS, 0
    block = min(size, 65536)
    while True:
        chunk = os.pread(fd, block, size - block)
        lines = chunk.rstrip(b"\n").split(b"\n")
        if len(lines) > 1 or block == size:
            break
        block = min(size, block * 2)
    if not chunk.endswith(b"\n"):
        raise LakeError(
            "the audit log's last record is torn (a write cut short, e.g. by a full disk): "
            "run `pacsflow audit repair --lake LAKE` (audited)"
        )
    try:
        last = json.loads(lines[-1])
        return str(last["mac"]), int(last["seq"]) + 1
    except (ValueError, KeyError, TypeError) as exc:
        raise LakeError(
            "the audit log's last record is damaged (not a torn write): run "
            "`pacsflow status --lake LAKE` to check the chain"
        ) from exc


def verify_chain(
    lake: LakePaths, keys: LakeKeys | None = None, *, witness: Witness | None = None
) -> ChainCheck:
    """Check every record's link, sequence and (with ``keys``) MAC, and the witness's head.

    Returns
    -------
    ChainCheck
        ``ok`` is True for an intact (or absent) log whose end matches the witness.
    """
    path = lake.audit / _LOG_NAME
    key = keys.audit_key if keys is not None else None
    prev = GENESIS
    n = 0
    lines = list(_read_lines(path))
    seen: dict[int, str] = {}
    for i, (raw, record) in enumerate(lines, start=1):
        last = i == len(lines)
        if last and not raw.endswith(b"\n"):
            return ChainCheck(
                False,
                n,
                f"line {i}: the last record is torn (a write cut short): "
                "run `pacsflow audit repair`",
                torn=True,
                keyed=key is not None,
            )
        if record is None:
            return ChainCheck(False, n, f"line {i}: not valid JSON (damaged or edited)")
        if record.get("seq") != n:
            return ChainCheck(False, n, f"line {i}: sequence {record.get('seq')} != {n}")
        if record.get("prev") != prev:
            return ChainCheck(False, n, f"line {i}: link to the previous record broken")
        if "mac" not in record:
            return ChainCheck(False, n, f"line {i}: no MAC (not written by this pacsflow)")
        if key is not None and not hmac.compare_digest(str(record["mac"]), _mac(key, record)):
            return ChainCheck(False, n, f"line {i}: MAC mismatch (edited or rewritten)")
        prev = str(record["mac"])
        seen[n] = prev
        n += 1
    head = (n - 1, prev) if n else None
    witnessed = False
    if witness is not None and witness.path is not None:
        try:
            kept = witness.last(_lake_id(lake))
        except LakeError:
            kept = None
        if kept is not None:
            seq, mac = kept
            if seen.get(seq) != mac:
                what = "truncated" if seq >= n else "rewritten"
                return ChainCheck(
                    False,
                    n,
                    f"the witness ({witness.spec}) holds record {seq}, which the log "
                    f"{'lacks' if seq >= n else 'holds with another MAC'}: {what}",
                    keyed=key is not None,
                    head=head,
                )
            witnessed = True
    return ChainCheck(True, n, keyed=key is not None, witnessed=witnessed, head=head)


@dataclass(frozen=True)
class RepairResult:
    """What :func:`repair_torn` did: bytes cut (0 when the torn line was a whole record and
    only its newline was missing), where they were kept, and the repair's own record."""

    removed_bytes: int
    kept_at: Path | None
    record: dict[str, Any]


def repair_torn(
    lake: LakePaths,
    keys: LakeKeys,
    *,
    witness: Witness | str | None = None,
    user: str | None = None,
) -> RepairResult:
    """Repair a torn last record, then append an ``audit_repaired`` record.

    Everything before the torn line must verify with ``keys``; the torn bytes are moved to
    ``restricted/audit/torn-<time>.bin`` (mode 0600). A torn line that is a whole record with a
    valid MAC only lacked its newline, and is kept.

    Raises
    ------
    LakeError
        When the log is not torn, or is broken elsewhere (that is not a torn write).
    """
    check = verify_chain(lake, keys)
    if not check.torn:
        raise LakeError(
            "the audit log is not torn: nothing to repair"
            if check.ok
            else f"the audit log is broken, not torn ({check.reason}): not repairable"
        )
    path = lake.audit / _LOG_NAME
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
        cut = data.rfind(b"\n") + 1
        start = size - len(data) + cut
        torn = data[cut:]
        whole = False
        try:
            rec = json.loads(torn)
            whole = (
                isinstance(rec, dict)
                and rec.get("seq") == check.records
                and hmac.compare_digest(str(rec.get("mac")), _mac(keys.audit_key, rec))
            )
        except ValueError:
            pass
        kept_at: Path | None = None
        if whole:
            _write_all(fd, b"\n")
            removed = 0
        else:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            kept_at = lake.audit / f"torn-{stamp}.bin"
            kfd = os.open(kept_at, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(kfd, torn)
                os.fsync(kfd)
            finally:
                os.close(kfd)
            os.ftruncate(fd, start)
            removed = len(torn)
        os.fsync(fd)
    finally:
        os.close(fd)
    record = AuditLog(lake, keys, witness=witness).append(
        "audit_repaired",
        user=user,
        removed_bytes=removed,
        removed_sha256=hashlib.sha256(b"" if whole else torn).hexdigest(),
        completed_whole_record=whole,
    )
    return RepairResult(removed, kept_at, record)
