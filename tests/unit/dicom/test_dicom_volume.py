"""pipeline.dicom.volume: one Volume type, its grid a typed attribute."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import TensorsConfig
from pipeline.dicom.volume import Volume, VolumeGrid


def _row(**prep: object) -> dict[str, object]:
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    affine[:3, 3] = [-10, -20, 30]
    return {
        "affine": affine.reshape(-1).tolist(),
        "spacing": [2.0, 0.5, 0.5],
        "sop_instance_uids": ["1", "2", "3"],
        "frame_numbers": [1, 1, 1],
        "rescaled": True,
        "preprocessing": TensorsConfig(**prep).preprocessing_json(),  # type: ignore[arg-type]
    }


def test_tensors_reexports_the_one_volume() -> None:
    from pipeline.tensors import volume as tv

    assert tv.Volume is Volume


@pytest.mark.parametrize(
    ("prep", "grid"),
    [
        ({}, VolumeGrid.NATIVE),
        ({"orientation": "RAS"}, VolumeGrid.REORIENTED),
        ({"spacing": (1.0, 1.0, 1.0)}, VolumeGrid.RESAMPLED),
        ({"window": (40.0, 400.0), "dtype": "float32"}, VolumeGrid.NATIVE),
    ],
)
def test_grid_from_preprocessing(prep: dict[str, object], grid: VolumeGrid) -> None:
    row = _row(**prep)
    assert VolumeGrid.from_preprocessing(row["preprocessing"]) is grid  # type: ignore[arg-type]
    vol = Volume.from_tensor_row(row, np.zeros((3, 4, 5), np.uint8))
    assert vol.grid is grid
    assert vol.on_source_grid is (grid is VolumeGrid.NATIVE)


def test_grid_is_not_found_by_searching_text() -> None:
    """A JSON text spaced differently from the canonical form is still read (the old check
    searched for '"orientation":"native"' and refused it)."""
    text = json.dumps({"orientation": "native", "spacing": None}, indent=2)
    assert VolumeGrid.from_preprocessing(text) is VolumeGrid.NATIVE
    for bad in ("not json", "[]", "{}"):
        with pytest.raises(ValueError, match=r"JSON|orientation"):
            VolumeGrid.from_preprocessing(bad)


def test_from_tensor_row_geometry() -> None:
    vol = Volume.from_tensor_row(_row(), np.zeros((3, 4, 5), np.int16))
    assert vol.spacing == (2.0, 0.5, 0.5)
    assert vol.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    np.testing.assert_array_equal(vol.normal, [0, 0, 1])
    assert vol.sop_instance_uids == ("1", "2", "3")
    assert vol.rescaled
    with pytest.raises(ValueError, match="slice UID"):
        Volume.from_tensor_row(_row(), np.zeros((4, 4, 5), np.int16))
    with pytest.raises(ValueError, match="affine"):
        Volume.from_tensor_row({**_row(), "affine": [1.0]}, np.zeros((3, 4, 5)))


def test_package_imports_no_torch() -> None:
    code = (
        "import sys, pipeline.dicom, pipeline.dicom.elements; "
        "sys.exit(any(m in sys.modules for m in ('torch', 'monai')))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_from_tensor_row_off_grid_keeps_the_raw_slice_list() -> None:
    """A reoriented tensor has other slices than its raw grid's UIDs: still a Volume (infer
    reads it), not one write-back maps onto the frames."""
    vol = Volume.from_tensor_row(_row(orientation="RAS"), np.zeros((5, 4, 3), np.int16))
    assert vol.grid is VolumeGrid.REORIENTED
    assert not vol.on_source_grid
    assert len(vol.sop_instance_uids) == 3
