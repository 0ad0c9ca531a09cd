"""``pipeline.synth.synthesize`` end to end: files, headers, pixels and ground truth agree.

One module-scoped archive (2 patients, 128x128 CT of 24 slices, MR and bad objects) serves most
tests; determinism and small mode write their own tiny archives.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import config, dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale
from pydicom.uid import UID, ImplicitVRLittleEndian

from pipeline.synth import SynthResult, synthesize
from pipeline.synth._codecs import ALL_SYNTAXES, available_syntaxes
from pipeline.synth.core import IMPLEMENTATION_CLASS_UID, render_series
from pipeline.synth.plan import SMALL_MATRIX, plan_archive, small_instance_count

ARGS: dict[str, Any] = {"patients": 2, "seed": 11, "ct_slices": 24, "rows": 128, "columns": 128}

#: Attributes every image carries, as the modalities we imitate write them.
REQUIRED = (
    "SpecificCharacterSet", "ImageType", "InstanceCreationDate", "InstanceCreationTime",
    "SOPClassUID", "SOPInstanceUID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "AccessionNumber", "Modality",
    "Manufacturer", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "StationName", "StudyDescription", "SeriesDescription", "PerformingPhysicianName",
    "OperatorsName", "ManufacturerModelName", "PatientName", "PatientID", "PatientBirthDate",
    "PatientSex", "PatientAge", "PatientAddress", "BodyPartExamined", "SliceThickness",
    "DeviceSerialNumber", "SoftwareVersions", "ProtocolName", "PatientPosition",
    "StudyInstanceUID", "SeriesInstanceUID", "StudyID", "SeriesNumber", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "PixelSpacing", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth",
    "LossyImageCompression", "PixelData",
)  # fmt: skip
REQUIRED_CT = ("KVP", "XRayTubeCurrent", "RescaleIntercept", "RescaleSlope", "RescaleType")
REQUIRED_CT_AXIAL = ("ConvolutionKernel", "ReconstructionDiameter", "SliceLocation")
REQUIRED_MR = (
    "MagneticFieldStrength", "EchoTime", "RepetitionTime", "SequenceName", "ScanningSequence",
    "SequenceVariant", "MRAcquisitionType", "SpacingBetweenSlices", "ImagingFrequency",
)  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthResult, dict[str, Any]]:
    out = tmp_path_factory.mktemp("synth") / "archive"
    result = synthesize(out, **ARGS)
    truth = json.loads(result.ground_truth.read_text(encoding="utf-8"))
    return result, truth


@pytest.fixture
def strict_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydicom raises on any invalid value it reads (restored after the test)."""
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)


def _read(root: Path, path: str, series: dict[str, Any]) -> Dataset:
    if series["part10"]:
        return dcmread(root / path)
    ds = dcmread(root / path, force=True)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def _volume(root: Path, series: dict[str, Any]) -> np.ndarray:
    frames = []
    for path in series["files"]:
        ds = _read(root, path, series)
        frames.append(apply_rescale(ds.pixel_array, ds) if "RescaleSlope" in ds else ds.pixel_array)
    return np.stack(frames)


