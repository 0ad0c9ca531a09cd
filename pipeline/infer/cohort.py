"""What a findings row carries for cohorts (issue #24): the keys of its series, study and
acquisition, and where the finding lies in patient coordinates.

The keys come with the tensors row (:func:`pipeline.lake.queries.infer_todo` joins them from
the research ``series``, ``studies`` and ``instances`` tables); rows from elsewhere (a
multi-sequence group) may lack some, which the ``findings`` view of ``pacsflow sql`` fills
from ``series`` and ``studies``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["COHORT_COLUMNS", "cohort_columns", "extent_mm"]

#: The findings columns copied from the tensors row a model ran on.
COHORT_COLUMNS = (
    "patient_token",
    "StudyInstanceUID",
    "Modality",
    "Manufacturer",
    "StudyDate",
    "patient_age_years",
    "FrameOfReferenceUID",
    "AcquisitionNumber",
)


def cohort_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """The cohort columns of a findings row made from the tensors ``row`` (None where the row
    lacks one)."""
    return {k: row.get(k) for k in COHORT_COLUMNS}


def extent_mm(
    centroid_kji: Sequence[float] | None,
    bbox: Sequence[int] | None,
    affine: npt.NDArray[np.float64],
) -> tuple[list[float] | None, list[float] | None]:
    """The centre (LPS mm) of voxel position ``centroid_kji`` (slice, row, column) and the
    extent along x, y, z (mm) of the voxel box ``bbox`` ([k0, j0, i0, k1, j1, i1], inclusive),
    through the tensor's ``affine`` (voxel (i, j, k) -> LPS); (None, None) without a box."""
    if centroid_kji is None or bbox is None:
        return None, None
    a = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    k, j, i = (float(v) for v in centroid_kji)
    centre = a @ np.array([i, j, k, 1.0])
    k0, j0, i0, k1, j1, i1 = (float(v) for v in bbox)
    corners = np.array(
        [
            [ii, jj, kk, 1.0]
            for ii in (i0 - 0.5, i1 + 0.5)
            for jj in (j0 - 0.5, j1 + 0.5)
            for kk in (k0 - 0.5, k1 + 0.5)
        ]
    )
    lps = (a @ corners.T).T[:, :3]
    size = lps.max(axis=0) - lps.min(axis=0)
    return [round(float(c), 3) for c in centre[:3]], [round(float(s), 3) for s in size]
