"""Trust by pin, not by flag: which bundles may run their configs' code.

A bundle's config is code (``$`` expressions, any ``_target_``, its ``scripts/``). pacsflow runs
that code only when both hold:

1. the model registry **pins** the bundle's content hash (``bundle_sha256:`` in its entry;
   :func:`pipeline.infer.bundle_config.content_hash`, over ``configs/`` and ``scripts/``), and
2. a person **approved** that hash once on this machine (``pacsflow models trust PATH``),
   recorded in the trust store (``$XDG_DATA_HOME/pacsflow/trusted-bundles.json``, or
   ``infer.trust_store``), with who and when.

Anything else (no pin, a pin that no longer matches the files, a hash nobody approved) runs in
allow-list mode (:mod:`pipeline.infer.bundle_config`), which evaluates no code, or fails
saying which of the two is missing. Editing one byte of a config or script changes the hash,
so a changed bundle drops back to allow-list mode until it is approved again.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.dicom.atomic import atomic_write_bytes
from pipeline.infer.bundle_config import content_hash

__all__ = ["TrustDecision", "TrustStore", "decide", "default_trust_store"]


def default_trust_store() -> Path:
    """``$XDG_DATA_HOME/pacsflow/trusted-bundles.json`` (``~/.local/share/...`` by default)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pacsflow" / "trusted-bundles.json"


class TrustStore:
    """The approved content hashes of this machine (a small JSON file, written atomically)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_trust_store()

    def _read(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"approved": {}}
        except (OSError, ValueError) as exc:
            from pipeline.errors import ConfigError

            raise ConfigError(
                f"trust store {self.path} cannot be read ({type(exc).__name__})"
            ) from None
        if not isinstance(raw, dict) or not isinstance(raw.get("approved"), dict):
            from pipeline.errors import ConfigError

            raise ConfigError(f"trust store {self.path} is not a pacsflow trust store")
        return raw

    def approved(self, digest: str) -> dict[str, Any] | None:
        """The approval record of ``digest`` (who, when, which bundle), or None."""
        record = self._read()["approved"].get(digest)
        return record if isinstance(record, dict) else None

    def approve(self, digest: str, name: str, path: Path) -> dict[str, Any]:
        """Record ``digest`` as approved by the current user; returns the record."""
        data = self._read()
        record = {
            "bundle": name,
            "path": str(path),
            "approved_by": getpass.getuser(),
            "approved_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        data["approved"][digest] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        return record

    def revoke(self, digest: str) -> bool:
        """Forget an approval; False when there was none."""
        data = self._read()
        if data["approved"].pop(digest, None) is None:
            return False
        atomic_write_bytes(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        return True


@dataclass(frozen=True)
class TrustDecision:
    """How a bundle will run, and why."""

    mode: Literal["allow-list", "trusted"]
    digest: str
    reason: str


def decide(path: Path, pinned: str | None, store: TrustStore) -> TrustDecision:
    """Trusted when ``pinned`` (the registry's ``bundle_sha256``) equals the bundle's content
    hash and the store holds an approval of it; allow-list otherwise, saying why."""
    digest = content_hash(path)
    if pinned is None:
        return TrustDecision("allow-list", digest, "the registry pins no bundle_sha256")
    if pinned != digest:
        return TrustDecision(
            "allow-list",
            digest,
            f"the bundle changed since it was pinned (pinned {pinned[:19]}..., now "
            f"{digest[:19]}...)",
        )
    record = store.approved(digest)
    if record is None:
        return TrustDecision(
            "allow-list",
            digest,
            f"pinned but not approved on this machine (`pacsflow models trust {path}`)",
        )
    return TrustDecision(
        "trusted",
        digest,
        f"pinned and approved by {record.get('approved_by')} at {record.get('approved_at')}",
    )
