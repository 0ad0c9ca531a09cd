"""The secret key, the keys derived from it, and the keyed, deterministic pseudonyms.

It lives in the lake layer because two stages use it: deid (pseudonyms, date shifts) and
write-back (the UIDs of the objects it creates).

One secret key per lake (``pacsflow keygen``), never stored in the lake. Every key pacsflow uses
is derived from it with HKDF-SHA256 (RFC 5869), one ``info`` label per purpose, so no derived key
reveals the secret or another derived key (:class:`LakeKeys`):

========================  ==========================================  ====================
derived key               info label                                  used for
========================  ==========================================  ====================
pseudonym key (32 B)      ``pacsflow/v1/pseudonyms``                  UIDs, tokens, shifts
encryption key (64 B)     ``pacsflow vault AES-SIV v1``               the vault's originals
column key (64 B)         ``pacsflow/v1/sealed-columns``              sealed columns
file key (32 B)           ``pacsflow/v1/files``                       sealed files
audit MAC key (32 B)      ``pacsflow/v1/audit-mac``                   the audit chain
fingerprint key (32 B)    ``pacsflow/v1/fingerprint``                 the key's fingerprint
========================  ==========================================  ====================

The fingerprint (``pfk1:`` and 20 hex digits of an HMAC of a fixed label under the fingerprint
key) names a key without revealing it: the lake records it when first used, and every command
refuses a key with another fingerprint.

Any worker, on any machine, on any day, maps an identifier the same way with no coordination,
and a different key gives unrelated pseudonyms. The key never appears in logs, manifests or
configs (only the path of its file does).

- a UID becomes ``2.25.<integer of the first 128 bits of HMAC(key, "uid" + uid)>``: a valid
  UID (at most 42 characters, no leading zero in the integer);
- a patient ID (or accession number) becomes a short base32 token;
- each patient gets a date offset (a whole number of days) drawn from the HMAC of the patient
  ID, so intervals within a patient are kept exactly and patients are independent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config.env import key_file_from_env
from pipeline.errors import ConfigError

__all__ = ["KEY_BYTES", "LakeKeys", "Pseudonymizer", "generate_key_file", "load_key"]

KEY_BYTES = 32
_HEADER = "pacsflow-key-v1"
#: Date offsets are drawn from [-_MAX_SHIFT_DAYS, -1]: always into the past, never zero.
_MAX_SHIFT_DAYS = 3650


def generate_key_file(path: Path) -> Path:
    """Write a new random key to ``path`` with mode 0600; refuse to overwrite an existing file.

    Raises
    ------
    ConfigError
        When the file exists (losing a key loses the way back to the originals).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    text = f"{_HEADER}\n{base64.b64encode(key).decode()}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(
            f"key file {path} exists: refusing to overwrite it (the pseudonyms made with it, "
            "and the way back to the originals, depend on it)"
        ) from None
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def load_key(path: Path | None = None) -> bytes:
    """Read the key from ``path``, or from ``PACSFLOW_KEY_FILE``.

    Raises
    ------
    ConfigError
        No key given, the file is missing or malformed, or readable by group or others.
    """
    path = path or key_file_from_env()
    if path is None:
        raise ConfigError(
            "no secret key: pass --key-file or set PACSFLOW_KEY_FILE "
            "(create one with `pacsflow keygen PATH`)"
        )
    path = Path(path)
    try:
        st = path.stat()
        lines = path.read_text(encoding="ascii").split()
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"key file {path} is readable by others: chmod 600 {path}")
    if len(lines) != 2 or lines[0] != _HEADER:
        raise ConfigError(f"{path} is not a pacsflow key file (made by `pacsflow keygen`)")
    try:
        key = base64.b64decode(lines[1], validate=True)
    except ValueError:
        raise ConfigError(f"{path}: the key is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{path}: the key must be {KEY_BYTES} bytes")
    return key


