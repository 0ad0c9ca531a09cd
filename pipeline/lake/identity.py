"""A lake knows it is a lake, and which key it belongs to: the marker ``pacsflow-lake.json``.

The first command that creates a lake (``pacsflow init``, the first crawl, ``run`` or ``demo``)
writes the marker: the lake format version, a random lake id, when and by which version it was
made, the fingerprint of its secret key (:attr:`pipeline.lake.keys.LakeKeys.fingerprint`,
never the key), and whether it is encrypted at rest (chosen at creation, for good). Every
later command opens the lake through :func:`open_lake`, which refuses

- a folder without the marker (a typo in ``--lake``, an unrelated folder, a lake made before
  format 1), so nothing is created in it and no check passes on it by accident;
- a lake of a newer format than this pacsflow reads;
- a key whose fingerprint is not the lake's: one key per lake, so a patient never gets a second
  token and write-back never makes a second copy of a result under new UIDs.

The marker holds nothing secret (mode 0644); the lake id names the lake to the audit witness.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline._version import __version__
from pipeline.errors import ConfigError, LakeError

if TYPE_CHECKING:
    from pipeline.lake.keys import LakeKeys
    from pipeline.lake.paths import LakePaths

__all__ = ["LAKE_FORMAT", "MARKER", "LakeIdentity", "LakeIdentityError", "open_lake", "read_marker"]

#: The lake format this pacsflow writes and reads. 1: the marker, the key hierarchy (pseudonyms
#: under a derived key) and the keyed audit chain (issue #18).
LAKE_FORMAT = 1
MARKER = "pacsflow-lake.json"


class LakeIdentityError(ConfigError):
    """Not a lake, a lake of a newer format, or a lake of another key (a usage error: exit 2)."""


@dataclass(frozen=True)
class LakeIdentity:
    """The content of a lake's marker."""

    format: int
    lake_id: str
    created_at: str
    created_by: str
    key_fingerprint: str
    #: the restricted zone's identifying columns and files are sealed (``encrypt_at_rest``)
    encrypted_at_rest: bool = False

    def to_json(self) -> str:
        """The marker's text."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def read_marker(lake: LakePaths) -> LakeIdentity | None:
    """The lake's identity, or None when the folder has no marker.

    Raises
    ------
    LakeIdentityError
        When the marker is unreadable or of a newer format.
    """
    path = lake.root / MARKER
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LakeIdentityError(f"{path} is damaged ({type(exc).__name__})") from None
    fmt = data.get("format")
    if not isinstance(fmt, int):
        raise LakeIdentityError(f"{path} is damaged (no format version)")
    if fmt > LAKE_FORMAT:
        raise LakeIdentityError(
            f"{lake.root} is a lake of format {fmt}, newer than this pacsflow reads "
            f"({LAKE_FORMAT}): upgrade pacsflow (it was made by {data.get('created_by')})"
        )
    try:
        return LakeIdentity(
            format=fmt,
            lake_id=str(data["lake_id"]),
            created_at=str(data["created_at"]),
            created_by=str(data["created_by"]),
            key_fingerprint=str(data["key_fingerprint"]),
            encrypted_at_rest=bool(data.get("encrypted_at_rest", False)),
        )
    except KeyError as exc:
        raise LakeIdentityError(f"{path} is damaged (no {exc.args[0]})") from None


def _not_a_lake(lake: LakePaths) -> LakeIdentityError:
    root = lake.root
    if not root.exists():
        return LakeIdentityError(
            f"no lake at {root} (create one with `pacsflow init --lake {root}` or a first crawl)"
        )
    if (root / "restricted").is_dir() or (root / "research").is_dir():
        return LakeIdentityError(
            f"{root} has no lake marker ({MARKER}): a lake made before lake format "
            f"{LAKE_FORMAT}, whose pseudonyms came from the key itself; crawl again into a new lake"
        )
    return LakeIdentityError(f"{root} is not a pacsflow lake (no {MARKER})")


def _create(lake: LakePaths, keys: LakeKeys, encrypted: bool) -> LakeIdentity:
    root = lake.root
    if root.exists() and not root.is_dir():
        raise LakeIdentityError(f"{root} is a file, not a folder for a lake")
    if root.is_dir() and any(p.name != ".pacsflow.lock" for p in root.iterdir()):
        raise (
            _not_a_lake(lake)
            if (root / "restricted").is_dir()
            else LakeIdentityError(
                f"{root} is not empty and not a pacsflow lake: refusing to create a lake in it "
                "(name a new or empty folder)"
            )
        )
    identity = LakeIdentity(
        format=LAKE_FORMAT,
        lake_id=secrets.token_hex(8),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        created_by=f"pacsflow {__version__}",
        key_fingerprint=keys.fingerprint,
        encrypted_at_rest=encrypted,
    )
    lake.create()
    from pipeline.dicom.atomic import atomic_write_text  # pydicom: not at import

    atomic_write_text(root / MARKER, identity.to_json())
    (root / MARKER).chmod(0o644)
    return identity


def open_lake(
    lake: LakePaths, keys: LakeKeys | None, *, create: bool = False, encrypted: bool = False
) -> LakeIdentity:
    """Check that ``lake`` is a lake of this format and of ``keys``; with ``create``, make a
    new lake in a missing or empty folder (``encrypted``: sealed at rest, for good). ``keys``
    None skips the key check (read-only commands that never use the key: ``status``).

    Raises
    ------
    LakeIdentityError
        Not a lake (and not creatable), a newer format, or another key: the message names
        both fingerprints and never the key.
    """
    from pipeline.lake.delta import check_lake_path

    try:
        check_lake_path(lake.root)
    except LakeError as exc:
        raise LakeIdentityError(str(exc)) from None
    identity = read_marker(lake)
    if identity is None:
        if not create or keys is None:
            raise _not_a_lake(lake)
        return _create(lake, keys, encrypted)
    if keys is not None and keys.fingerprint != identity.key_fingerprint:
        raise LakeIdentityError(
            f"wrong key for {lake.root}: the lake belongs to key {identity.key_fingerprint}, "
            f"the key given is {keys.fingerprint} (one key per lake)"
        )
    return identity
