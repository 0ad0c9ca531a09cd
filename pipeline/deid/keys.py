"""The secret key and keyed pseudonyms: moved to :mod:`pipeline.lake.keys` (write-back derives
its result UIDs from the same key); re-exported here for the deid stage and its callers."""

from pipeline.lake.keys import KEY_BYTES, Pseudonymizer, generate_key_file, load_key

__all__ = ["KEY_BYTES", "Pseudonymizer", "generate_key_file", "load_key"]
