"""The lake: paths of both zones, table schemas, atomic writes, run manifests and the audit log."""

from pipeline.lake.arrays import load_tensor, write_npy
from pipeline.lake.audit import AuditLog, ChainCheck, verify_chain
from pipeline.lake.io import (
    atomic_write_bytes,
    atomic_write_text,
    read_table,
    scan_batches,
    sweep_temporaries,
    sync_filesystem,
    table_exists,
    write_partition,
    write_partitioned,
)
from pipeline.lake.manifest import (
    RunManifest,
    RunRecorder,
    StageCounts,
    list_manifests,
    mark_abandoned,
)
from pipeline.lake.paths import RESEARCH_TABLES, RESTRICTED_TABLES, LakePaths
from pipeline.lake.schemas import SCHEMA_VERSION, SCHEMAS, schema_for

__all__ = [
    "RESEARCH_TABLES",
    "RESTRICTED_TABLES",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "AuditLog",
    "ChainCheck",
    "LakePaths",
    "RunManifest",
    "RunRecorder",
    "StageCounts",
    "atomic_write_bytes",
    "atomic_write_text",
    "list_manifests",
    "load_tensor",
    "mark_abandoned",
    "read_table",
    "scan_batches",
    "schema_for",
    "sweep_temporaries",
    "sync_filesystem",
    "table_exists",
    "verify_chain",
    "write_npy",
    "write_partition",
    "write_partitioned",
]
