"""pipeline.tensors.volume: series -> volume with exact geometry (synthetic + real data)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import make_ct
from pydicom import Dataset

from pipeline.enums import QuarantineReason
from pipeline.errors import GeometryError
from pipeline.tensors.volume import Volume, build_volume, build_volumes, lps_to_ras

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _slice(
    z: float,
    *,
    number: int = 1,
    value: int | None = None,
    iop: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-10.0, -20.0, 0.0),
    spacing: tuple[float, float] = (0.5, 0.75),
    size: int = 8,
    **attrs: object,
) -> Dataset:
    """An 8x8 CT slice at distance ``z`` along the normal of ``iop``, filled with ``value``."""
    ds = make_ct(number=number)
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    ds.ImageOrientationPatient = [f"{v:.10g}" for v in iop]
    ds.ImagePositionPatient = [f"{v:.10g}" for v in np.asarray(origin) + z * normal]
    ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.Rows = ds.Columns = size
    fill = number if value is None else value
    ds.PixelData = np.full((size, size), fill, dtype=np.uint16).tobytes()
    for key, val in attrs.items():
        setattr(ds, key, val)
    return ds


def _series(zs: Sequence[float], **kw: object) -> list[Dataset]:
    return [_slice(z, number=n + 1, **kw) for n, z in enumerate(zs)]  # type: ignore[arg-type]


def _refused(datasets: Sequence[Dataset], match: str) -> GeometryError:
    with pytest.raises(GeometryError, match=match) as info:
        build_volumes(datasets)
    assert info.value.reason is QuarantineReason.GEOMETRY
    return info.value


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


def test_orders_by_position_not_instance_number() -> None:
    zs = [0.0, 2.0, 4.0, 6.0, 8.0]
    numbers = [3, 5, 1, 4, 2]  # instance numbers unrelated to position
    datasets = [_slice(z, number=n, value=int(z)) for z, n in zip(zs, numbers, strict=True)]
    random.Random(1).shuffle(datasets)
    vol = build_volume(datasets)
    assert vol.array.shape == (5, 8, 8)
    assert [int(vol.array[k, 0, 0]) for k in range(5)] == [0, 2, 4, 6, 8]
    by_z = {float(ds.ImagePositionPatient[2]): ds.SOPInstanceUID for ds in datasets}
    assert vol.sop_instance_uids == tuple(by_z[z] for z in zs)
    assert vol.frame_numbers == (1,) * 5
    assert vol.spacing == pytest.approx((2.0, 0.5, 0.75))
    expected = np.array(
        [[0.75, 0, 0, -10], [0, 0.5, 0, -20], [0, 0, 2, 0], [0, 0, 0, 1]], dtype=np.float64
    )
    np.testing.assert_allclose(vol.affine, expected, atol=1e-9)
    assert vol.affine.dtype == np.float64
    assert not vol.rescaled
    assert vol.array.dtype == np.uint16


def test_descending_positions_give_positive_normal_step() -> None:
    vol = build_volume(_series([10.0, 5.0, 0.0]))
    assert vol.affine[2, 2] == pytest.approx(5.0)
    assert vol.affine[2, 3] == pytest.approx(0.0)
    assert [int(v) for v in vol.array[:, 0, 0]] == [3, 2, 1]


def test_oblique_affine_maps_every_slice_origin() -> None:
    a = np.radians(30)
    b = 0.4
    iop = (np.cos(a), np.sin(a), 0.0, -np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), -np.sin(b))
    datasets = _series([0.0, 3.0, 6.0, 9.0], iop=iop, origin=(5.0, -7.0, 11.0))
    vol = build_volume(datasets)
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    for k, ds in enumerate(datasets):
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(vol.affine @ [0, 0, k, 1], [*ipp, 1], atol=1e-6)
        # voxel (i=2 columns, j=3 rows) is 2*col_spacing along the row cosines, 3*row_spacing
        # along the column cosines
        want = ipp + 2 * 0.75 * row + 3 * 0.5 * col
        np.testing.assert_allclose((vol.affine @ [2, 3, k, 1])[:3], want, atol=1e-6)
    np.testing.assert_allclose(vol.affine[:3, 2], 3.0 * vol.normal, atol=1e-6)
    np.testing.assert_allclose(vol.orientation, iop, atol=1e-9)
    ras = lps_to_ras(vol.affine)
    np.testing.assert_allclose(ras[:2], -vol.affine[:2])
    np.testing.assert_allclose(ras[2:], vol.affine[2:])
    np.testing.assert_allclose(vol.affine_ras, ras)


def test_duplicate_positions_refused() -> None:
    _refused(_series([0.0, 2.0, 2.0, 4.0]), "duplicate slice positions")


def test_all_at_one_position_refused() -> None:
    _refused(_series([1.0, 1.0, 1.0]), "duplicate slice positions")


def test_gap_refused() -> None:
    _refused(_series([0.0, 2.0, 4.0, 8.0, 10.0]), "gap in slice positions")


def test_variable_spacing_refused() -> None:
    _refused(_series([0.0, 2.0, 5.0, 6.0]), "variable slice spacing")


def test_small_jitter_uses_mean_spacing() -> None:
    vol = build_volume(_series([0.0, 2.001, 3.999, 6.0]))
    assert vol.spacing[0] == pytest.approx(2.0)
    assert vol.affine[2, 2] == pytest.approx(2.0)


def test_mixed_orientation_refused() -> None:
    datasets = _series([0.0, 2.0, 4.0])
    datasets[1].ImageOrientationPatient = [1, 0, 0, 0, 0.999, 0.0447]
    _refused(datasets, "mixed orientations")


def test_tiny_orientation_noise_accepted() -> None:
    datasets = _series([0.0, 2.0, 4.0])
    datasets[1].ImageOrientationPatient = [1, 0, 0, 0, 1, 0.00001]
    assert build_volume(datasets).array.shape[0] == 3


def test_mixed_frame_size_refused() -> None:
    datasets = [*_series([0.0, 2.0]), _slice(4.0, number=3, size=4)]
    _refused(datasets, "mixed frame sizes")


def test_gantry_tilt_refused() -> None:
    # positions move 2 mm along z and tan(10 deg) * 2 mm along y: a 10 degree tilt
    datasets = _series([0.0, 2.0, 4.0, 6.0])
    for k, ds in enumerate(datasets):
        ds.ImagePositionPatient = [-10, -20 + k * 2 * np.tan(np.radians(10)), k * 2.0]
    err = _refused(datasets, r"gantry tilt of 10\.0 degrees")
    assert "DOE" not in str(err)


def test_single_slice_and_empty_refused() -> None:
    _refused(_series([0.0]), "single slice")
    _refused([], "empty series")


def test_missing_geometry_refused() -> None:
    datasets = _series([0.0, 2.0])
    del datasets[0].ImagePositionPatient
    _refused(datasets, "no ImagePositionPatient")


@pytest.mark.parametrize(
    ("attr", "values"),
    [
        ("TemporalPositionIdentifier", [1, 2]),
        ("AcquisitionNumber", [7, 8]),
        ("EchoNumbers", [1, 2]),
        ("TriggerTime", [0.0, 350.0]),
    ],
)
def test_4d_split(attr: str, values: list[object]) -> None:
    datasets = []
    for t, val in enumerate(values):
        for k, z in enumerate([0.0, 3.0, 6.0]):
            datasets.append(_slice(z, number=10 * t + k + 1, value=100 * t + k, **{attr: val}))
    random.Random(3).shuffle(datasets)
    volumes = build_volumes(datasets)
    assert len(volumes) == 2
    for t, vol in enumerate(volumes):
        assert vol.array.shape == (3, 8, 8)
        assert [int(v) for v in vol.array[:, 0, 0]] == [100 * t, 100 * t + 1, 100 * t + 2]
        np.testing.assert_allclose(vol.affine, volumes[0].affine)
    with pytest.raises(GeometryError, match="4D series: 2 volumes"):
        build_volume(datasets)


def test_4d_with_incomplete_volume_refused() -> None:
    datasets = [
        *_series([0.0, 3.0, 6.0], TemporalPositionIdentifier=1),
        *_series([0.0, 3.0], TemporalPositionIdentifier=2),
    ]
    _refused(datasets, "duplicate slice positions")


def test_rescale_integral_gives_int16() -> None:
    datasets = _series([0.0, 1.0, 2.0], RescaleSlope="1", RescaleIntercept="-1024")
    vol = build_volume(datasets)
    assert vol.rescaled
    assert vol.array.dtype == np.int16
    assert [int(v) for v in vol.array[:, 0, 0]] == [-1023, -1022, -1021]


def test_rescale_large_range_gives_int32() -> None:
    datasets = _series([0.0, 1.0], RescaleSlope="40000", RescaleIntercept="0")
    vol = build_volume(datasets)
    assert vol.array.dtype == np.int32
    assert [int(v) for v in vol.array[:, 0, 0]] == [40000, 80000]


def test_rescale_fractional_gives_float32() -> None:
    datasets = _series([0.0, 1.0], RescaleSlope="0.5", RescaleIntercept="1.25")
    vol = build_volume(datasets)
    assert vol.rescaled
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array[:, 0, 0], [1.75, 2.25])


def test_volume_is_frozen() -> None:
    vol = build_volume(_series([0.0, 1.0]))
    with pytest.raises(AttributeError):
        vol.rescaled = True  # type: ignore[misc]


def test_module_does_not_import_torch() -> None:
    code = (
        "import sys, pipeline.tensors.volume; "
        "sys.exit(any(m in sys.modules for m in ('torch', 'monai')))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------

DICOM = Path("dicom")


def _read_dir(folder: Path) -> list[Dataset]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix not in {".json", ".txt"}
    )
    return [pydicom.dcmread(p) for p in files if p.name != "DIRFILE"]


def _matches_reference(
    vol: Volume, ref_path: Path, t: int | None = None, *, linear: bool = False
) -> None:
    """Reorient ``vol`` onto the reference NIfTI grid and compare geometry and values.

    With ``linear``, values need only match up to one scale and offset (fitted here): for
    Philips, dcm2niix writes the vendor's private "floating point" scale (2005,100E), not
    the DICOM Modality LUT that pacsflow applies.
    """
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    ref = nib.load(ref_path)
    ref_data = np.asanyarray(ref.dataobj)
    if ref_data.dtype.names:  # RGB(A) NIfTI: structured dtype
        ref_data = np.stack([ref_data[c] for c in "RGB"], axis=-1)
    elif ref_data.ndim == 4:
        ref_data = ref_data[..., 0 if t is None else t]
    ours_ijk = np.moveaxis(vol.array, (0, 1, 2), (2, 1, 0))  # (i, j, k[, samples])
    img = nib.Nifti1Image(ours_ijk, vol.affine_ras)
    transform = ornt_transform(io_orientation(vol.affine_ras), io_orientation(ref.affine))
    reoriented = img.as_reoriented(transform)
    assert reoriented.shape[:3] == ref_data.shape[:3]
    np.testing.assert_allclose(reoriented.affine, ref.affine, atol=1e-3, rtol=0)
    ours = np.asanyarray(reoriented.dataobj)
    if linear:
        x, y = ours.astype(np.float64).ravel(), ref_data.astype(np.float64).ravel()
        scale, offset = np.polyfit(x, y, 1)
        assert scale != 0
        np.testing.assert_allclose(scale * x + offset, y, rtol=1e-5, atol=1e-3 * np.ptp(y))
    elif np.issubdtype(ours.dtype, np.floating) or np.issubdtype(ref_data.dtype, np.floating):
        # float32 rescale: the reference rounds slope * value in float32, we in float64
        np.testing.assert_allclose(ours, ref_data, rtol=1e-6, atol=0)
    else:
        np.testing.assert_array_equal(ours, ref_data)


#: (DICOM folder, reference NIfTI) pairs; a 4D reference lists one volume per time point
REFERENCES = [
    pytest.param(
        f"dicom2nifti/tests/data/{d}/001",
        f"dicom2nifti/tests/data/{d}/001_ground_truth.nii.gz",
        id=d,
    )
    for d in (
        "ge/anatomical",
        "generic/compressed",
        "generic/rgb",
        "hitachi/anatomical",
        "hyperfine/anatomical",
        "philips/anatomical",
        "philips_enhanced/anatomical",
        "siemens/anatomical",
        "siemens_multiframe/anatomical",
        # dicom2nifti writes this 2-slice series although the folder is named "failing": two
        # slices are a well-defined volume, so pacsflow accepts it as well
        "failing/slicecount",
    )
]


@pytest.mark.shared_data
@pytest.mark.parametrize(("folder", "ref"), REFERENCES)
def test_matches_dicom2nifti(shared_data: Path, folder: str, ref: str) -> None:
    vol = build_volume(_read_dir(shared_data / DICOM / folder))
    _matches_reference(vol, shared_data / DICOM / ref)


@pytest.mark.shared_data
def test_4d_enhanced_siemens_xa10_matches_dcm2niix(shared_data: Path) -> None:
    # four Enhanced MR files, one time point each (6 frames): split by AcquisitionNumber
    volumes = build_volumes(_read_dir(shared_data / DICOM / "dcm_qa_enh/In/Siemens/XA10"))
    assert len(volumes) == 4
    for t, vol in enumerate(volumes):
        _matches_reference(
            vol, shared_data / DICOM / "dcm_qa_enh/Ref/Siemens_REST1_w_SMS_PF7-8_6.nii", t
        )


@pytest.mark.shared_data
def test_4d_classic_philips_epi_matches_dcm2niix(shared_data: Path) -> None:
    # 27 single-frame files: 9 positions x 3 time points
    folder = shared_data / DICOM / "dcm_qa_philips/In/Magdeburg_2014/fmri"
    volumes = build_volumes(_read_dir(folder))
    assert len(volumes) == 3
    for t, vol in enumerate(volumes):
        _matches_reference(
            vol, shared_data / DICOM / "dcm_qa_philips/Ref/EPI_asc_CLEAR_201.nii", t, linear=True
        )


@pytest.mark.shared_data
def test_enhanced_philips_field_map_matches_dcm2niix(shared_data: Path) -> None:
    # one Enhanced MR file, 64 frames = field map (EffectiveEchoTime 0) + magnitude (1.52 ms)
    # at the same 32 positions, split by echo time. The field map's DICOM rescale is
    # dcm2niix's too, but NIfTI stores scl_slope as float32 (0.2442017 for 0.2442002), so
    # both are compared up to a fitted scale.
    volumes = build_volumes(_read_dir(shared_data / DICOM / "dcm_qa_enh/In/Philips"))
    assert len(volumes) == 2
    refs = ["Philips_WIP_B0_NS_801_e2_fieldmaphz.nii", "Philips_WIP_B0_NS_801_e1.nii"]
    for vol, ref in zip(volumes, refs, strict=True):
        _matches_reference(vol, shared_data / DICOM / "dcm_qa_enh/Ref" / ref, linear=True)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("dcm", "nii"),
    [("12bitUnsigned", "2"), ("12bitUnsigned_0x0F0F", "3"), ("12bitSigned_0x0F0F", "4")],
)
def test_siemens_mosaic_matches_dcm2niix(shared_data: Path, dcm: str, nii: str) -> None:
    """A Siemens MOSAIC (35 slices of 64x64 tiled in 384x384) de-mosaicked from its CSA
    header: dcm2niix's voxels and affine (1e-3 mm)."""
    root = shared_data / DICOM / "dcm_qa_12bit"
    (vol,) = build_volumes([pydicom.dcmread(root / "In" / f"{dcm}.dcm")])
    assert vol.array.shape == (35, 64, 64)
    assert vol.frame_numbers == tuple(range(1, 36))  # tile numbers within the mosaic
    _matches_reference(vol, root / "Ref" / f"{nii}.nii")


