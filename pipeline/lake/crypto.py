"""Encryption at rest: the vault's originals, the restricted zone's identifying columns, files.

Three ciphers, each under its own key derived from the lake's secret key
(:class:`pipeline.lake.keys.LakeKeys`):

- :class:`VaultCipher` (below): the vault's originals, bound to their object;
- :class:`Sealer`: in a lake encrypted at rest (``encrypt_at_rest``), the identifying columns
  of the index, quarantine, units and outbox (:data:`SEALED_COLUMNS`: locations, unit keys,
  PatientID, original UIDs, messages), deterministic per family so joins still work;
- :class:`FileCipher`: whole files of the restricted zone (the SEG/SR built for sending),
  AES-256-GCM with a random nonce per file.

The vault:

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
from typing import TYPE_CHECKING, Any

from pipeline.errors import LakeError

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "ENCRYPTED_COLUMNS",
    "FILE_MAGIC",
    "ORIGINAL_COLUMNS",
    "PREFIX",
    "SEALED_COLUMNS",
    "SEAL_PREFIX",
    "FileCipher",
    "Sealer",
    "VaultCipher",
    "is_encrypted",
    "is_sealed",
]

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
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
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

    def decrypt_table(self, table: pa.Table) -> pa.Table:
        """An Arrow table of vault rows (with ``object_key``) with its originals decrypted."""
        import pyarrow as pa

        if "object_key" not in table.column_names:
            return table
        keys = table.column("object_key").to_pylist()
        for col in ENCRYPTED_COLUMNS:
            if col not in table.column_names:
                continue
            i = table.column_names.index(col)
            values = table.column(col).to_pylist()
            if not any(is_encrypted(v) for v in values):
                continue
            clear = [self.decrypt(col, str(k), v) for k, v in zip(keys, values, strict=True)]
            table = table.set_column(i, table.field(i), pa.array(clear, table.field(i).type))
        return table

    def decrypt_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(row)
        for col in ENCRYPTED_COLUMNS:
            if col in out:
                out[col] = self.decrypt(col, str(row["object_key"]), out[col])
        return out


# --------------------------------------------------------------------------------------------
# The sealed restricted zone: identifying columns of the index, quarantine, units and outbox
# --------------------------------------------------------------------------------------------

SEAL_PREFIX = "pfseal1:"
#: table -> column -> family. Values of one family seal alike in every table (deterministic,
#: bound to the family only), so joins and equality lookups run on the sealed values.
SEALED_COLUMNS: dict[str, dict[str, str]] = {
    "index": {
        "location": "location",
        "unit_key": "unit_key",
        "PatientID": "PatientID",
        "StudyInstanceUID": "uid",
        "SeriesInstanceUID": "uid",
        "SOPInstanceUID": "uid",
    },
    "quarantine": {"location": "location", "unit_key": "unit_key", "message": "message"},
    "units": {"unit_key": "unit_key"},
    "outbox": {"StudyInstanceUID": "uid", "source_series_uid": "uid"},
}
_SEAL_AD = b"pacsflow sealed column v1"


def is_sealed(value: object) -> bool:
    """True for a value :class:`Sealer` sealed."""
    return isinstance(value, str) and value.startswith(SEAL_PREFIX)


class Sealer:
    """Deterministic AES-SIV of the restricted zone's identifying columns (a lake encrypted at
    rest): the same value of the same family always seals to the same text, so equality joins
    (unit keys, locations, UIDs) still work without the key, and nothing else can be learnt.
    Sealing is idempotent and opening a clear value returns it, so sealed and clear rows mix.
    Picklable (it travels to Dask workers with the lake)."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESSIV

        self._key = key
        self._siv = AESSIV(key)
        self._seal_cache: dict[tuple[str, str], str] = {}
        self._open_cache: dict[tuple[str, str], str] = {}

    def __reduce__(self) -> tuple[type[Sealer], tuple[bytes]]:
        return Sealer, (self._key,)  # the cipher and caches are rebuilt on the other side

    def seal(self, family: str, value: str | None) -> str | None:
        """The sealed text of ``value`` (None and sealed values pass through)."""
        if value is None or is_sealed(value):
            return value
        hit = self._seal_cache.get((family, value))
        if hit is None:
            token = self._siv.encrypt(value.encode("utf-8"), [_SEAL_AD, family.encode()])
            hit = SEAL_PREFIX + base64.urlsafe_b64encode(token).decode("ascii")
            if len(self._seal_cache) < 100_000:
                self._seal_cache[(family, value)] = hit
        return hit

    def open(self, family: str, value: str | None) -> str | None:
        """The clear text of a sealed ``value`` (clear values pass through).

        Raises
        ------
        LakeError
            When it does not open with this key (another key, or an edited value).
        """
        if not is_sealed(value):
            return value
        assert value is not None
        hit = self._open_cache.get((family, value))
        if hit is not None:
            return hit
        from cryptography.exceptions import InvalidTag

        try:
            raw = base64.urlsafe_b64decode(value[len(SEAL_PREFIX) :])
            clear = self._siv.decrypt(raw, [_SEAL_AD, family.encode()]).decode("utf-8")
        except (InvalidTag, ValueError):
            raise LakeError(
                "a sealed value of the restricted zone does not open with this key (another "
                "key, or an edited value)"
            ) from None
        if len(self._open_cache) < 100_000:
            self._open_cache[(family, value)] = clear
        return clear

    def seal_row(self, table: str, row: Mapping[str, Any]) -> dict[str, Any]:
        """``row`` of lake table ``table`` with its identifying columns sealed."""
        out = dict(row)
        for col, family in SEALED_COLUMNS.get(table, {}).items():
            if col in out:
                out[col] = self.seal(family, out[col])
        return out

    def open_row(self, table: str, row: Mapping[str, Any]) -> dict[str, Any]:
        """``row`` of lake table ``table`` with its sealed columns opened."""
        out = dict(row)
        for col, family in SEALED_COLUMNS.get(table, {}).items():
            if col in out:
                out[col] = self.open(family, out[col])
        return out

    def _map(self, table: str, data: pa.Table, func: Any) -> pa.Table:
        import pyarrow as pa

        for col, family in SEALED_COLUMNS.get(table, {}).items():
            if col in data.column_names:
                i = data.column_names.index(col)
                values = [func(family, v) for v in data.column(col).to_pylist()]
                data = data.set_column(i, data.field(i), pa.array(values, data.field(i).type))
        return data

    def seal_table(self, table: str, data: pa.Table) -> pa.Table:
        """An Arrow table of lake table ``table`` with its identifying columns sealed."""
        return self._map(table, data, self.seal)

    def open_table(self, table: str, data: pa.Table) -> pa.Table:
        """An Arrow table of lake table ``table`` with its sealed columns opened."""
        return self._map(table, data, self.open)


FILE_MAGIC = b"PFENC1\n"


class FileCipher:
    """Whole-file AES-256-GCM for the restricted zone: ``PFENC1\\n``, a random 96-bit nonce,
    the ciphertext and tag. The file's name is bound as associated data, so a file renamed or
    swapped for another does not open."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encrypt(self, data: bytes, name: str) -> bytes:
        """The sealed bytes of ``data`` stored under ``name``."""
        import os

        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(12)
        return FILE_MAGIC + nonce + AESGCM(self._key).encrypt(nonce, data, name.encode())

    def decrypt(self, blob: bytes, name: str) -> bytes:
        """The clear bytes of ``blob`` (returned as is when it is not sealed).

        Raises
        ------
        LakeError
            When it does not open with this key, or was renamed or edited.
        """
        if not blob.startswith(FILE_MAGIC):
            return blob
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        body = blob[len(FILE_MAGIC) :]
        try:
            return AESGCM(self._key).decrypt(body[:12], body[12:], name.encode())
        except InvalidTag:
            raise LakeError(
                f"{name} does not open with this key (another key, or an edited file)"
            ) from None
