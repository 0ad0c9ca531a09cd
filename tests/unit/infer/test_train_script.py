"""Helpers of the default model's training script (``scripts/train.py``) that shape its data:
single CT images as one-slice volumes in the DICOM axial layout, and 3 mm copies."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.infer.registry import default_models_dir

SCRIPTS = default_models_dir() / "ct_body_composition" / "scripts"


@pytest.fixture(scope="module")
def train() -> Any:
    """``scripts/train.py`` as a module (it imports its sibling ``evaluate.py``)."""
    name = "ct_body_composition_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / "train.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _ct_file(path: Path, pixels: np.ndarray, orientation: list[float]) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.ImageOrientationPatient = orientation
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.PixelSpacing = [0.8, 0.7]
    ds.SliceThickness = 2.5
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_single_image_becomes_a_one_slice_volume_in_axial_layout(
    train: Any, tmp_path: Path
) -> None:
    pixels = np.arange(6 * 4, dtype=np.uint16).reshape(6, 4) * 10
    # rows running to the patient's front (table at the top of the image): flipped back
    path = _ct_file(tmp_path / "a.dcm", pixels, [1.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    source = train.single_slice(path)
    assert source.volume.hu.shape == (1, 6, 4)
    assert source.volume.spacing == (2.5, 0.8, 0.7)
    np.testing.assert_array_equal(source.volume.hu[0], pixels[::-1].astype(np.float32) - 1024)
    assert source.files == (path,)

    tilted = _ct_file(tmp_path / "b.dcm", pixels, [1.0, 0.0, 0.0, 0.0, 0.927, -0.375])
    with pytest.raises(ValueError, match="not an axial image"):
        train.single_slice(tilted)


def test_coarse_copy_averages_to_about_3_mm(train: Any) -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(0.0, 100.0, size=(12, 60, 48)).astype(np.float32)
    volume = train.ev.CtVolume(
        name="v", hu=hu, affine_ras=np.diag([-0.75, -0.75, 1.0, 1.0]), spacing=(1.0, 0.75, 0.75)
    )
    coarse = train.coarsened(volume)
    assert coarse is not None
    assert coarse.hu.shape == (4, 15, 12)
    assert coarse.spacing == pytest.approx((3.0, 3.0, 3.0))
    np.testing.assert_allclose(np.diag(coarse.affine_ras)[:3], [-3.0, -3.0, 3.0])
    # area averaging: each coarse voxel is the mean of its 3 x 4 x 4 block
    np.testing.assert_allclose(coarse.hu[1, 2, 3], hu[3:6, 8:12, 12:16].mean(), rtol=1e-5)
    assert float(coarse.hu.mean()) == pytest.approx(float(hu.mean()), abs=1e-3)
    # already about that coarse in-plane: no copy
    three = train.ev.CtVolume(name="w", hu=hu, affine_ras=np.eye(4), spacing=(3.0, 2.9, 2.9))
    assert train.coarsened(three) is None


def test_domes_turn_the_phantoms_lung_bases_into_crescents(train: Any) -> None:
    phantom = train.ev.phantom_for_seed(101)
    volume, _ = train.ev.render_phantom(
        phantom, size=128, fov_mm=480.0, step_mm=5.0, seed=101, below_mm=60.0
    )
    carved = train.carve_domes(volume, 101)
    lung = (volume.hu > -910) & (volume.hu < -600)
    gas = carved.hu < -950  # the stomach's, under the left dome
    changed = (carved.hu != volume.hu) & ~gas
    assert changed.any()
    assert not (changed & ~lung).any(), "only lung is replaced by the domes"
    assert ((carved.hu[changed] >= 36) & (carved.hu[changed] <= 74)).all()  # liver-like
    # the domes sit in the lowest part of each lung, and leave a rim of lung around them
    lung_z = np.flatnonzero(lung.any(axis=(1, 2)))
    changed_z = np.flatnonzero(changed.any(axis=(1, 2)))
    assert changed_z.min() >= lung_z.min()
    assert changed_z.max() <= lung_z.min() + 70 / 5.0
    k = int(changed_z.max()) - 1
    assert ((carved.hu[k] > -910) & (carved.hu[k] < -600)).sum() > 0
    again = train.carve_domes(volume, 101)
    np.testing.assert_array_equal(again.hu, carved.hu)


def test_stomach_gas_lies_under_the_left_dome_and_stays_gas(train: Any) -> None:
    from scipy import ndimage as ndi  # type: ignore[import-untyped]

    from pipeline.infer.hu_rules import SOFT_TISSUE, hu_labels

    phantom = train.ev.phantom_for_seed(102)
    volume, _ = train.ev.render_phantom(
        phantom, size=192, fov_mm=480.0, step_mm=5.0, seed=102, below_mm=60.0
    )
    carved = train.carve_domes(volume, 102)
    gas = (carved.hu < -950) & (volume.hu >= -950)  # new gas: in the dome or under it
    assert gas.any()
    x, _, _ = train.patient_axes(volume)
    left = (x >= float(x.mean()))[None]  # LPS x grows to the patient's left
    assert not (gas & ~left).any(), "the stomach is on the left"
    labels = hu_labels(carved.hu, carved.spacing)
    assert (labels[gas] == SOFT_TISSUE).all(), "the HU rules call it gas, not lung"
    # a lung sliver runs beside it: slices with the bubble still hold left lung, apart from it
    both = [
        k
        for k in np.flatnonzero(gas.any(axis=(1, 2)))
        if ((labels[k] == train.LUNG) & left[0]).any()
    ]
    assert both
    walls = ndi.distance_transform_edt(labels != train.LUNG, sampling=carved.spacing)
    assert float(walls[gas].min()) > max(carved.spacing), "tissue between gas and lung"


def test_the_gas_weight_can_spare_the_lungs_rim(train: Any) -> None:
    import torch

    y = torch.full((1, 32, 32), 1, dtype=torch.long)  # soft tissue
    y[0, 10:20, 10:20] = train.LUNG
    x = torch.zeros((1, 1, 32, 32))
    x[0, 0, 8:22, 8:22] = -0.5  # -512 HU: lung and its partial-volume rim
    logits = torch.zeros((1, 5, 32, 32))
    plain = train.Loss()(logits, y, x)
    spared = train.Loss(spare_lung_rim=True)(logits, y, x)
    assert float(spared) < float(plain)  # the rim is no longer weighted as gas
    x[0, 0, 0:4, 0:4] = -0.9  # gas far from the lung keeps its weight
    assert float(train.Loss(spare_lung_rim=True)(logits, y, x)) > float(spared)
