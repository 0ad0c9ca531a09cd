"""2D tensors (issue #21 section 4): radiographs, mammograms, ultrasound and cine.

Before, every one of these series was refused ("single slice: one frame is not a volume",
"image has no ImagePositionPatient/ImageOrientationPatient", "multi-frame object without
functional groups has no per-frame geometry"). Values are checked against pydicom's own
``pixel_array`` + ``apply_modality_lut``/``apply_voi_lut``/``convert_color_space``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.sequence import Sequence as DicomSequence

from pipeline.config import TensorsConfig, load_config
from pipeline.connectors import FolderSource
from pipeline.crawl import run as crawl_run
from pipeline.deid.stage import run as deid_run
from pipeline.errors import GeometryError
from pipeline.lake import LakePaths, read_table
from pipeline.tensors.decode import decode_frames
from pipeline.tensors.planar import build_planar, is_planar
from pipeline.tensors.stage import load_tensor
from pipeline.tensors.stage import run as tensors_run
from pipeline.tensors.volume import build_volumes
from tests.dicom_factory import make_projection, write

CORPUS = "dicom"


def _planar(ds: Dataset, **cfg: Any) -> Any:
    (image,) = build_planar([ds], [decode_frames(ds)], TensorsConfig(**cfg))
    return image


def _reread(ds: Dataset, tmp_path: Path) -> Dataset:
    return pydicom.dcmread(write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm"))


# --- synthetic cases ---------------------------------------------------------------------------


def test_one_radiograph_was_refused_as_a_volume() -> None:
    """The finding: build_volumes refuses a single radiograph, the planar path takes it."""
    ds = make_projection()
    with pytest.raises(GeometryError):
        build_volumes([ds], [decode_frames(ds)])
    assert is_planar([ds], TensorsConfig())
    image = _planar(ds)
    assert image.kind == "planar"
    assert image.array.shape == (ds.Rows, ds.Columns)
    assert np.array_equal(image.array, ds.pixel_array)


def test_monochrome1_is_inverted_to_its_monochrome2_twin() -> None:
    m1 = make_projection(photometric="MONOCHROME1")
    m2 = make_projection(photometric="MONOCHROME2")
    m2.PixelData = ((2**12 - 1) - m1.pixel_array).astype(np.uint16).tobytes()
    one, two = _planar(m1), _planar(m2)
    assert one.columns["monochrome1_inverted"] is True
    assert two.columns["monochrome1_inverted"] is False
    assert one.columns["PhotometricInterpretation"] == "MONOCHROME1"
    assert np.array_equal(one.array, two.array)
    assert one.array.dtype == m1.pixel_array.dtype


def test_monochrome1_inversion_after_a_window_uses_its_output_range() -> None:
    ds = make_projection(photometric="MONOCHROME1", window=(2000.0, 1000.0))
    reference = apply_voi_lut(ds.pixel_array, ds.copy(), prefer_lut=False)
    image = _planar(ds, voi="window")
    assert image.columns["voi"] == "window"
    assert np.array_equal(image.array, ((0 + 4095) - reference).astype(np.float32))


def test_pixel_spacing_wins_over_imager_pixel_spacing_and_both_are_recorded() -> None:
    both = make_projection(pixel_spacing=(0.15, 0.16), imager_spacing=(0.2, 0.21))
    both.PixelSpacingCalibrationType = "GEOMETRY"
    both.EstimatedRadiographicMagnificationFactor = 1.1
    imager = make_projection(imager_spacing=(0.2, 0.21))
    imager.EstimatedRadiographicMagnificationFactor = 1.25
    neither = make_projection()
    a, b, c = _planar(both), _planar(imager), _planar(neither)
    assert a.spacing == (0.15, 0.16)
    assert a.columns["pixel_spacing_source"] == "PixelSpacing"
    assert a.columns["PixelSpacingCalibrationType"] == "GEOMETRY"
    assert b.spacing == (0.2, 0.21)  # at the detector: not divided by the factor
    assert b.columns["pixel_spacing_source"] == "ImagerPixelSpacing"
    assert b.columns["EstimatedRadiographicMagnificationFactor"] == 1.25
    assert c.spacing is None
    assert c.columns["pixel_spacing_source"] is None


def test_voi_none_keeps_values_and_records_the_window() -> None:
    ds = make_projection(window=(2000.0, 1000.0), rescale=(2.0, -10.0))
    image = _planar(ds)
    assert image.columns["voi"] == "none"
    assert (image.columns["WindowCenter"], image.columns["WindowWidth"]) == (2000.0, 1000.0)
    assert image.rescaled
    assert np.array_equal(image.array, apply_modality_lut(ds.pixel_array, ds))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_window_is_pydicoms(function: str) -> None:
    ds = make_projection(window=(1500.0, 800.0), rescale=(1.0, -100.0))
    ds.VOILUTFunction = function
    rescaled = apply_modality_lut(ds.pixel_array, ds)
    reference = apply_voi_lut(rescaled, ds.copy(), prefer_lut=False).astype(np.float32)
    image = _planar(ds, voi="window")
    assert image.columns["VOILUTFunction"] == function
    assert np.array_equal(image.array, reference)


def test_voi_lut_is_pydicoms() -> None:
    ds = make_projection(window=(1500.0, 800.0))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = [int(v) for v in (np.arange(4096) // 16)]
    ds.VOILUTSequence = DicomSequence([item])
    image = _planar(ds, voi="voi_lut")
    assert image.columns["voi"] == "voi_lut"
    assert np.array_equal(image.array, apply_voi_lut(ds.pixel_array, ds, prefer_lut=True))
    assert _planar(ds, voi="window").columns["voi"] == "window"


def test_for_processing_and_for_presentation_are_kept_apart() -> None:
    raw = make_projection(intent="FOR PROCESSING", number=1)
    shown = make_projection(intent="FOR PRESENTATION", number=2, photometric="MONOCHROME1")
    images = build_planar([shown, raw], [decode_frames(shown), decode_frames(raw)], TensorsConfig())
    assert [i.columns["PresentationIntentType"] for i in images] == [
        "FOR PROCESSING",
        "FOR PRESENTATION",
    ]
    assert [i.sop_uid for i in images] == [raw.SOPInstanceUID, shown.SOPInstanceUID]


def test_view_and_laterality_keep_defined_terms_only() -> None:
    ds = make_projection(modality="MG")
    ds.ViewPosition, ds.ImageLaterality, ds.Laterality = "MLO", "L", "L"
    image = _planar(ds)
    assert (
        image.columns["ViewPosition"],
        image.columns["ImageLaterality"],
        image.columns["Laterality"],
    ) == ("MLO", "L", "L")
    ds.ViewPosition = "DOE JANE"  # free text in a coded attribute never reaches the table
    assert _planar(ds).columns["ViewPosition"] is None


def test_series_with_a_patient_position_stays_a_volume_and_sc_only_when_configured() -> None:
    ct = make_projection(modality="CT")
    assert not is_planar([ct], TensorsConfig())
    sc = make_projection(modality="OT")
    assert not is_planar([sc], TensorsConfig())
    assert is_planar([sc], TensorsConfig(planar_modalities=("OT", "CR")))
    sc.ImagePositionPatient = [0, 0, 0]
    sc.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert is_planar([sc], TensorsConfig(planar_modalities=("OT",)))  # one frame in all
    other = make_projection(modality="OT", number=2)
    other.ImagePositionPatient = [0, 0, 1]
    other.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert not is_planar([sc, other], TensorsConfig(planar_modalities=("OT",)))


def test_colour_ybr_full_and_planar_configuration(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = make_projection(modality="US", samples=3, photometric="YBR_FULL", pixels=ybr)
    image = _planar(_reread(ds, tmp_path))
    assert np.array_equal(image.array, convert_color_space(ybr, "YBR_FULL", "RGB"))
    planar = make_projection(modality="US", samples=3, photometric="RGB", pixels=rgb)
    planar.PlanarConfiguration = 1
    planar.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    image = _planar(_reread(planar, tmp_path))
    assert np.array_equal(image.array, rgb)


def test_cine_keeps_frames_and_frame_time(tmp_path: Path) -> None:
    frames = np.arange(3 * 6 * 5, dtype=np.uint8).reshape(3, 6, 5)
    ds = make_projection(modality="XA", pixels=frames)
    ds.FrameTime = 33.3
    ds.FrameTimeVector = [0, 33.3, 40]
    image = _planar(_reread(ds, tmp_path))
    assert image.kind == "cine"
    assert image.array.shape == (3, 6, 5)
    assert np.array_equal(image.array, frames)
    assert image.columns["FrameTime"] == 33.3
    assert image.columns["FrameTimeVector"] == [0.0, 33.3, 40.0]
    row = image.row()
    assert row["affine"] is None
    assert row["frame_numbers"] == [1, 2, 3]


def test_default_preprocessing_hash_is_unchanged() -> None:
    """voi and planar_modalities enter the hash only when set: existing tensors stay valid."""
    assert "voi" not in TensorsConfig().preprocessing_json()
    assert TensorsConfig().preprocessing_hash() == "c45be7c0c4dc7552"
    assert TensorsConfig(voi="window").preprocessing_hash() != TensorsConfig().preprocessing_hash()


# --- the stage, end to end ---------------------------------------------------------------------


def test_stage_stores_radiographs_and_ultrasound_as_2d_tensors(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    dx = make_projection(photometric="MONOCHROME1", imager_spacing=(0.2, 0.2), series=1)
    dx.ViewPosition = "PA"
    write(dx, archive / "dx.dcm")
    frames = np.arange(2 * 6 * 5, dtype=np.uint8).reshape(2, 6, 5)
    us = make_projection(modality="US", pixels=frames, series=2)
    us.FrameTime = 40
    write(us, archive / "us.dcm")
    cfg = load_config(
        overrides={
            "compute": {"workers": 1},
            "deid": {"allow_burned_in": ["US"]},
        },
        environ={},
    )
    lake = LakePaths(tmp_path / "lake")
    crawl_run(cfg, lake, FolderSource(archive), run_id="c")
    deid_run(cfg, lake, key=b"p" * 32, run_id="d")
    result = tensors_run(cfg, lake, run_id="t")
    rows = {r["tensor_kind"]: r for r in read_table(lake, "tensors").to_pylist()}
    assert result.counts.extra == {"volumes": 2, "refused_series": 0}
    assert set(rows) == {"planar", "cine"}
    planar, cine = rows["planar"], rows["cine"]
    assert planar["status"] == "ok"
    assert planar["shape"] == [dx.Rows, dx.Columns]
    assert planar["spacing"] == [0.2, 0.2]
    assert planar["pixel_spacing_source"] == "ImagerPixelSpacing"
    assert planar["monochrome1_inverted"] is True
    assert planar["ViewPosition"] == "PA"
    assert planar["affine"] is None
    assert np.array_equal(load_tensor(lake, planar["path"]), 4095 - dx.pixel_array)
    assert cine["shape"] == [2, 6, 5]
    assert cine["FrameTime"] == 40.0
    assert np.array_equal(load_tensor(lake, cine["path"]), frames)
    assert dx.SOPInstanceUID not in planar["sop_instance_uids"]  # pseudonyms only
    series = read_table(lake, "series").to_pylist()
    assert all(s["volume_ok"] for s in series)
    # the 2D dataset: channel first, spacing as the affine; the volumes' refuses them
    from pipeline.tensors.dataset import PlanarDataset, TensorDataset, cohort

    df = cohort(lake, sql="SELECT tensor_key FROM tensors WHERE tensor_kind = 'planar'")
    item = PlanarDataset(lake, df, columns=["ViewPosition"])[0]
    assert tuple(item["image"].shape) == (1, dx.Rows, dx.Columns)
    assert item["ViewPosition"] == "PA"
    assert np.array_equal(np.diag(item["image"].affine.numpy()), [0.2, 0.2, 1.0, 1.0])
    cine_item = PlanarDataset(lake, cohort(lake, where="tensor_kind = 'cine'"))[0]
    assert tuple(cine_item["image"].shape) == (1, 2, 6, 5)
    with pytest.raises(ValueError, match="PlanarDataset"):
        TensorDataset(lake, cohort(lake))


# --- the shared corpus -------------------------------------------------------------------------


def _read(shared_data: Path, rel: str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(shared_data / CORPUS / rel)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "rel",
    [
        "highdicom/data/test_files/dx_image.dcm",
        "pydicom-data/data_store/data/RG1_J2KI.dcm",
        "pydicom-data/data_store/data/RG3_J2KR.dcm",
        "pylibjpeg-data/ljdata/ds/JPEGLS/RG2_JLSN.dcm",
        "pylibjpeg-data/ljdata/ds/JPEG2000Lossless/JPEG2KLossless_1s_1f_u_16_16.dcm",
        "pydicom/pydicom/data/test_files/dicomdirtests/77654033/CR1/6154",
    ],
)
def test_corpus_radiographs_match_pydicom(shared_data: Path, rel: str) -> None:
    ds = _read(shared_data, rel)
    assert is_planar([ds], TensorsConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = apply_modality_lut(ds.pixel_array, ds.copy())
        image = _planar(ds)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # inverted over the output range
        assert image.columns["monochrome1_inverted"]
        bits = int(ds.BitsStored)
        lo, hi = (
            (0, 2**bits - 1)
            if ds.PixelRepresentation == 0
            else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        )
        if "RescaleSlope" in ds and "RescaleIntercept" in ds:
            m, c = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            lo, hi = sorted((lo * m + c, hi * m + c))
        reference = ((lo + hi) - reference.astype(np.float64)).astype(reference.dtype)
    if reference.dtype == np.float64:  # a non-integral rescale: stored as float32
        reference = reference.astype(np.float32)
    assert image.array.shape == (ds.Rows, ds.Columns)
    assert np.array_equal(image.array, reference)
    source = image.columns["pixel_spacing_source"]
    if source is not None:
        assert image.spacing == tuple(float(v) for v in ds[source].value)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("rel", "shape", "frame_time"),
    [
        ("pydicom/pydicom/data/test_files/examples_ybr_color.dcm", (30, 240, 320, 3), 33.333),
        ("pydicom-data/data_store/data/OBXXXX1A_rle_2frame.dcm", (2, 600, 800, 3), None),
        ("pydicom-data/data_store/data/OBXXXX1A_rle.dcm", (600, 800, 3), None),
        ("pydicom-data/data_store/data/color-pl.dcm", (120, 256, 3), None),
        ("pydicom-data/data_store/data/US1_J2KI.dcm", (480, 640, 3), None),
        (
            "pylibjpeg-data/ljdata/ds/JPEGLosslessSV1/JPEGLosslessP14SV1_3s_2f_u_08_08.dcm",
            (2, 768, 1024, 3),
            31.9652,
        ),
    ],
)
def test_corpus_ultrasound_matches_pydicom(
    shared_data: Path, rel: str, shape: tuple[int, ...], frame_time: float | None
) -> None:
    ds = _read(shared_data, rel)
    assert is_planar([ds], TensorsConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ds.pixel_array  # pydicom converts YBR to RGB exactly (its default)
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            reference = apply_color_lut(reference, ds)
        image = _planar(ds)
    assert image.array.shape == shape
    assert np.array_equal(image.array, reference)
    assert image.kind == ("cine" if len(shape) == 4 else "planar")
    assert image.columns["FrameTime"] == frame_time


def test_a_series_refused_by_older_rules_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Series refused before a rule change (here: a radiograph, refused as "single slice"
    before 2D tensors existed) must not stay refused forever under the same preprocessing."""
    import pipeline.tensors.stage as stage

    archive = tmp_path / "archive"
    write(make_projection(series=1), archive / "dx.dcm")
    cfg = load_config(overrides={"compute": {"workers": 1}}, environ={})
    lake = LakePaths(tmp_path / "lake")
    crawl_run(cfg, lake, FolderSource(archive), run_id="c")
    deid_run(cfg, lake, key=b"p" * 32, run_id="d")
    with monkeypatch.context() as m:  # the rules before: no 2D tensors
        m.setattr(stage, "VOLUME_RULES", 1)
        m.setattr("pipeline.tensors.planar.is_planar", lambda *a: False)
        first = tensors_run(cfg, lake, run_id="t1")
    assert first.counts.extra == {"volumes": 0, "refused_series": 1}
    # the rules changed: the refusal made under rules 1 no longer holds, the series is tried
    assert tensors_run(cfg, lake, run_id="t2").counts.extra == {"volumes": 1, "refused_series": 0}
    assert tensors_run(cfg, lake, run_id="t3").counts.extra == {"volumes": 0, "refused_series": 0}
    rows = read_table(lake, "tensors").to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok", "refused"]
