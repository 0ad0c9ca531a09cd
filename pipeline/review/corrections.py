"""Reviewers' corrected masks as data: a new mask version beside the model's, and its row.

A correction is a binary uint8 array (1 = the finding) of the tensor's shape, stored at
``research/masks/<tensor_key>/corrections/<correction_id>.npy`` (never overwriting the model's
mask), and a row of the research table ``corrections`` tying it to the reviewer, the time,
the model's identity (model, version, weights) and the checksums of the tensor the model saw
and of the mask the reviewer started from. The label set export
(:func:`pipeline.review.store.label_set`) carries the latest correction of each finding.
"""

from __future__ import annotations

import hashlib
import io
import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dicom.atomic import atomic_write_bytes
from pipeline.lake.io import read_table, write_partition
from pipeline.lake.paths import LakePaths
from pipeline.lake.queries import COHORT_KEYS

__all__ = [
    "CORRECTION_ID",
    "correction_path",
    "latest_corrections",
    "load_corrections",
    "record_correction",
]

#: A correction id: 32 lowercase hex digits (a uuid4), nothing else reaches a path.
CORRECTION_ID = re.compile(r"^[0-9a-f]{32}$")


def correction_path(lake: LakePaths, tensor_key: str, correction_id: str) -> Path:
    """``research/masks/<tensor_key>/corrections/<correction_id>.npy``, checked to stay in
    the research zone's masks folder.

    Raises
    ------
    ValueError
        For a malformed id, or a key that would leave ``research/masks``.
    """
    if not CORRECTION_ID.match(correction_id):
        raise ValueError("a correction id is 32 hex digits")
    masks = (lake.research / "masks").resolve()
    path = (masks / tensor_key / "corrections" / f"{correction_id}.npy").resolve()
    if not path.is_relative_to(masks) or ".." in Path(tensor_key).parts:
        raise ValueError("the tensor key leaves the masks folder")
    return path


def _npy_bytes(mask: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(mask, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def record_correction(
    lake: LakePaths,
    finding: Mapping[str, Any],
    mask: np.ndarray[Any, Any],
    *,
    reviewer: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Store ``mask`` (the tensor's shape, 0/1) as a corrected version of ``finding``'s mask
    and append its row to ``corrections``. Returns the row written.

    Raises
    ------
    ValueError
        An empty reviewer, or a mask that is not the tensor's shape.
    """
    if not reviewer:
        raise ValueError("a correction needs a reviewer")
    shape = tuple(int(v) for v in (finding.get("shape") or ()))
    if tuple(mask.shape) != shape:
        raise ValueError(f"the mask's shape {tuple(mask.shape)} is not the tensor's {shape}")
    when = now or datetime.now(UTC)
    correction_id = uuid.uuid4().hex
    tensor_key = str(finding["tensor_key"])
    path = correction_path(lake, tensor_key, correction_id)
    data = _npy_bytes(mask)
    atomic_write_bytes(path, data)  # durable: the row below names it
    row = {
        "correction_id": correction_id,
        "finding_key": str(finding["finding_key"]),
        "tensor_key": tensor_key,
        "SeriesInstanceUID": finding.get("SeriesInstanceUID"),
        "model": finding.get("model"),
        "model_version": finding.get("model_version"),
        "weights_sha256": finding.get("weights_sha256"),
        "tensor_checksum": finding.get("tensor_checksum"),
        "base_mask_path": finding.get("mask_path"),
        "base_mask_checksum": finding.get("mask_checksum"),
        "label_value": finding.get("label_value"),
        "mask_path": path.relative_to(lake.research.resolve()).as_posix(),
        "mask_checksum": "sha256:" + hashlib.sha256(data).hexdigest(),
        "voxel_count": int(np.count_nonzero(mask)),
        "shape": list(shape),
        "reviewer": reviewer,
        "corrected_at": when,
        # the cohort keys of the finding (issue #24): corrections filter without a join
        **{k: finding.get(k) for k in COHORT_KEYS if k != "SeriesInstanceUID"},
    }
    part = f"{when.strftime('%Y%m%dT%H%M%S%f')}-{correction_id[:12]}"
    write_partition(lake, "corrections", [row], part=part)
    return row


def load_corrections(lake: LakePaths) -> list[dict[str, Any]]:
    """Every correction ever saved, oldest first."""
    rows = read_table(lake, "corrections").to_pylist()
    rows.sort(key=lambda r: (r["corrected_at"], r["correction_id"]))
    return rows


def latest_corrections(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each corrected finding's latest correction (ties broken by id)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        have = latest.get(row["finding_key"])
        if have is None or (row["corrected_at"], row["correction_id"]) > (
            have["corrected_at"],
            have["correction_id"],
        ):
            latest[row["finding_key"]] = dict(row)
    return latest