@pytest.mark.shared_data
def test_series_of_mosaics_is_one_volume_per_mosaic(shared_data: Path) -> None:
    root = shared_data / DICOM / "dcm_qa_12bit/In"
    # the three files are one object thrice (same SOP Instance UID): refused as duplicates
    _refused(_read_dir(root), "duplicate slice positions")
    # an fMRI-like run: the same mosaic acquired three times is three volumes
    run = []
    for number in (1, 2, 3):
        ds = pydicom.dcmread(root / "12bitUnsigned.dcm")
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{number}"
        ds.AcquisitionNumber = number
        run.append(ds)
    volumes = build_volumes(run[::-1])
    assert [v.array.shape for v in volumes] == [(35, 64, 64)] * 3
    assert [v.sop_instance_uids[0][-2:] for v in volumes] == [".1", ".2", ".3"]


def test_mosaic_without_csa_header_is_refused() -> None:
    datasets = _series([0.0, 1.0, 2.0])
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]
    _refused(datasets, "Siemens MOSAIC without a readable CSA header")


# References not compared, and why:
# - dicom2nifti's gantry-tilted and DTI references are not in the snapshot.


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("folder", "match"),
    [
        ("dicom2nifti/tests/data/failing/notavolume/001", "duplicate slice positions"),
        ("dicom2nifti/tests/data/failing/sliceincrement/001", "gap in slice positions"),
        ("dicom2nifti/tests/data/failing/sliceorientation/001", "mixed orientations"),
        ("dicom-numpy/dupe-positions", "duplicate slice positions"),
        ("dcm_qa_ct/In/GE", r"gantry tilt of 18\.5 degrees"),
    ],
    ids=["notavolume", "sliceincrement", "sliceorientation", "dupe-positions", "ge-tilt"],
)
def test_broken_series_refused(shared_data: Path, folder: str, match: str) -> None:
    _refused(_read_dir(shared_data / DICOM / folder), match)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("folder", "shape", "spacing"),
    [
        ("dcm_qa_ge/In/05_3D_Ax_T1_MP_RAGE_R22", (130, 256, 256), (1.2, 0.9375, 0.9375)),
        ("dcm_qa_xa30/In/5_anat-T1w_acq-tfl", (96, 128, 128), (2.0, 2.0, 2.0)),
        ("dcm_qa_ct/In/Philips/S21570/S2010", (28, 512, 512), (5.0, None, None)),
        ("dcmqi/data/paramaps/pm-example-dcm/701-ADCb500", (20, 256, 256), (3.0, None, None)),
    ],
    ids=["ge-mprage", "xa30-enhanced", "philips-ct", "dcmqi-adc"],
)
def test_real_volumes_without_reference(
    shared_data: Path, folder: str, shape: tuple[int, ...], spacing: tuple[float | None, ...]
) -> None:
    datasets = _read_dir(shared_data / DICOM / folder)
    vol = build_volume(datasets)
    assert vol.array.shape == shape
    for got, want in zip(vol.spacing, spacing, strict=True):
        if want is not None:
            assert got == pytest.approx(want, abs=1e-3)
    assert set(vol.sop_instance_uids) == {ds.SOPInstanceUID for ds in datasets}
    # the affine maps each slice's k to that slice's own ImagePositionPatient
    if len(datasets) == shape[0]:
        by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
        for k, uid in enumerate(vol.sop_instance_uids):
            ipp = [float(v) for v in by_uid[uid].ImagePositionPatient]
            np.testing.assert_allclose(vol.affine @ [0, 0, k, 1], [*ipp, 1], atol=1e-3)
