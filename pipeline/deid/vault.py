"""Encryption at rest of the vault: moved to :mod:`pipeline.lake.crypto` (write-back decrypts
the vault too); re-exported here for the deid stage and its callers."""

from pipeline.lake.crypto import (
    ENCRYPTED_COLUMNS,
    ORIGINAL_COLUMNS,
    PREFIX,
    VaultCipher,
    is_encrypted,
)

__all__ = ["ENCRYPTED_COLUMNS", "ORIGINAL_COLUMNS", "PREFIX", "VaultCipher", "is_encrypted"]