def _band(values: np.ndarray, band: dict[str, Any]) -> np.ndarray:
    mask = np.ones(values.shape, dtype=bool)
    if band["low"] is not None:
        mask &= values >= band["low"]
    if band["high"] is not None:
        mask &= values < band["high"]
    return mask


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _iter_series(truth: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from truth["series"]


# --------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------


def test_result_matches_ground_truth_and_disk(archive: tuple[SynthResult, dict[str, Any]]) -> None:
    result, truth = archive
    counts = truth["counts"]
    assert result.n_patients == counts["patients"] == 2
    assert result.n_studies == counts["studies"] == len(truth["studies"])
    assert result.n_series == counts["series"] == len(truth["series"])
    assert result.n_instances == counts["instances"]
    assert result.n_bad == counts["bad_objects"] == len(truth["bad_objects"]) >= 4
    listed = {f for s in truth["series"] for f in s["files"]} | {
        b["path"] for b in truth["bad_objects"]
    }
    on_disk = set(_digests(result.out)) - {"ground_truth.json"}
    assert on_disk == listed
    assert result.bytes_written == sum(
        p.stat().st_size for p in result.out.rglob("*") if p.is_file()
    )
    assert truth["schema_version"] == 1
    assert truth["seed"] == ARGS["seed"]
    for patient in truth["patients"]:
        assert 1 <= len(patient["studies"]) <= 3


def test_archive_layout_is_hospital_like_and_non_identifying(
    archive: tuple[SynthResult, dict[str, Any]],
) -> None:
    _, truth = archive
    folder = re.compile(r"^P\d{4}/ST\d{2}/SE\d{3}$")
    names = set()
    for series in truth["series"]:
        assert folder.match(series["path"]), series["path"]
        for path in series["files"]:
            assert path.startswith(series["path"] + "/")
            names.add(Path(path).suffix)
    assert len(names) >= 2, "file names should vary in style"
    identifiers = {p["PatientID"] for p in truth["patients"]} | {
        part for p in truth["patients"] for part in p["PatientName"].split("^") if len(part) > 2
    }
    paths = [f for s in truth["series"] for f in s["files"]]
    assert not [p for p in paths for ident in identifiers if ident in p]


def test_series_mix(archive: tuple[SynthResult, dict[str, Any]]) -> None:
    _, truth = archive
    kinds = [s["kind"] for s in truth["series"]]
    assert {"ct_scout", "ct_axial"} <= set(kinds)
    assert any(k.startswith("mr_") for k in kinds)
    for series in truth["series"]:
        if series["kind"] == "ct_axial":
            assert series["shape"] == [ARGS["ct_slices"], ARGS["rows"], ARGS["columns"]]
        if series["Modality"] == "MR":
            assert 20 <= series["n_instances"] <= 40
    studies = {st["StudyInstanceUID"]: st for st in truth["studies"]}
    for patient in truth["patients"]:
        dates = [studies[uid]["StudyDate"] for uid in patient["studies"]]
        assert dates == sorted(dates)
        assert len(set(dates)) == len(dates)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("strict_reading")
def test_every_valid_instance_reads_strictly(archive: tuple[SynthResult, dict[str, Any]]) -> None:
    result, truth = archive
    for series in truth["series"]:
        for index, path in enumerate(series["files"]):
            ds = _read(result.out, path, series)
            for elem in ds.iterall():
                _ = elem.value
            assert ds.SOPInstanceUID == series["sop_instance_uids"][index]
            assert ds.SeriesInstanceUID == series["SeriesInstanceUID"]
            assert ds.StudyInstanceUID == series["StudyInstanceUID"]
            assert ds.InstanceNumber == index + 1
            assert ds.pixel_array.shape == tuple(series["shape"][1:])
            if series["part10"]:
                meta = ds.file_meta
                assert meta.TransferSyntaxUID == series["TransferSyntaxUID"]
                assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
                assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
                assert meta.ImplementationVersionName


def test_headers_are_complete(archive: tuple[SynthResult, dict[str, Any]]) -> None:
    result, truth = archive
    for series in truth["series"]:
        ds = _read(result.out, series["files"][0], series)
        wanted = list(REQUIRED)
        if series["Modality"] == "CT":
            wanted += REQUIRED_CT
        if series["kind"] == "ct_axial":
            wanted += REQUIRED_CT_AXIAL
        if series["Modality"] == "MR":
            wanted += REQUIRED_MR
        missing = [kw for kw in wanted if kw not in ds or ds[kw].is_empty]
        assert not missing, (series["path"], missing)
        assert re.fullmatch(r"\d{3}Y", ds.PatientAge)
        assert ds.LossyImageCompression == "00"
        if series["kind"] == "ct_axial":
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert 1.25 <= float(ds.SliceThickness) <= 3.5
            assert ds.RescaleIntercept == -1024
            assert ds.RescaleSlope == 1
        # the vendor's private block holds the patient's name in free text
        (phi,) = series["private_phi"]
        tag = int(phi["tag"], 16)
        creator_tag = (tag & 0xFFFF0000) | ((tag >> 8) & 0xFF)
        creator, text = ds[creator_tag].value, ds[tag].value
        if isinstance(text, bytes):  # implicit VR: pydicom cannot know a private VR (UN)
            encoding = "utf-8" if ds.SpecificCharacterSet == "ISO_IR 192" else "latin-1"
            text = text.decode(encoding)
        assert creator == phi["creator"]
        assert str(ds.PatientName) in text


def test_character_sets_cover_the_names(archive: tuple[SynthResult, dict[str, Any]]) -> None:
    result, truth = archive
    for series in truth["series"]:
        ds = _read(result.out, series["files"][0], series)
        assert ds.SpecificCharacterSet in ("ISO_IR 100", "ISO_IR 192")
        study = next(s for s in truth["studies"] if s["StudyInstanceUID"] == ds.StudyInstanceUID)
        patient = next(p for p in truth["patients"] if p["PatientID"] == ds.PatientID)
        assert ds.SpecificCharacterSet == study["SpecificCharacterSet"]
        assert str(ds.PatientName) == patient["PatientName"]


# --------------------------------------------------------------------------------------------
# pixels and ground truth
# --------------------------------------------------------------------------------------------


def test_every_transfer_syntax_appears_and_decodes_losslessly(
    archive: tuple[SynthResult, dict[str, Any]],
) -> None:
    result, truth = archive
    usable, unavailable = available_syntaxes(((128, 128),))
    used = {c["uid"] for c in truth["codecs"]["used"]}
    assert used == set(usable)
    assert {c["uid"] for c in truth["codecs"]["unavailable"]} == set(unavailable)
    assert set(usable) | set(unavailable) == set(ALL_SYNTAXES)
    # the same plan, rendered again, equals what every file decodes to
    plan = plan_archive(
        **ARGS, small=False, include_mr=True, include_bad=True, syntaxes=tuple(usable)
    )
    assert [p.series_uid for p in plan.series] == [s["SeriesInstanceUID"] for s in truth["series"]]
    for series_plan, series in zip(plan.series, truth["series"], strict=True):
        for (expected, _), path in zip(render_series(series_plan), series["files"], strict=True):
            decoded = _read(result.out, path, series).pixel_array
            assert decoded.dtype == expected.dtype, path
            np.testing.assert_array_equal(decoded, expected, err_msg=path)


def test_ground_truth_volumes_match_thresholded_voxels(
    archive: tuple[SynthResult, dict[str, Any]],
) -> None:
    result, truth = archive
    n_lesions = 0
    for series in truth["series"]:
        if series["affine"] is None:
            assert series["frames"]
            assert series["tissues"] is None
            continue
        values = _volume(result.out, series)
        assert list(values.shape) == series["shape"]
        bands = {b["name"]: b for b in series["value_bands"]}
        voxel_ml = series["voxel_volume_ml"]
        dz, dr, dc = series["spacing_mm"]
        assert voxel_ml == pytest.approx(dz * dr * dc / 1000)
        for name, tissue in series["tissues"].items():
            voxels = int(_band(values, bands[name]).sum())
            assert voxels == tissue["voxels"] > 0, (series["path"], name)
            assert tissue["volume_ml"] == pytest.approx(voxels * voxel_ml)
        if series["Modality"] == "CT":
            assert set(series["tissues"]) == {"lung", "adipose", "soft_tissue", "bone"}
        if not series["lesions"]:
            continue
        lesion_mask = _band(values, bands["lesion"])
        assert lesion_mask.sum() == sum(lesion["voxels"] for lesion in series["lesions"])
        affine = np.asarray(series["affine"])
        k, j, i = np.nonzero(lesion_mask)
        points = (affine @ np.stack([i, j, k, np.ones_like(i)]).astype(float))[:3].T
        for lesion in series["lesions"]:
            n_lesions += 1
            distance = np.linalg.norm(points - np.asarray(lesion["centre_mm"]), axis=1)
            assert int((distance <= lesion["radius_mm"] + 1e-6).sum()) == lesion["voxels"] > 0
            assert lesion["volume_ml"] == pytest.approx(lesion["voxels"] * voxel_ml)
            # sampling a sphere of >= 1.5 voxels radius: within 20% of the analytic volume
            assert lesion["volume_ml"] == pytest.approx(lesion["analytic_volume_ml"], rel=0.2)
    assert n_lesions >= 1


@pytest.mark.usefixtures("strict_reading")
def test_affine_matches_the_headers(archive: tuple[SynthResult, dict[str, Any]]) -> None:
    result, truth = archive
    for series in truth["series"]:
        if series["affine"] is None:
            continue
        affine = np.asarray(series["affine"])
        for k, path in enumerate(series["files"]):
            ds = _read(result.out, path, series)
            position = [float(v) for v in ds.ImagePositionPatient]
            np.testing.assert_allclose(affine @ [0, 0, k, 1], [*position, 1], atol=1e-9)
            row, col = np.asarray(ds.ImageOrientationPatient, dtype=float).reshape(2, 3)
            dr, dc = (float(v) for v in ds.PixelSpacing)
            np.testing.assert_allclose(affine[:3, 0], row * dc, atol=1e-12)
            np.testing.assert_allclose(affine[:3, 1], col * dr, atol=1e-12)


def test_bad_objects_fail_as_listed(archive: tuple[SynthResult, dict[str, Any]]) -> None:
    result, truth = archive
    kinds = {b["kind"] for b in truth["bad_objects"]}
    assert {"truncated", "not_dicom", "missing_attribute", "empty"} <= kinds
    for bad in truth["bad_objects"]:
        path = result.out / bad["path"]
        assert path.stat().st_size == bad["bytes"]
        if bad["kind"] in ("empty", "not_dicom"):
            with pytest.raises(InvalidDicomError):
                dcmread(path)
        elif bad["kind"] == "truncated":
            ds = dcmread(path)  # the header is intact ...
            with pytest.raises(ValueError, match="less than expected"):
                _ = ds.pixel_array  # ... the pixel data is cut short
        elif bad["kind"] == "missing_attribute":
            ds = dcmread(path)
            assert bad["missing"]
            for keyword in bad["missing"]:
                assert keyword not in ds
                assert (
                    keyword != "SOPInstanceUID" or "MediaStorageSOPInstanceUID" not in ds.file_meta
                )
        else:  # pragma: no cover
            pytest.fail(f"unknown kind {bad['kind']}")


def test_no_preamble_series_is_valid_but_bare(archive: tuple[SynthResult, dict[str, Any]]) -> None:
    result, truth = archive
    (oddity,) = truth["oddities"]
    assert oddity["kind"] == "no_preamble"
    series = next(s for s in truth["series"] if s["SeriesInstanceUID"] == oddity["series_uid"])
    assert series["TransferSyntaxUID"] == ImplicitVRLittleEndian
    assert not series["part10"]
    for path in series["files"]:
        data = (result.out / path).read_bytes()
        assert data[128:132] != b"DICM"
        assert data[:4] == b"\x08\x00\x05\x00"
        with pytest.raises(InvalidDicomError):
            dcmread(result.out / path)


# --------------------------------------------------------------------------------------------
# determinism, small mode, arguments
# --------------------------------------------------------------------------------------------

TINY: dict[str, Any] = {"patients": 2, "seed": 5, "ct_slices": 8, "rows": 64, "columns": 64}


def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path: Path) -> None:
    first = synthesize(tmp_path / "a", **TINY)
    second = synthesize(tmp_path / "b", **TINY)
    parallel = synthesize(tmp_path / "c", **TINY, workers=2)
    digests = _digests(first.out)
    assert len(digests) == first.n_instances + first.n_bad + 1
    assert _digests(second.out) == digests
    assert _digests(parallel.out) == digests


