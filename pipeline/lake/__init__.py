"""The lake: paths of both zones, table schemas, atomic writes, run manifests and the audit log.

The names below load their module on first use (PEP 562), so ``pacsflow status`` and other
light readers import neither pydicom nor pandas through ``pipeline.lake``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: Each public name and the module that defines it.
_LAZY: dict[str, str] = {
    "load_tensor": "pipeline.lake.arrays",
    "write_npy": "pipeline.lake.arrays",
    "AuditLog": "pipeline.lake.audit",
    "ChainCheck": "pipeline.lake.audit",
    "verify_chain": "pipeline.lake.audit",
    "atomic_write_bytes": "pipeline.lake.io",
    "atomic_write_text": "pipeline.lake.io",
    "read_table": "pipeline.lake.io",
    "scan_batches": "pipeline.lake.io",
    "sweep_temporaries": "pipeline.lake.io",
    "sync_filesystem": "pipeline.lake.io",
    "table_exists": "pipeline.lake.io",
    "write_partition": "pipeline.lake.io",
    "write_partitioned": "pipeline.lake.io",
    "RunManifest": "pipeline.lake.manifest",
    "RunRecorder": "pipeline.lake.manifest",
    "StageCounts": "pipeline.lake.manifest",
    "list_manifests": "pipeline.lake.manifest",
    "mark_abandoned": "pipeline.lake.manifest",
    "RESEARCH_TABLES": "pipeline.lake.paths",
    "RESTRICTED_TABLES": "pipeline.lake.paths",
    "LakePaths": "pipeline.lake.paths",
    "SCHEMA_VERSION": "pipeline.lake.schemas",
    "SCHEMAS": "pipeline.lake.schemas",
    "schema_for": "pipeline.lake.schemas",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.lake' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
