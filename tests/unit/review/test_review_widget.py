"""The notebook volume viewer (pipeline.review.widget): NIfTI bytes and the ipyniivue widget."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.lake import LakePaths, write_npy, write_partition
from pipeline.review.widget import nifti_bytes, volume_viewer

nib = pytest.importorskip("nibabel")
AFFINE = [0.7, 0, 0, -10, 0, 0.8, 0, -20, 0, 0, 2.5, 30, 0, 0, 0, 1]


@pytest.fixture
def lake(tmp_path: Path) -> LakePaths:
    """A lake with one stored (4, 5, 6) volume ``k1`` and a mask in its geometry."""
    lake = LakePaths(tmp_path / "lake")
    (lake.research / "tensors").mkdir(parents=True)
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    mask = (volume > 0).astype(np.uint8) * 3
    write_npy(lake.research / "tensors" / "v.npy", volume)
    write_npy(lake.research / "tensors" / "m.npy", mask)
    write_npy(lake.research / "tensors" / "small.npy", mask[:2])
    write_partition(
        lake,
        "tensors",
        [{"tensor_key": "k1", "SeriesInstanceUID": "1.2.3", "status": "ok",
          "path": "tensors/v.npy", "shape": [4, 5, 6], "affine": AFFINE}],
        part="t",
    )  # fmt: skip
    return lake


@pytest.mark.parametrize("dtype", ["int16", "float64", "uint8", "int64"])
def test_nifti_bytes_hold_the_array_in_ras(dtype: str) -> None:
    array = (np.arange(4 * 5 * 6).reshape(4, 5, 6) - 7).astype(dtype)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(nifti_bytes(array, AFFINE)))
    np.testing.assert_array_equal(np.asarray(img.dataobj), array.transpose(2, 1, 0))
    ras = np.diag([-1.0, -1, 1, 1]) @ np.array(AFFINE, dtype=float).reshape(4, 4)
    np.testing.assert_allclose(img.affine, ras, atol=1e-6)
    assert nifti_bytes(array, AFFINE, gz=False)[344:348] == b"n+1\0"


def test_nifti_bytes_refuse_a_2d_array() -> None:
    with pytest.raises(ValueError, match="3-D"):
        nifti_bytes(np.zeros((3, 3)), AFFINE)


def test_viewer_widget_is_built_without_a_browser(lake: LakePaths) -> None:
    pytest.importorskip("ipyniivue")
    viewer = volume_viewer(lake, "k1", "tensors/m.npy", window=(0, 100))
    assert viewer.model_id  # a widget model, ready for a front end
    image, overlay = viewer.volumes
    assert (image.name, image.colormap, image.cal_min, image.cal_max) == (
        "volume.nii.gz", "gray", -50.0, 50.0,
    )  # fmt: skip
    assert (overlay.name, overlay.cal_max) == ("mask.nii.gz", 3.0)
    for layer in (image, overlay):  # in-memory bytes: nothing is fetched from anywhere
        assert layer.url is None
        assert layer.path is None
        assert gzip.decompress(layer.data)[:4] == (348).to_bytes(4, "little")
    assert len(volume_viewer(lake, "k1").volumes) == 1


def test_viewer_errors_are_one_line(lake: LakePaths) -> None:
    pytest.importorskip("ipyniivue")
    with pytest.raises(KeyError, match="no stored volume"):
        volume_viewer(lake, "absent")
    with pytest.raises(ValueError, match=r"mask's shape \(2, 5, 6\) is not the volume's"):
        volume_viewer(lake, "k1", "tensors/small.npy")


def test_viewer_javascript_loads_nothing_from_a_cdn() -> None:
    ipyniivue = pytest.importorskip("ipyniivue")
    js = str(ipyniivue.NiiVue._esm)  # the ES module anywidget sends: the wheel's widget.js
    remote_import = re.compile(r"""(?:\bimport\s*\(?|\bfrom)\s*["'](?:https?:)?//""")
    found = remote_import.search(js)
    assert found is None, f"the widget's bundle imports from the web: {found and found[0]}"
    assert len(js) > 100_000  # the whole NiiVue bundle is in the wheel