def test_another_seed_gives_another_archive(tmp_path: Path) -> None:
    a = json.loads(synthesize(tmp_path / "a", **TINY).ground_truth.read_text(encoding="utf-8"))
    b = json.loads(
        synthesize(tmp_path / "b", **{**TINY, "seed": 6}).ground_truth.read_text(encoding="utf-8")
    )
    uids_a = {s["SeriesInstanceUID"] for s in a["series"]}
    uids_b = {s["SeriesInstanceUID"] for s in b["series"]}
    assert not uids_a & uids_b
    assert a["patients"] != b["patients"]


def test_small_mode_has_a_predictable_size(tmp_path: Path) -> None:
    written: list[int] = []
    result = synthesize(
        tmp_path / "small",
        patients=3,
        ct_slices=20,
        small=True,
        include_bad=False,
        progress=written.append,
    )
    expected = small_instance_count(3, ct_slices=20)
    assert expected == 3 * (2 + 20 + 78)
    assert result.n_instances == expected == sum(written)
    assert result.n_bad == 0
    assert small_instance_count(500) == 100_000
    truth = json.loads(result.ground_truth.read_text(encoding="utf-8"))
    assert not truth["bad_objects"]
    assert not truth["oddities"]
    assert len(truth["studies"]) == 6
    assert len(truth["series"]) == 3 * 5
    for series in truth["series"]:
        assert series["shape"][1:] == [SMALL_MATRIX, SMALL_MATRIX]
        ds = dcmread(result.out / series["files"][-1])
        assert (ds.Rows, ds.Columns) == (SMALL_MATRIX, SMALL_MATRIX)
        assert "PatientAddress" in ds
        assert "InstitutionName" in ds
        ds.pixel_array  # noqa: B018 - decodes


def test_ct_only_archive(tmp_path: Path) -> None:
    result = synthesize(tmp_path / "ct", **{**TINY, "patients": 1}, include_mr=False)
    truth = json.loads(result.ground_truth.read_text(encoding="utf-8"))
    assert {s["Modality"] for s in truth["series"]} == {"CT"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patients": 0}, "patients"),
        ({"seed": -1}, "seed"),
        ({"ct_slices": 1}, "ct_slices"),
        ({"rows": 4}, "rows"),
        ({"columns": 5000}, "columns"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthesize(tmp_path / "x", **{"patients": 1, **kwargs})
    assert not (tmp_path / "x").exists()


def test_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="not an empty folder"):
        synthesize(tmp_path, patients=1)


def test_transfer_syntax_names(archive: tuple[SynthResult, dict[str, Any]]) -> None:
    _, truth = archive
    for series in truth["series"]:
        assert series["transfer_syntax"] == UID(series["TransferSyntaxUID"]).name
