"""Pure building blocks of the synthetic archive: geometry, phantoms, pixel values and headers.

Nothing here touches the file system. :mod:`pipeline.synth.plan` decides what the archive holds
(a tree of :class:`PatientPlan`, :class:`StudyPlan` and :class:`SeriesPlan`), this module turns
one :class:`SeriesPlan` into pixel frames (:func:`render_series`) and DICOM headers
(:func:`series_header`, :func:`file_meta`, :func:`instance_elements`), and
:mod:`pipeline.synth.stage` writes them.

Conventions
-----------
- Patient coordinates are DICOM LPS millimetres (x to the patient's left, y to posterior, z to
  head).
- A volume's affine maps ``(i, j, k, 1)`` to LPS, where ``i`` is the column index, ``j`` the row
  index and ``k`` the index of the instance in InstanceNumber order (which is the order of the
  ``files`` list in the ground truth); the array shape is ``(slices, rows, columns)``.
- Every geometric quantity (spacing, positions, offsets) is a multiple of 1/512 mm, so sums are
  exact in binary floating point and the written decimal strings are short and exact: the
  phantom is sampled at exactly the coordinates the headers state.
- Pixel values are drawn from a label map plus bounded noise (at most :data:`CT_NOISE_BOUND`
  HU or :data:`MR_NOISE_BOUND`), so thresholding the decoded values with the value bands in the
  ground truth recovers every label's voxel count exactly.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, MRImageStorage

from pipeline.synth.names import Identity, Institution

logger = logging.getLogger(__name__)

__all__ = [
    "CT_BANDS",
    "CT_NOISE_BOUND",
    "CT_TISSUES",
    "GENERATOR_VERSION",
    "IMPLEMENTATION_CLASS_UID",
    "INSTANCE_TAGS",
    "LESION_LABEL_BASE",
    "MR_NOISE_BOUND",
    "MR_T1_BANDS",
    "MR_T1_VALUES",
    "MR_T2_BANDS",
    "MR_T2_VALUES",
    "MR_TISSUES",
    "SCHEMA_VERSION",
    "CTLabel",
    "ChestPhantom",
    "Frame",
    "Geometry",
    "HeadPhantom",
    "Lesion",
    "MRLabel",
    "PatientPlan",
    "SeriesKind",
    "SeriesPlan",
    "StudyPlan",
    "ValueBand",
    "Vendor",
    "file_meta",
    "format_ds",
    "format_tm",
    "instance_elements",
    "lesion_volumes",
    "render_series",
    "series_header",
    "sop_instance_uid",
    "synth_uid",
    "voxel_volume_ml",
]

#: Version of the generator; part of the ground truth and of every UID's entropy.
GENERATOR_VERSION = "1.0.0"
#: Version of the ``ground_truth.json`` layout.
SCHEMA_VERSION = 1

_UID_NAMESPACE = uuid.UUID("5b0f3c1e-8a47-4d0e-9d6b-71c2a4e0f9a3")

#: Implementation Class UID written in every file meta (a fixed ``2.25`` UID of the generator).
IMPLEMENTATION_CLASS_UID = "2.25." + str(
    uuid.uuid5(_UID_NAMESPACE, f"pacsflow-synth-implementation-{GENERATOR_VERSION}").int
)

#: Largest absolute noise added to a CT voxel, in HU.
CT_NOISE_BOUND = 9
#: Largest absolute noise added to an MR voxel, in stored units.
MR_NOISE_BOUND = 24

_SLAB_VOXELS = 1 << 20  # voxels rendered per vectorised step


def synth_uid(*parts: object) -> str:
    """Return a deterministic ``2.25.`` UID derived from ``parts``.

    The integer is a name-based (version 5) UUID of the parts joined by ``|``, so the same
    parts always give the same UID and different parts practically never collide.

    Parameters
    ----------
    *parts:
        Anything with a stable ``str``.

    Returns
    -------
    str
        A UID of at most 44 characters.

    Examples
    --------
    >>> synth_uid("study", 1) == synth_uid("study", 1)
    True
    >>> synth_uid("study", 1).startswith("2.25.")
    True
    """
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, "|".join(map(str, parts))).int)


def sop_instance_uid(series_uid: str, index: int) -> str:
    """Return the SOPInstanceUID of instance ``index`` (0-based) of a series.

    Parameters
    ----------
    series_uid:
        The series' SeriesInstanceUID.
    index:
        0-based instance index.

    Returns
    -------
    str
        A deterministic ``2.25.`` UID.
    """
    return synth_uid("sop", series_uid, index)


def format_ds(value: float) -> str:
    """Format ``value`` as a DICOM DS string without losing precision.

    Parameters
    ----------
    value:
        A finite number whose shortest ``repr`` fits 16 characters.

    Returns
    -------
    str
        The decimal string (``"-0"`` becomes ``"0"``, ``"2.0"`` becomes ``"2"``).

    Raises
    ------
    ValueError
        If the exact decimal form is longer than DS allows (16 characters).

    Examples
    --------
    >>> format_ds(-199.609375)
    '-199.609375'
    >>> format_ds(2.0)
    '2'
    """
    text = repr(float(value))
    if text.endswith(".0"):
        text = text[:-2]
    if text == "-0":
        text = "0"
    if len(text) > 16 or "e" in text or "n" in text:
        raise ValueError(f"{value!r} has no exact DS form of at most 16 characters")
    return text


def format_tm(seconds: float) -> str:
    """Format seconds since midnight as a DICOM TM ``HHMMSS.FFFFFF``.

    Parameters
    ----------
    seconds:
        Seconds since midnight, in ``[0, 86400)``.

    Returns
    -------
    str
        The TM string with microseconds.

    Raises
    ------
    ValueError
        If ``seconds`` is outside one day.

    Examples
    --------
    >>> format_tm(3723.5)
    '010203.500000'
    """
    if not 0 <= seconds < 86400:
        raise ValueError(f"{seconds} s is not a time of day")
    micro = round(seconds * 1_000_000)
    h, rest = divmod(micro, 3_600_000_000)
    m, rest = divmod(rest, 60_000_000)
    s, us = divmod(rest, 1_000_000)
    return f"{h:02d}{m:02d}{s:02d}.{us:06d}"


# --------------------------------------------------------------------------------------------
# labels and value bands
# --------------------------------------------------------------------------------------------


class CTLabel(IntEnum):
    """Labels of the chest phantom; lesion ``n`` (0-based) has label ``LESION_LABEL_BASE + n``."""

    AIR = 0
    LUNG = 1
    ADIPOSE = 2
    SOFT_TISSUE = 3
    BONE = 4


class MRLabel(IntEnum):
    """Labels of the head phantom."""

    AIR = 0
    FAT = 1
    BONE = 2
    CSF = 3
    GRAY_MATTER = 4
    WHITE_MATTER = 5


#: First label of the chest phantom's lesions.
LESION_LABEL_BASE = 10

#: Ground-truth tissue name of each chest label.
CT_TISSUES: dict[int, str] = {
    CTLabel.LUNG: "lung",
    CTLabel.ADIPOSE: "adipose",
    CTLabel.SOFT_TISSUE: "soft_tissue",
    CTLabel.BONE: "bone",
}
#: Ground-truth tissue name of each head label.
MR_TISSUES: dict[int, str] = {
    MRLabel.FAT: "fat",
    MRLabel.BONE: "bone",
    MRLabel.CSF: "csf",
    MRLabel.GRAY_MATTER: "gray_matter",
    MRLabel.WHITE_MATTER: "white_matter",
}


@dataclass(frozen=True)
class ValueBand:
    """A half-open interval ``[low, high)`` of modality values (HU for CT) for one class.

    ``None`` stands for an open end.
    """

    name: str
    low: float | None
    high: float | None

    def mask(self, values: NDArray[np.floating] | NDArray[np.integer]) -> NDArray[np.bool_]:
        """Return where ``values`` fall in the band.

        Parameters
        ----------
        values:
            Modality values (after Rescale Slope/Intercept).

        Returns
        -------
        numpy.ndarray
            A boolean array shaped like ``values``.
        """
        out = np.ones(np.shape(values), dtype=bool)
        if self.low is not None:
            out &= values >= self.low
        if self.high is not None:
            out &= values < self.high
        return out


#: HU bands of the chest phantom: a voxel's class is the band its HU falls in.
CT_BANDS: tuple[ValueBand, ...] = (
    ValueBand("air", None, -950),
    ValueBand("lung", -950, -500),
    ValueBand("adipose", -500, -30),
    ValueBand("soft_tissue", -30, 52),
    ValueBand("lesion", 52, 300),
    ValueBand("bone", 300, None),
)
#: Signal of each head label in T1-weighted series (air is 0).
MR_T1_VALUES: dict[int, int] = {
    MRLabel.FAT: 900,
    MRLabel.BONE: 80,
    MRLabel.CSF: 220,
    MRLabel.GRAY_MATTER: 460,
    MRLabel.WHITE_MATTER: 660,
}
#: Signal of each head label in T2-weighted series (air is 0).
MR_T2_VALUES: dict[int, int] = {
    MRLabel.FAT: 1050,
    MRLabel.BONE: 80,
    MRLabel.CSF: 1600,
    MRLabel.GRAY_MATTER: 760,
    MRLabel.WHITE_MATTER: 480,
}

#: Signal bands of the T1-weighted head phantom.
MR_T1_BANDS: tuple[ValueBand, ...] = (
    ValueBand("air", None, 40),
    ValueBand("bone", 40, 150),
    ValueBand("csf", 150, 340),
    ValueBand("gray_matter", 340, 560),
    ValueBand("white_matter", 560, 780),
    ValueBand("fat", 780, None),
)
#: Signal bands of the T2-weighted head phantom.
MR_T2_BANDS: tuple[ValueBand, ...] = (
    ValueBand("air", None, 40),
    ValueBand("bone", 40, 280),
    ValueBand("white_matter", 280, 620),
    ValueBand("gray_matter", 620, 905),
    ValueBand("fat", 905, 1325),
    ValueBand("csf", 1325, None),
)


# --------------------------------------------------------------------------------------------
# phantoms
# --------------------------------------------------------------------------------------------

Coordinate = float | NDArray[np.float64]


def _inside_ellipse(
    u: Coordinate, v: Coordinate, a: Coordinate, b: Coordinate
) -> NDArray[np.bool_]:
    return np.asarray((u / a) ** 2 + (v / b) ** 2 <= 1.0)


def _inside_ellipsoid(
    u: Coordinate, v: Coordinate, w: Coordinate, a: float, b: float, c: float
) -> NDArray[np.bool_]:
    return np.asarray((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2 <= 1.0)


def _assign(labels: NDArray[np.uint8], mask: NDArray[np.bool_], value: int) -> None:
    if mask.ndim == 0:
        if bool(mask):
            labels[...] = value
        return
    if mask.shape != labels.shape:
        mask = np.broadcast_to(mask, labels.shape)
    labels[mask] = value


@dataclass(frozen=True)
class Lesion:
    """A spherical lesion: centre in patient coordinates (mm), radius (mm), value (HU)."""

    centre: tuple[float, float, float]
    radius: float
    value: int


@dataclass(frozen=True)
class ChestPhantom:
    """An anatomical chest: body ellipse with adipose rim, lungs, heart, trachea, ribs, spine.

    Coordinates are relative to ``origin`` (patient LPS mm of the body axis at the thoracic
    inlet); the thorax spans ``thorax_length`` mm below it. Labels are :class:`CTLabel` values
    and ``LESION_LABEL_BASE + n`` for lesion ``n``; a lesion only replaces lung.

    Attributes
    ----------
    origin:
        Patient coordinates of the body axis at the top of the thorax.
    thorax_length:
        Cranio-caudal extent of the thorax (mm).
    body_a, body_b:
        Outer semi-axes of the body cross-section, left-right and antero-posterior (mm).
    fat:
        Thickness of the subcutaneous adipose rim (mm).
    wall:
        Thickness of the chest wall (muscle and ribs) inside the rim; the lungs stay inside it.
    rib_pitch, rib_width, rib_depth:
        Cranio-caudal period and width of the ribs, and their radial depth (mm).
    vertebra_radius:
        Radius of the vertebral bodies (mm).
    lung_hu, adipose_hu, soft_hu, bone_hu:
        Tissue values (HU) before noise.
    lesions:
        The lesions, all inside the lungs.
    """

    origin: tuple[float, float, float]
    thorax_length: float
    body_a: float
    body_b: float
    fat: float
    wall: float
    rib_pitch: float
    rib_width: float
    rib_depth: float
    vertebra_radius: float
    lung_hu: int
    adipose_hu: int
    soft_hu: int
    bone_hu: int
    lesions: tuple[Lesion, ...] = ()

    def value_table(self) -> tuple[int, ...]:
        """Return the HU of each label (index = label), lesions included."""
        table = [-1000] * (LESION_LABEL_BASE + len(self.lesions))
        table[CTLabel.LUNG] = self.lung_hu
        table[CTLabel.ADIPOSE] = self.adipose_hu
        table[CTLabel.SOFT_TISSUE] = self.soft_hu
        table[CTLabel.BONE] = self.bone_hu
        for n, lesion in enumerate(self.lesions):
            table[LESION_LABEL_BASE + n] = lesion.value
        return tuple(table)

    def _scale(self, w: Coordinate) -> Coordinate:
        # body cross-section: widest mid-thorax, narrowing to the neck above the inlet
        t = self.thorax_length
        wc = np.clip(w, -1.3 * t, None)
        chest = 1.0 - 0.06 * ((wc + t / 2) / (t / 2)) ** 2
        neck = np.maximum(0.5, 0.94 - 0.012 * wc)
        out = np.where(wc > 0, neck, chest)
        return out if np.ndim(out) else float(out)

    def support(self, x: Coordinate, y: Coordinate, z: Coordinate) -> NDArray[np.bool_]:
        """Return where the body is (outside it every label is air); broadcasts like x, y, z."""
        ox, oy, oz = self.origin
        s = self._scale(z - oz)
        return _inside_ellipse(x - ox, y - oy, self.body_a * s, self.body_b * s)

    def labels(
        self, x: Coordinate, y: Coordinate, z: Coordinate, shape: tuple[int, ...]
    ) -> NDArray[np.uint8]:
        """Return the label of every point.

        Parameters
        ----------
        x, y, z:
            Patient coordinates (mm): scalars or arrays that broadcast to ``shape``.
        shape:
            Shape of the result.

        Returns
        -------
        numpy.ndarray
            ``uint8`` labels of ``shape``.
        """
        ox, oy, oz = self.origin
        u, v, w = x - ox, y - oy, z - oz
        t = self.thorax_length
        s = self._scale(w)
        a_out, b_out = self.body_a * s, self.body_b * s
        a_in, b_in = a_out - self.fat, b_out - 0.8 * self.fat
        a_wall, b_wall = a_in - self.wall, b_in - self.wall
        # fixed-size organs use the unscaled wall
        a0 = self.body_a - self.fat - self.wall
        b0 = self.body_b - 0.8 * self.fat - self.wall

        labels = np.zeros(shape, dtype=np.uint8)
        body = _inside_ellipse(u, v, a_out, b_out)
        _assign(labels, body, CTLabel.ADIPOSE)
        _assign(labels, _inside_ellipse(u, v, a_in, b_in), CTLabel.SOFT_TISSUE)

        in_wall = _inside_ellipse(u, v, a_wall, b_wall)
        lung_c = (0.44 * a0, -0.05 * b0, -0.47 * t)
        lung_r = (0.36 * a0, 0.62 * b0, 0.44 * t)
        for side in (-1.0, 1.0):
            lung = _inside_ellipsoid(u - side * lung_c[0], v - lung_c[1], w - lung_c[2], *lung_r)
            _assign(labels, lung & in_wall, CTLabel.LUNG)
        heart = _inside_ellipsoid(
            u - 0.18 * a0, v + 0.30 * b0, w + 0.62 * t, 0.33 * a0, 0.42 * b0, 0.17 * t
        )
        _assign(labels, heart, CTLabel.SOFT_TISSUE)

        # spine: vertebral bodies with discs, canal, arch and spinous process
        vr = self.vertebra_radius
        y_vb = b_in - 60.0
        y_canal = y_vb + vr + 8.0
        r_vb2 = u**2 + (v - y_vb) ** 2
        r_canal2 = u**2 + (v - y_canal) ** 2
        disc = np.asarray(np.mod(w, 30.0) < 6.0)
        vb = np.asarray(r_vb2 <= vr**2)
        trachea = np.asarray((u**2 + (v - (y_vb - vr - 22.0)) ** 2 <= 64.0) & (w > -0.28 * t))
        _assign(labels, trachea, CTLabel.AIR)

        rib_band = _inside_ellipse(u, v, a_in - 3.0, b_in - 3.0) & ~_inside_ellipse(
            u, v, a_in - 3.0 - self.rib_depth, b_in - 3.0 - self.rib_depth
        )
        rib_z = (np.mod(w, self.rib_pitch) < self.rib_width) & (w > -0.92 * t) & (w < -0.04 * t)
        anterior_gap = (v < -0.55 * b_in) & (np.abs(u) < 0.45 * a_in)
        ribs = rib_band & rib_z & ~anterior_gap
        sternum = (
            (np.abs(u) <= 14.0)
            & (v >= -b_in + 3.0)
            & (v <= -b_in + 13.0)
            & (w > -0.72 * t)
            & (w < -0.08 * t)
        )
        arch = (r_canal2 <= 13.0**2) | ((np.abs(u) <= 4.0) & (v >= y_canal) & (v <= y_canal + 24.0))
        bone = np.asarray(ribs | sternum | (vb & ~disc) | arch)
        _assign(labels, bone, CTLabel.BONE)
        _assign(labels, vb & disc, CTLabel.SOFT_TISSUE)
        _assign(labels, np.asarray(r_canal2 <= 49.0), CTLabel.SOFT_TISSUE)
        _assign(labels, ~body, CTLabel.AIR)  # nothing outside the skin

        for n, lesion in enumerate(self.lesions):
            cx, cy, cz = lesion.centre
            ball = np.asarray((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= lesion.radius**2)
            if not ball.any():
                continue
            inside = np.broadcast_to(ball, shape) & (labels == CTLabel.LUNG)
            labels[inside] = LESION_LABEL_BASE + n
        return labels


@dataclass(frozen=True)
class HeadPhantom:
    """A head of nested ellipsoids: scalp fat, skull, CSF, cortex, white matter, ventricles.

    Attributes
    ----------
    origin:
        Patient coordinates of the head centre (mm).
    a, b, c:
        Outer semi-axes, left-right, antero-posterior and cranio-caudal (mm).
    scalp, skull, csf, cortex:
        Shell thicknesses from outside in (mm).
    """

    origin: tuple[float, float, float]
    a: float
    b: float
    c: float
    scalp: float
    skull: float
    csf: float
    cortex: float

    def support(self, x: Coordinate, y: Coordinate, z: Coordinate) -> NDArray[np.bool_]:
        """Return where the head is (outside it every label is air); broadcasts like x, y, z."""
        ox, oy, oz = self.origin
        return _inside_ellipsoid(x - ox, y - oy, z - oz, self.a, self.b, self.c)

    def labels(
        self, x: Coordinate, y: Coordinate, z: Coordinate, shape: tuple[int, ...]
    ) -> NDArray[np.uint8]:
        """Return the :class:`MRLabel` of every point.

        Parameters
        ----------
        x, y, z:
            Patient coordinates (mm): scalars or arrays that broadcast to ``shape``.
        shape:
            Shape of the result.

        Returns
        -------
        numpy.ndarray
            ``uint8`` labels of ``shape``.
        """
        ox, oy, oz = self.origin
        u, v, w = x - ox, y - oy, z - oz
        labels = np.zeros(shape, dtype=np.uint8)
        depth = 0.0
        for thickness, label in (
            (0.0, MRLabel.FAT),
            (self.scalp, MRLabel.BONE),
            (self.skull, MRLabel.CSF),
            (self.csf, MRLabel.GRAY_MATTER),
            (self.cortex, MRLabel.WHITE_MATTER),
        ):
            depth += thickness
            shell = _inside_ellipsoid(u, v, w, self.a - depth, self.b - depth, self.c - depth)
            _assign(labels, shell, label)
        for side in (-1.0, 1.0):
            ventricle = _inside_ellipsoid(
                u - side * 0.11 * self.a, v + 0.05 * self.b, w - 0.1 * self.c,
                0.07 * self.a, 0.22 * self.b, 0.12 * self.c,
            )  # fmt: skip
            _assign(labels, ventricle, MRLabel.CSF)
        return labels


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One image's position (ImagePositionPatient) and orientation (ImageOrientationPatient)."""

    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class Geometry:
    """The image plane of every instance of a series.

    Attributes
    ----------
    rows, columns:
        Matrix size.
    pixel_spacing:
        DICOM order: (spacing between rows, spacing between columns), mm.
    slice_thickness:
        Nominal slice thickness (mm).
    frames:
        One :class:`Frame` per instance, in InstanceNumber order.
    slice_step:
        Signed distance (mm) along the slice normal from one instance to the next, or ``None``
        when the instances do not form a volume (e.g. a localizer).
    """

    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    frames: tuple[Frame, ...]
    slice_step: float | None

    @classmethod
    def volume(
        cls,
        *,
        rows: int,
        columns: int,
        pixel_spacing: tuple[float, float],
        slice_thickness: float,
        orientation: tuple[float, float, float, float, float, float],
        first_position: tuple[float, float, float],
        slice_step: float,
        slices: int,
    ) -> Geometry:
        """Build the geometry of ``slices`` parallel, equally spaced images.

        Parameters
        ----------
        rows, columns:
            Matrix size.
        pixel_spacing:
            (between rows, between columns), mm.
        slice_thickness:
            Nominal thickness, mm.
        orientation:
            ImageOrientationPatient, unit row and column direction cosines.
        first_position:
            ImagePositionPatient of the first instance.
        slice_step:
            Signed step along the normal (row direction x column direction), mm.
        slices:
            Number of instances.

        Returns
        -------
        Geometry
            The geometry.

        Raises
        ------
        ValueError
            If ``slices`` < 1 or ``slice_step`` is 0.
        """
        if slices < 1 or slice_step == 0:
            raise ValueError(f"a volume needs >= 1 slice and a non-zero step, got {slices}, 0")
        normal = np.cross(orientation[:3], orientation[3:])
        p0 = np.asarray(first_position, dtype=np.float64)
        frames = tuple(
            Frame(
                position=(
                    float(p0[0] + k * slice_step * normal[0]),
                    float(p0[1] + k * slice_step * normal[1]),
                    float(p0[2] + k * slice_step * normal[2]),
                ),
                orientation=orientation,
            )
            for k in range(slices)
        )
        return cls(rows, columns, pixel_spacing, slice_thickness, frames, slice_step)

    @property
    def normal(self) -> tuple[float, float, float]:
        """Unit normal of the first frame (row direction x column direction)."""
        o = self.frames[0].orientation
        n = np.cross(o[:3], o[3:])
        return (float(n[0]), float(n[1]), float(n[2]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(instances, rows, columns)``."""
        return (len(self.frames), self.rows, self.columns)

    def affine(self) -> list[list[float]] | None:
        """Return the 4x4 LPS affine of the volume, or ``None`` when it is not a volume.

        Returns
        -------
        list of list of float or None
            Maps ``(column i, row j, instance k, 1)`` to patient LPS mm.
        """
        if self.slice_step is None:
            return None
        o = self.frames[0].orientation
        dr, dc = self.pixel_spacing
        n = self.normal
        p = self.frames[0].position
        rows = [
            [o[0] * dc, o[3] * dr, n[0] * self.slice_step, p[0]],
            [o[1] * dc, o[4] * dr, n[1] * self.slice_step, p[1]],
            [o[2] * dc, o[5] * dr, n[2] * self.slice_step, p[2]],
            [0.0, 0.0, 0.0, 1.0],
        ]
        return [[v + 0.0 for v in row] for row in rows]  # + 0.0 turns -0.0 into 0.0

    def coordinates(self, index: int) -> tuple[Coordinate, Coordinate, Coordinate]:
        """Return patient coordinates of every pixel of frame ``index``.

        Each coordinate is a scalar or an array that broadcasts to ``(rows, columns)``.

        Parameters
        ----------
        index:
            0-based frame index.

        Returns
        -------
        tuple
            ``(x, y, z)`` in mm.
        """
        frame = self.frames[index]
        dr, dc = self.pixel_spacing
        along_row = (np.arange(self.columns, dtype=np.float64) * dc)[None, :]
        along_col = (np.arange(self.rows, dtype=np.float64) * dr)[:, None]
        out: list[Coordinate] = []
        for axis in range(3):
            value: Coordinate = frame.position[axis]
            if frame.orientation[axis] != 0:
                value = value + frame.orientation[axis] * along_row
            if frame.orientation[3 + axis] != 0:
                value = value + frame.orientation[3 + axis] * along_col
            out.append(value)
        return out[0], out[1], out[2]

    def slab_coordinates(self, start: int, stop: int) -> tuple[Coordinate, Coordinate, Coordinate]:
        """Return patient coordinates of every pixel of frames ``start`` to ``stop - 1``.

        The frames must share one orientation (a volume) unless the slab holds one frame.
        Each coordinate broadcasts to ``(stop - start, rows, columns)``.

        Parameters
        ----------
        start, stop:
            Frame range, 0-based, ``stop`` excluded.

        Returns
        -------
        tuple
            ``(x, y, z)`` in mm.

        Raises
        ------
        ValueError
            If the range is empty, or spans frames of different orientations.
        """
        frames = self.frames[start:stop]
        if not frames:
            raise ValueError(f"empty frame range {start}:{stop}")
        orientation = frames[0].orientation
        if any(f.orientation != orientation for f in frames):
            raise ValueError("a slab needs frames of one orientation")
        dr, dc = self.pixel_spacing
        along_row = (np.arange(self.columns, dtype=np.float64) * dc)[None, None, :]
        along_col = (np.arange(self.rows, dtype=np.float64) * dr)[None, :, None]
        positions = np.asarray([f.position for f in frames], dtype=np.float64)
        out: list[Coordinate] = []
        for axis in range(3):
            column = positions[:, axis]
            value: Coordinate = (
                float(column[0]) if np.all(column == column[0]) else column[:, None, None]
            )
            if orientation[axis] != 0:
                value = value + orientation[axis] * along_row
            if orientation[3 + axis] != 0:
                value = value + orientation[3 + axis] * along_col
            out.append(value)
        return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------


class SeriesKind(StrEnum):
    """What a series is; recorded as ``kind`` in the ground truth."""

    CT_SCOUT = "ct_scout"
    CT_AXIAL = "ct_axial"
    MR_T1_AXIAL = "mr_t1_axial"
    MR_T2_AXIAL = "mr_t2_axial"
    MR_T1_SAGITTAL = "mr_t1_sagittal"

    @property
    def modality(self) -> str:
        """The DICOM Modality."""
        return "CT" if self.value.startswith("ct") else "MR"


@dataclass(frozen=True)
class Vendor:
    """A made-up modality: equipment attributes and its private block.

    ``private_creator`` reserves block ``0x10`` of ``private_group``; ``private_phi_element``
    is the element offset (in that block) that holds PHI-like free text.
    """

    manufacturer: str
    model: str
    software_versions: tuple[str, ...]
    implementation_version_name: str
    private_group: int
    private_creator: str
    private_phi_element: int


@dataclass(frozen=True)
class PatientPlan:
    """One synthetic patient."""

    index: int
    folder: str
    identity: Identity
    weight_kg: float
    height_m: float


@dataclass(frozen=True)
class StudyPlan:
    """One study of a patient, with the phantom that all its series image."""

    patient: PatientPlan
    index: int
    folder: str
    kind: str
    study_uid: str
    frame_of_reference_uid: str
    date: str
    time_s: float
    accession: str
    study_id: str
    description: str
    body_part: str
    referring_physician: str
    performing_physician: str
    operator: str
    institution: Institution
    vendor: Vendor
    station_name: str
    device_serial: str
    character_set: str
    phantom: ChestPhantom | HeadPhantom


@dataclass(frozen=True)
class SeriesPlan:
    """Everything needed to write one series, deterministically, in any process.

    ``attributes`` holds modality-specific header values drawn by the planner, as
    ``(keyword, value)`` pairs written as they are.
    """

    study: StudyPlan
    index: int
    number: int
    folder: str
    kind: SeriesKind
    series_uid: str
    description: str
    protocol: str
    geometry: Geometry
    transfer_syntax: str
    signed: bool
    bits_stored: int
    values: tuple[int, ...]
    bands: tuple[ValueBand, ...]
    noise_sigma: float
    noise_seed: tuple[int, ...]
    window: tuple[float, float]
    time_s: float
    file_names: tuple[str, ...]
    part10: bool = True
    attributes: tuple[tuple[str, object], ...] = ()
    referenced_images: tuple[tuple[str, str], ...] = field(default=())

    @property
    def modality(self) -> str:
        """The DICOM Modality."""
        return self.kind.modality

    @property
    def sop_class_uid(self) -> str:
        """CT Image Storage or MR Image Storage."""
        return str(CTImageStorage if self.modality == "CT" else MRImageStorage)

    @property
    def rescale_intercept(self) -> int:
        """Rescale Intercept (CT: -1024; MR: 0, not written)."""
        return -1024 if self.modality == "CT" else 0

    @property
    def padding_value(self) -> int | None:
        """Stored value outside the reconstruction circle of an axial CT, or ``None``."""
        if self.kind is not SeriesKind.CT_AXIAL:
            return None
        return -2000 if self.signed else 0


# --------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------


def _outside_fov(geometry: Geometry) -> NDArray[np.bool_]:
    r = (np.arange(geometry.rows) - (geometry.rows - 1) / 2) * geometry.pixel_spacing[0]
    c = (np.arange(geometry.columns) - (geometry.columns - 1) / 2) * geometry.pixel_spacing[1]
    radius = (
        min(geometry.rows * geometry.pixel_spacing[0], geometry.columns * geometry.pixel_spacing[1])
        / 2
    )
    return np.asarray(r[:, None] ** 2 + c[None, :] ** 2 > radius**2)


def _crop(c: Coordinate, rows: slice, columns: slice) -> Coordinate:
    if np.ndim(c) == 0:
        return c
    arr = np.asarray(c)
    return arr[
        :, rows if arr.shape[1] > 1 else slice(None), columns if arr.shape[2] > 1 else slice(None)
    ]


def _slab_labels(
    phantom: ChestPhantom | HeadPhantom,
    x: Coordinate,
    y: Coordinate,
    z: Coordinate,
    shape: tuple[int, int, int],
) -> NDArray[np.uint8]:
    """Labels of a slab, computed only inside the bounding box of the phantom's support."""
    support = np.broadcast_to(phantom.support(x, y, z), shape)
    rows_any = support.any(axis=(0, 2))
    columns_any = support.any(axis=(0, 1))
    labels = np.zeros(shape, dtype=np.uint8)
    if not rows_any.any():
        return labels
    r = np.flatnonzero(rows_any)
    c = np.flatnonzero(columns_any)
    rows, columns = slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1)
    window = (shape[0], rows.stop - rows.start, columns.stop - columns.start)
    labels[:, rows, columns] = phantom.labels(
        _crop(x, rows, columns), _crop(y, rows, columns), _crop(z, rows, columns), window
    )
    return labels


def render_series(plan: SeriesPlan) -> Iterator[tuple[NDArray[np.integer], NDArray[np.int64]]]:
    """Yield every frame of a series as stored pixel values, with its label counts.

    Frames come in InstanceNumber order. Values are ``values[label]`` plus Gaussian noise of
    ``noise_sigma`` rounded and clipped to the modality's noise bound, then mapped to stored
    values (CT: ``HU + 1024``; outside the reconstruction circle of an axial CT the padding
    value). The noise comes from ``noise_seed`` alone, so a frame is the same in any process.

    Parameters
    ----------
    plan:
        The series.

    Yields
    ------
    tuple
        ``(stored, counts)``: stored values (``uint16``, or ``int16`` when ``plan.signed``) of
        shape ``(rows, columns)``, and the voxel count of each label (index = label).

    Raises
    ------
    RuntimeError
        If any tissue falls outside the reconstruction circle (a planning bug).
    """
    geometry = plan.geometry
    rows, columns = geometry.rows, geometry.columns
    rng = np.random.default_rng(list(plan.noise_seed))
    table = np.asarray(plan.values, dtype=np.int32)
    bound = CT_NOISE_BOUND if plan.modality == "CT" else MR_NOISE_BOUND
    outside = _outside_fov(geometry) if plan.padding_value is not None else None
    dtype = np.int16 if plan.signed else np.uint16
    top = (1 << (plan.bits_stored - 1)) - 1 if plan.signed else (1 << plan.bits_stored) - 1
    bottom = -(1 << (plan.bits_stored - 1)) if plan.signed else 0
    phantom = plan.study.phantom
    n = len(geometry.frames)
    # whole slabs of parallel frames at once (a size fixed by the geometry, so the noise
    # stream, drawn in frame order, is the same whatever the slab)
    slab = max(1, min(n, _SLAB_VOXELS // (rows * columns))) if geometry.slice_step else 1
    for start in range(0, n, slab):
        stop = min(n, start + slab)
        shape = (stop - start, rows, columns)
        x, y, z = geometry.slab_coordinates(start, stop)
        labels = _slab_labels(phantom, x, y, z, shape)
        values = table[labels]
        if plan.noise_sigma > 0:
            noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(plan.noise_sigma)
            values += np.clip(np.rint(noise), -bound, bound).astype(np.int32)
        values -= plan.rescale_intercept
        if plan.modality == "MR":
            np.maximum(values, 0, out=values)
        stored = np.clip(values, bottom, top).astype(dtype)
        if outside is not None and plan.padding_value is not None:
            if np.any(labels[:, outside]):
                raise RuntimeError(
                    f"series {plan.folder}: tissue outside the reconstruction circle"
                )
            stored[:, outside] = plan.padding_value
        for i in range(stop - start):
            counts = np.bincount(labels[i].ravel(), minlength=len(table)).astype(np.int64)
            yield stored[i], counts


# --------------------------------------------------------------------------------------------
# headers
# --------------------------------------------------------------------------------------------


def _age(birth: str, on: str) -> str:
    years = int(on[:4]) - int(birth[:4]) - (1 if on[4:] < birth[4:] else 0)
    return f"{max(years, 0):03d}Y"


def file_meta(plan: SeriesPlan) -> FileMetaDataset:
    """Return the series' file meta information, without MediaStorageSOPInstanceUID.

    Parameters
    ----------
    plan:
        The series.

    Returns
    -------
    pydicom.dataset.FileMetaDataset
        FileMetaInformationVersion, MediaStorageSOPClassUID, TransferSyntaxUID,
        ImplementationClassUID, ImplementationVersionName and SourceApplicationEntityTitle.
    """
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(plan.sop_class_uid)
    meta.TransferSyntaxUID = UID(plan.transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = plan.study.vendor.implementation_version_name
    meta.SourceApplicationEntityTitle = plan.study.station_name[:16]
    return meta


def series_header(plan: SeriesPlan) -> Dataset:
    """Return the header elements that every instance of the series shares.

    The per-instance elements (:func:`instance_elements`) and Pixel Data are not in it.

    Parameters
    ----------
    plan:
        The series.

    Returns
    -------
    pydicom.dataset.Dataset
        Patient, study, series, equipment, frame of reference, image plane and pixel, CT or
        MR image, VOI LUT and SOP common modules, and the vendor's private block.
    """
    study = plan.study
    patient = study.patient
    ident = patient.identity
    vendor = study.vendor
    geometry = plan.geometry
    series_time = plan.time_s
    ds = Dataset()
    # SOP common
    ds.SpecificCharacterSet = study.character_set
    ds.InstanceCreationDate = study.date
    ds.InstanceCreationTime = format_tm(series_time + 30.0)
    ds.SOPClassUID = UID(plan.sop_class_uid)
    ds.TimezoneOffsetFromUTC = "+0100" if study.institution.name.startswith("Klinikum") else "-0500"
    # general study
    ds.StudyDate = study.date
    ds.SeriesDate = study.date
    ds.AcquisitionDate = study.date
    ds.ContentDate = study.date
    ds.StudyTime = format_tm(study.time_s)
    ds.SeriesTime = format_tm(series_time)
    ds.AccessionNumber = study.accession
    ds.Modality = plan.modality
    ds.Manufacturer = vendor.manufacturer
    ds.InstitutionName = study.institution.name
    ds.InstitutionAddress = study.institution.address
    ds.ReferringPhysicianName = study.referring_physician
    ds.StationName = study.station_name
    ds.StudyDescription = study.description
    ds.SeriesDescription = plan.description
    ds.InstitutionalDepartmentName = study.institution.department
    ds.PerformingPhysicianName = study.performing_physician
    ds.OperatorsName = study.operator
    ds.ManufacturerModelName = vendor.model
    if plan.referenced_images:
        ds.ReferencedImageSequence = Sequence(
            [_reference(cls, uid) for cls, uid in plan.referenced_images]
        )
    # patient
    ds.PatientName = ident.dicom_name
    ds.PatientID = ident.patient_id
    ds.IssuerOfPatientID = study.institution.issuer
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    if ident.other_ids:
        ds.OtherPatientIDs = (
            list(ident.other_ids) if len(ident.other_ids) > 1 else ident.other_ids[0]
        )
        ds.OtherPatientIDsSequence = Sequence(
            [_other_id(other, "NHS") for other in ident.other_ids]
        )
    ds.PatientAge = _age(ident.birth_date, study.date)
    ds.PatientSize = format_ds(patient.height_m)
    ds.PatientWeight = format_ds(patient.weight_kg)
    ds.PatientAddress = ident.address
    ds.PatientTelephoneNumbers = ident.phone
    ds.AdditionalPatientHistory = (
        f"Referred by {study.referring_physician.split('^')[0]} for follow-up. "
        f"Contact {ident.given} {ident.family} on {ident.phone}."
    )
    # acquisition / equipment
    ds.BodyPartExamined = study.body_part
    ds.SliceThickness = format_ds(geometry.slice_thickness)
    ds.DeviceSerialNumber = study.device_serial
    ds.SoftwareVersions = list(vendor.software_versions)
    ds.ProtocolName = plan.protocol
    ds.PatientPosition = "HFS"
    for keyword, value in plan.attributes:
        setattr(ds, keyword, value)
    # series and frame of reference
    ds.StudyInstanceUID = UID(study.study_uid)
    ds.SeriesInstanceUID = UID(plan.series_uid)
    ds.StudyID = study.study_id
    ds.SeriesNumber = plan.number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = UID(study.frame_of_reference_uid)
    ds.PositionReferenceIndicator = ""
    # image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.rows
    ds.Columns = geometry.columns
    ds.PixelSpacing = [format_ds(v) for v in geometry.pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = plan.bits_stored
    ds.HighBit = plan.bits_stored - 1
    ds.PixelRepresentation = 1 if plan.signed else 0
    if plan.padding_value is not None:
        ds.add_new(0x00280120, "SS" if plan.signed else "US", plan.padding_value)
    ds.LossyImageCompression = "00"
    ds.WindowCenter = format_ds(plan.window[0])
    ds.WindowWidth = format_ds(plan.window[1])
    if plan.modality == "CT":
        ds.RescaleIntercept = format_ds(plan.rescale_intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    # the made-up vendor's private block, one element of which carries PHI-like text
    block = ds.private_block(vendor.private_group, vendor.private_creator, create=True)
    block.add_new(0x01, "CS", "SYNTH")
    block.add_new(0x02, "LO", f"{plan.protocol[:40]} v3")
    block.add_new(0x03, "DS", format_ds(round(series_time % 997, 2)))
    block.add_new(0x04, "OB", bytes(range(plan.number % 7, plan.number % 7 + 16)))
    block.add_new(0x05, "US", [plan.number, len(geometry.frames)])
    block.add_new(
        vendor.private_phi_element,
        "LT",
        f"Patient {ident.dicom_name} (MRN {ident.patient_id}, born {ident.birth_date}) "
        f"scanned by {study.operator}; {ident.address}",
    )
    return ds


def _reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = UID(sop_class)
    item.ReferencedSOPInstanceUID = UID(sop_instance)
    return item


def _other_id(value: str, issuer: str) -> Dataset:
    item = Dataset()
    item.PatientID = value
    item.IssuerOfPatientID = issuer
    item.TypeOfPatientID = "TEXT"
    return item


#: Per-instance header elements, ``(tag, VR)``, in tag order; Pixel Data is separate.
INSTANCE_TAGS: tuple[tuple[int, str], ...] = (
    (0x00080018, "UI"),  # SOPInstanceUID
    (0x00080032, "TM"),  # AcquisitionTime
    (0x00080033, "TM"),  # ContentTime
    (0x00200013, "IS"),  # InstanceNumber
    (0x00200032, "DS"),  # ImagePositionPatient
    (0x00200037, "DS"),  # ImageOrientationPatient
    (0x00201041, "DS"),  # SliceLocation
)


def instance_elements(plan: SeriesPlan, index: int) -> list[tuple[int, str, str]]:
    """Return the per-instance elements of instance ``index`` as ``(tag, VR, text value)``.

    Their tags are :data:`INSTANCE_TAGS`, in that order.

    Parameters
    ----------
    plan:
        The series.
    index:
        0-based instance index (InstanceNumber is ``index + 1``).

    Returns
    -------
    list of tuple
        ``(tag, VR, value)``, multi-values joined with ``\\``.
    """
    frame = plan.geometry.frames[index]
    acquired = plan.time_s - 240.0 + 0.25 * index
    o, p = frame.orientation, frame.position
    normal = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
    location = normal[0] * p[0] + normal[1] * p[1] + normal[2] * p[2]
    return [
        (0x00080018, "UI", sop_instance_uid(plan.series_uid, index)),
        (0x00080032, "TM", format_tm(acquired)),
        (0x00080033, "TM", format_tm(acquired + 2.0)),
        (0x00200013, "IS", str(index + 1)),
        (0x00200032, "DS", "\\".join(format_ds(v) for v in frame.position)),
        (0x00200037, "DS", "\\".join(format_ds(v) for v in frame.orientation)),
        (0x00201041, "DS", format_ds(location)),
    ]


def lesion_volumes(plan: SeriesPlan, counts: NDArray[np.int64]) -> list[dict[str, object]]:
    """Return the ground-truth record of each lesion of an axial CT series.

    Parameters
    ----------
    plan:
        The series (its study's phantom must be a :class:`ChestPhantom`).
    counts:
        Voxel count of each label over the whole series.

    Returns
    -------
    list of dict
        Per lesion: centre (mm), radius (mm), HU, voxel count, volume from the voxel count
        (mL) and the analytic sphere volume (mL).
    """
    phantom = plan.study.phantom
    if not isinstance(phantom, ChestPhantom):
        return []
    voxel_ml = voxel_volume_ml(plan.geometry)
    out: list[dict[str, object]] = []
    for n, lesion in enumerate(phantom.lesions):
        label = LESION_LABEL_BASE + n
        voxels = int(counts[label]) if label < len(counts) else 0
        out.append(
            {
                "label": label,
                "centre_mm": list(lesion.centre),
                "radius_mm": lesion.radius,
                "hu": lesion.value,
                "voxels": voxels,
                "volume_ml": voxels * voxel_ml,
                "analytic_volume_ml": 4.0 / 3.0 * math.pi * lesion.radius**3 / 1000.0,
            }
        )
    return out


def voxel_volume_ml(geometry: Geometry) -> float:
    """Return the volume of one voxel in mL (0 when the series is not a volume).

    Parameters
    ----------
    geometry:
        The series geometry.

    Returns
    -------
    float
        ``row spacing * column spacing * |slice step| / 1000``.
    """
    if geometry.slice_step is None:
        return 0.0
    dr, dc = geometry.pixel_spacing
    return dr * dc * abs(geometry.slice_step) / 1000.0
