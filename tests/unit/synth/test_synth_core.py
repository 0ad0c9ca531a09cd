"""Pure building blocks of ``pipeline.synth``: formatting, UIDs, geometry, phantoms, planning."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian

from pipeline.synth.core import (
    CT_BANDS,
    CT_NOISE_BOUND,
    LESION_LABEL_BASE,
    MR_T1_BANDS,
    MR_T2_BANDS,
    ChestPhantom,
    CTLabel,
    Geometry,
    HeadPhantom,
    MRLabel,
    ValueBand,
    format_ds,
    format_tm,
    render_series,
    synth_uid,
)
from pipeline.synth.names import draw_identity, specific_character_set
from pipeline.synth.plan import plan_archive

CHEST = ChestPhantom(
    origin=(0.0, 0.0, 0.0),
    thorax_length=300.0,
    body_a=160.0,
    body_b=110.0,
    fat=15.0,
    wall=16.0,
    rib_pitch=25.0,
    rib_width=10.0,
    rib_depth=8.0,
    vertebra_radius=17.0,
    lung_hu=-850,
    adipose_hu=-100,
    soft_hu=40,
    bone_hu=700,
)
HEAD = HeadPhantom((0.0, 0.0, 0.0), 74.0, 92.0, 105.0, 5.0, 6.0, 3.0, 4.0)


@pytest.mark.parametrize(
    ("value", "text"),
    [(2.0, "2"), (-0.0, "0"), (0.78125, "0.78125"), (-199.609375, "-199.609375"), (1e-3, "0.001")],
)
def test_format_ds(value: float, text: str) -> None:
    assert format_ds(value) == text
    assert float(text) == value


def test_format_ds_refuses_inexact_long_values() -> None:
    with pytest.raises(ValueError, match="16 characters"):
        format_ds(1 / 3)


def test_format_tm() -> None:
    assert format_tm(0) == "000000.000000"
    assert format_tm(86399.25) == "235959.250000"
    with pytest.raises(ValueError, match="time of day"):
        format_tm(86400)


def test_synth_uid_is_deterministic_valid_and_distinct() -> None:
    uids = {synth_uid("series", i) for i in range(1000)}
    assert len(uids) == 1000
    assert synth_uid("series", 1) == synth_uid("series", 1)
    for uid in list(uids)[:50]:
        assert UID(uid).is_valid
        assert uid.startswith("2.25.")
        assert len(uid) <= 64


def test_value_bands_partition_the_line() -> None:
    for bands in (CT_BANDS, MR_T1_BANDS, MR_T2_BANDS):
        assert bands[0].low is None
        assert bands[-1].high is None
        for lower, upper in itertools.pairwise(bands):
            assert lower.high == upper.low
    values = np.array([-3024, -1000, -850, -100, 40, 80, 700])
    names = [next(b.name for b in CT_BANDS if b.mask(np.array([v]))[0]) for v in values]
    assert names == ["air", "air", "lung", "adipose", "soft_tissue", "lesion", "bone"]
    assert ValueBand("x", None, None).mask(values).all()


def test_axial_geometry_affine_matches_positions() -> None:
    geometry = Geometry.volume(
        rows=4,
        columns=6,
        pixel_spacing=(0.5, 0.75),
        slice_thickness=2.0,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        first_position=(-10.0, -20.0, 30.0),
        slice_step=-2.5,
        slices=5,
    )
    affine = np.asarray(geometry.affine())
    assert geometry.shape == (5, 4, 6)
    for k, frame in enumerate(geometry.frames):
        np.testing.assert_array_equal(affine @ [0, 0, k, 1], [*frame.position, 1])
        x, y, z = geometry.coordinates(k)
        xx, yy, zz = (np.broadcast_to(c, (4, 6)) for c in (x, y, z))
        j, i = 3, 5
        np.testing.assert_array_equal(affine @ [i, j, k, 1], [xx[j, i], yy[j, i], zz[j, i], 1])
    assert affine[2, 2] == -2.5


def test_sagittal_geometry_affine_matches_coordinates() -> None:
    geometry = Geometry.volume(
        rows=3,
        columns=4,
        pixel_spacing=(1.0, 2.0),
        slice_thickness=4.0,
        orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
        first_position=(-40.0, -3.0, 60.0),
        slice_step=-5.0,
        slices=3,
    )
    assert geometry.normal == (-1.0, 0.0, 0.0)
    affine = np.asarray(geometry.affine())
    x, y, z = geometry.coordinates(2)
    assert x == -30.0  # two steps of -5 along -x
    np.testing.assert_array_equal(affine @ [3, 2, 2, 1], [x, np.ravel(y)[3], np.ravel(z)[2], 1])


def test_geometry_rejects_empty_volumes() -> None:
    with pytest.raises(ValueError, match="non-zero step"):
        Geometry.volume(
            rows=2,
            columns=2,
            pixel_spacing=(1.0, 1.0),
            slice_thickness=1.0,
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            first_position=(0.0, 0.0, 0.0),
            slice_step=0.0,
            slices=3,
        )


def test_chest_phantom_anatomy() -> None:
    t = CHEST.thorax_length
    a0 = CHEST.body_a - CHEST.fat - CHEST.wall
    points = {
        "outside": (300.0, 0.0, -0.5 * t),
        "right lung": (-0.44 * a0, -0.05 * 79, -0.47 * t),
        "left lung": (0.44 * a0, -0.05 * 79, -0.47 * t),
        "adipose rim": (0.0, -(CHEST.body_b * 0.94) + 3.0, -0.5 * t),
        "mediastinum": (0.0, -40.0, -0.47 * t),
        "vertebral body": (0.0, 110 * 0.94 - 12 - 60, -0.5 * t - 15),
    }
    x, y, z = (np.array([p[i] for p in points.values()]) for i in range(3))
    labels = dict(zip(points, CHEST.labels(x, y, z, x.shape).tolist(), strict=True))
    assert labels == {
        "outside": CTLabel.AIR,
        "right lung": CTLabel.LUNG,
        "left lung": CTLabel.LUNG,
        "adipose rim": CTLabel.ADIPOSE,
        "mediastinum": CTLabel.SOFT_TISSUE,
        "vertebral body": CTLabel.BONE,
    }


def test_lesion_replaces_lung_only() -> None:
    from pipeline.synth.core import Lesion

    # in the right lung (-x), away from the heart
    centre = (-0.44 * (CHEST.body_a - CHEST.fat - CHEST.wall), 0.0, -0.47 * CHEST.thorax_length)
    phantom = ChestPhantom(**{**CHEST.__dict__, "lesions": (Lesion(centre, 8.0, 80),)})
    grid = np.arange(-12.0, 12.5, 1.0)
    gx, gy, gz = np.meshgrid(grid, grid, grid, indexing="ij")
    labels = phantom.labels(centre[0] + gx, centre[1] + gy, centre[2] + gz, gx.shape)
    inside = gx**2 + gy**2 + gz**2 <= 64
    assert (labels[inside] == LESION_LABEL_BASE).all()
    assert set(np.unique(labels[~inside]).tolist()) == {CTLabel.LUNG}
    assert phantom.value_table()[LESION_LABEL_BASE] == 80


def test_head_phantom_layers() -> None:
    x = np.array([0.0, 73.0, 74.0 - 5 - 3, 74.0 - 5 - 6 - 1, 74.0 - 5 - 6 - 3 - 2, 200.0])
    labels = HEAD.labels(x, 0.0, 0.0, x.shape).tolist()
    assert labels == [
        MRLabel.WHITE_MATTER,
        MRLabel.FAT,
        MRLabel.BONE,
        MRLabel.CSF,
        MRLabel.GRAY_MATTER,
        MRLabel.AIR,
    ]


def _tiny_plan(**kwargs: object) -> object:
    args: dict[str, object] = {
        "patients": 1,
        "seed": 3,
        "ct_slices": 6,
        "rows": 64,
        "columns": 64,
        "small": False,
        "include_mr": True,
        "include_bad": False,
        "syntaxes": (str(ExplicitVRLittleEndian),),
    }
    args.update(kwargs)
    return plan_archive(**args)  # type: ignore[arg-type]


def test_render_series_is_deterministic_with_bounded_noise() -> None:
    plan = _tiny_plan()
    series = next(s for s in plan.series if s.kind == "ct_axial")  # type: ignore[attr-defined]
    first = list(render_series(series))
    again = list(render_series(series))
    for (a, counts_a), (b, counts_b) in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(counts_a, counts_b)
        assert a.shape == (64, 64)
    # noise stays within the bound around the label values
    x, y, z = series.geometry.coordinates(0)
    labels = series.study.phantom.labels(x, y, z, (64, 64))
    stored = first[0][0]
    hu = stored.astype(np.int32) - 1024
    inside = stored != series.padding_value
    clean = np.asarray(series.values)[labels]
    assert np.abs(hu[inside] - clean[inside]).max() <= CT_NOISE_BOUND


def test_plan_is_stable_when_patients_are_added() -> None:
    one = _tiny_plan(patients=1)
    two = _tiny_plan(patients=2)
    uids_one = [s.series_uid for s in one.series]  # type: ignore[attr-defined]
    uids_two = [s.series_uid for s in two.series]  # type: ignore[attr-defined]
    assert uids_two[: len(uids_one)] == uids_one


def test_plan_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="patients"):
        _tiny_plan(patients=0)
    with pytest.raises(ValueError, match="transfer syntax"):
        _tiny_plan(syntaxes=())


def test_identity_is_deterministic() -> None:
    a = draw_identity(np.random.default_rng(1), index=4)
    b = draw_identity(np.random.default_rng(1), index=4)
    assert a == b
    assert a.patient_id.endswith("00004")
    assert len(a.patient_id) == 8
    assert len(a.birth_date) == 8
    assert a.sex in ("F", "M")
    with pytest.raises(ValueError, match="index"):
        draw_identity(np.random.default_rng(1), index=-1)


def test_specific_character_set() -> None:
    assert specific_character_set("Smith^John") == "ISO_IR 100"
    assert specific_character_set("Müller^Jürgen") == "ISO_IR 100"
    assert specific_character_set("Müller^Jürgen", "Łukasik^Paweł") == "ISO_IR 192"


def test_slab_labels_crop_to_the_body_without_changing_labels() -> None:
    from pipeline.synth.core import _slab_labels

    geometry = Geometry.volume(
        rows=48,
        columns=64,
        pixel_spacing=(8.0, 8.0),
        slice_thickness=5.0,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        first_position=(-252.0, -188.0, 40.0),
        slice_step=-25.0,
        slices=16,
    )
    for phantom in (CHEST, HEAD):
        x, y, z = geometry.slab_coordinates(0, 16)
        shape = (16, 48, 64)
        full = phantom.labels(x, y, z, shape)
        np.testing.assert_array_equal(_slab_labels(phantom, x, y, z, shape), full)
        assert full.any()
        assert not full[:, 0, :].any()  # the crop had something to cut


def test_slab_coordinates_match_frame_coordinates() -> None:
    plan = _tiny_plan()
    for series in plan.series:  # type: ignore[attr-defined]
        geometry = series.geometry
        n = len(geometry.frames)
        if geometry.slice_step is None:
            with pytest.raises(ValueError, match="one orientation"):
                geometry.slab_coordinates(0, n)
            continue
        slab = [
            np.broadcast_to(c, (n, geometry.rows, geometry.columns))
            for c in geometry.slab_coordinates(0, n)
        ]
        for k in range(n):
            for axis, c in enumerate(geometry.coordinates(k)):
                np.testing.assert_array_equal(
                    slab[axis][k], np.broadcast_to(c, slab[axis][k].shape)
                )