_PSEUDONYM_INFO = b"pacsflow/v1/pseudonyms"
#: kept from the vault's first encryption, so vaults encrypted before the hierarchy still decrypt
_ENCRYPTION_INFO = b"pacsflow vault AES-SIV v1"
_COLUMN_INFO = b"pacsflow/v1/sealed-columns"
_FILE_INFO = b"pacsflow/v1/files"
_AUDIT_INFO = b"pacsflow/v1/audit-mac"
_FINGERPRINT_INFO = b"pacsflow/v1/fingerprint"
_FINGERPRINT_LABEL = b"pacsflow key fingerprint"
FINGERPRINT_PREFIX = "pfk1:"


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class LakeKeys:
    """The key hierarchy of one secret key (see the module docstring). Picklable.

    Examples
    --------
    >>> keys = LakeKeys(b"k" * 32)
    >>> keys.fingerprint.startswith("pfk1:"), len(keys.fingerprint)
    (True, 25)
    >>> keys.pseudonym_key != keys.audit_key != b"k" * 32
    True
    """

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ValueError("the secret key must be at least 16 bytes")

    @property
    def pseudonym_key(self) -> bytes:
        """HMAC key of pseudonyms, date shifts and pacsflow's own UIDs."""
        return _hkdf(self.secret, _PSEUDONYM_INFO)

    @property
    def encryption_key(self) -> bytes:
        """The 512-bit AES-SIV key of encryption at rest."""
        return _hkdf(self.secret, _ENCRYPTION_INFO, 64)

    @property
    def column_key(self) -> bytes:
        """The 512-bit AES-SIV key of the restricted zone's sealed columns."""
        return _hkdf(self.secret, _COLUMN_INFO, 64)

    @property
    def file_key(self) -> bytes:
        """The AES-256-GCM key of the restricted zone's sealed files."""
        return _hkdf(self.secret, _FILE_INFO)

    @property
    def audit_key(self) -> bytes:
        """HMAC key of the audit chain."""
        return _hkdf(self.secret, _AUDIT_INFO)

    @property
    def fingerprint(self) -> str:
        """``pfk1:`` + 20 hex digits naming this key (safe to show, log and store)."""
        fp_key = _hkdf(self.secret, _FINGERPRINT_INFO)
        digest = hmac.new(fp_key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()
        return FINGERPRINT_PREFIX + digest[:20]

    def pseudonymizer(self) -> Pseudonymizer:
        """Pseudonyms under :attr:`pseudonym_key`."""
        return Pseudonymizer(self.pseudonym_key)


@dataclass(frozen=True)
class Pseudonymizer:
    """Keyed, deterministic pseudonyms. Picklable (it travels to Dask workers with its key).

    Examples
    --------
    >>> p = Pseudonymizer(b"k" * 32)
    >>> p.uid("1.2.3") == p.uid("1.2.3")
    True
    >>> p.uid("1.2.3").startswith("2.25.")
    True
    """

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")

    def _mac(self, domain: str, value: str) -> bytes:
        return hmac.new(self.key, f"{domain}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """``2.25.<int>`` from the first 128 bits of the HMAC of the UID."""
        return f"2.25.{int.from_bytes(self._mac('uid', uid.strip())[:16], 'big')}"

    def derived_uid(self, domain: str, *parts: str) -> str:
        """``2.25.<int>`` for an object pacsflow creates, from ``parts`` in ``domain`` (e.g.
        write-back: model, version, source series, kind): the same inputs give the same UID on
        any machine, so a resent object is the same object, not a duplicate."""
        value = "\x1f".join(p.strip() for p in parts)
        return f"2.25.{int.from_bytes(self._mac(domain, value)[:16], 'big')}"

    def token(self, value: str, *, domain: str = "patient", length: int = 16) -> str:
        """A short base32 token (upper case, no padding) for an ID in ``domain``."""
        raw = base64.b32encode(self._mac(domain, value.strip())).decode().rstrip("=")
        return raw[:length]

    def date_offset_days(self, patient_id: str) -> int:
        """The patient's date shift in days, in [-3650, -1]: the same for all their studies."""
        n = int.from_bytes(self._mac("date-shift", patient_id.strip())[:8], "big")
        return -(1 + n % _MAX_SHIFT_DAYS)
