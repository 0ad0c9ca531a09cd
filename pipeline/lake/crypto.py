"""Encryption at rest of the vault's original identifiers (config ``deid.encrypt_vault``).

The vault (``restricted/vault``) maps pseudonyms back to originals for write-back. With
``encrypt_vault: true`` its identifying columns (original PatientID, PatientName,
PatientBirthDate, AccessionNumber and the original Study/Series/SOP Instance UIDs) are stored as
AES-SIV ciphertexts (RFC 5297, from ``cryptography``) under a key derived from the pipeline's
secret key with HKDF-SHA256 (:class:`pipeline.lake.keys.LakeKeys`); the pseudonym columns, the
fingerprint and the object key stay in the clear, so the incremental diff and joins run without
the key.

AES-SIV is deterministic authenticated encryption: the same value of the same column of the same
object always gives the same ciphertext, so reruns and workers still write byte-identical
partitions. The associated data binds each ciphertext to its column and object key (a value
copied to another row or column fails to decrypt), so nothing repeats across rows: equal
originals of different objects encrypt differently. Without the key file the originals are
unreadable; ``pacsflow verify`` and write-back decrypt with the same key they already need.

A value is stored as ``pfenc1:`` + URL-safe base64 of the SIV and ciphertext, so a column can
hold clear and encrypted rows side by side (turning encryption on affects new rows only).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from pipeline.errors import LakeError

__all__ = ["ENCRYPTED_COLUMNS", "ORIGINAL_COLUMNS", "PREFIX", "VaultCipher", "is_encrypted"]

PREFIX = "pfenc1:"
#: the vault's columns holding original identifiers: all of them are encrypted
ORIGINAL_COLUMNS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)
ENCRYPTED_COLUMNS = ORIGINAL_COLUMNS


def is_encrypted(value: object) -> bool:
    """True for a value this module encrypted."""
    return isinstance(value, str) and value.startswith(PREFIX)


class VaultCipher:
    """Encrypts and decrypts the identifying columns of vault rows."""

    def __init__(self, secret_key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESSIV

        from pipeline.lake.keys import LakeKeys

        self._siv = AESSIV(LakeKeys(secret_key).encryption_key)

    def _ad(self, column: str, object_key: str) -> list[bytes]:
        return [column.encode(), object_key.encode()]

    def encrypt(self, column: str, object_key: str, value: str | None) -> str | None:
        if value is None or is_encrypted(value):
            return value
        token = self._siv.encrypt(value.encode("utf-8"), self._ad(column, object_key))
        return PREFIX + base64.urlsafe_b64encode(token).decode("ascii")

    def decrypt(self, column: str, object_key: str, value: str | None) -> str | None:
        if not is_encrypted(value):
            return value
        from cryptography.exceptions import InvalidTag

        assert value is not None
        try:
            raw = base64.urlsafe_b64decode(value[len(PREFIX) :])
            return self._siv.decrypt(raw, self._ad(column, object_key)).decode("utf-8")
        except (InvalidTag, ValueError):
            raise LakeError(
                "the vault cannot be decrypted with this key file (a different key, or a "
                "tampered row)"
            ) from None

    def encrypt_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(row)
        for col in ENCRYPTED_COLUMNS:
            out[col] = self.encrypt(col, str(row["object_key"]), row.get(col))
        return out

    def decrypt_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(row)
        for col in ENCRYPTED_COLUMNS:
            if col in out:
                out[col] = self.decrypt(col, str(row["object_key"]), out[col])
        return out
