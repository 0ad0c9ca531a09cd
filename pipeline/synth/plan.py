"""Plan a synthetic archive: patients, studies, series, geometry, codecs and bad objects.

Planning is pure and cheap: it draws every random choice from generators seeded by ``(seed,
patient index, ...)`` and returns frozen records that a worker process can write on its own.
Patient ``n``'s plan depends only on ``seed``, ``n`` and the image options, so a larger
archive with the same seed starts with the same patients.

Archive structure
-----------------
Normal mode: each patient has 1-3 studies, months apart. A CT chest study holds a localizer
series (1-2 images) and one or two axial series (soft-tissue and lung reconstructions of the
same acquisition) of ``ct_slices`` images; an MR brain study (when ``include_mr``) holds 1-3 of
T1 axial, T2 axial and T1 sagittal series of 20-40 images. The first patient always has a CT
study with both reconstructions and, with MR, an MR study with T1 and T2 axial series.

Small mode: every image is :data:`SMALL_MATRIX` pixels square and the counts are fixed: each
patient has one CT study (a 2-image localizer and one axial series of ``ct_slices`` images)
and, with MR, one MR study of 3 series of :data:`SMALL_MR_SLICES` images. So
``n_instances = patients * (2 + ct_slices + 3 * SMALL_MR_SLICES * include_mr)``; with the
defaults (``ct_slices=120``, MR on) that is 200 per patient, and ``patients=500`` gives
100,000 instances (see :func:`small_instance_count`).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.uid import ImplicitVRLittleEndian

from pipeline.synth.core import (
    CT_BANDS,
    MR_T1_BANDS,
    MR_T1_VALUES,
    MR_T2_BANDS,
    MR_T2_VALUES,
    ChestPhantom,
    CTLabel,
    Frame,
    Geometry,
    HeadPhantom,
    Lesion,
    MRLabel,
    PatientPlan,
    SeriesKind,
    SeriesPlan,
    StudyPlan,
    ValueBand,
    Vendor,
    format_ds,
    sop_instance_uid,
    synth_uid,
)
from pipeline.synth.names import (
    INSTITUTIONS,
    TECH_NAMES,
    Institution,
    draw_identity,
    draw_person,
    specific_character_set,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SMALL_MATRIX",
    "SMALL_MR_SLICES",
    "ArchivePlan",
    "BadObject",
    "mr_matrix",
    "plan_archive",
    "small_instance_count",
]

#: Rows and columns of every image in small mode.
SMALL_MATRIX = 16
#: Images per MR series in small mode.
SMALL_MR_SLICES = 26

_GRID = 1.0 / 512.0  # every position is a multiple of this (exact in binary and in decimal)

ACME_CT = Vendor(
    manufacturer="ACME Medical Systems",
    model="Aquila 128",
    software_versions=("AQ VB20A", "RECON 5.2.1"),
    implementation_version_name="ACME_CT_52",
    private_group=0x0029,
    private_creator="ACME MEDICAL 1.0",
    private_phi_element=0x20,
)
NORDLICHT_CT = Vendor(
    manufacturer="Nordlicht Imaging GmbH",
    model="Polaris 64",
    software_versions=("PX 7.1.3",),
    implementation_version_name="NORDLICHT_713",
    private_group=0x0019,
    private_creator="NORDLICHT CT 2",
    private_phi_element=0x10,
)
KESTREL_MR_15 = Vendor(
    manufacturer="Kestrel Healthcare",
    model="Vista 1.5T",
    software_versions=("KV 11.4",),
    implementation_version_name="KESTREL_114",
    private_group=0x0043,
    private_creator="KESTREL MR HDR",
    private_phi_element=0x30,
)
KESTREL_MR_3 = Vendor(
    manufacturer="Kestrel Healthcare",
    model="Apex 3T",
    software_versions=("KA 12.0",),
    implementation_version_name="KESTREL_120",
    private_group=0x0043,
    private_creator="KESTREL MR HDR",
    private_phi_element=0x30,
)

_CT_DESCRIPTIONS = ("CT CHEST W/O CONTRAST", "CT THORAX", "CT CHEST LOW DOSE", "CT Thorax nativ")
_MR_DESCRIPTIONS = ("MR BRAIN W/O CONTRAST", "MRI HEAD ROUTINE", "MRT Schädel nativ")
_NAME_STYLES = (
    "IM{n:05d}",
    "IM{n:05d}.dcm",
    "I{n:07d}.img",
    "IMG{n:04d}.DCM",
    "hex",
    "{m}{s:03d}{n:04d}.dcm",
)


@dataclass(frozen=True)
class BadObject:
    """A deliberately broken object (or non-DICOM file) the archive holds.

    Attributes
    ----------
    path:
        Archive-relative path (POSIX).
    kind:
        ``truncated``, ``missing_attribute``, ``not_dicom`` or ``empty``.
    expected_reason:
        The quarantine reason a crawl should record (:class:`pipeline.enums.QuarantineReason`
        values).
    detail:
        What is wrong, in words.
    source:
        For DICOM-based objects, the series whose first image it derives from.
    missing:
        Attributes the object lacks (``missing_attribute``).
    series_uid, sop_uid:
        The object's own UIDs where it has them ("" when absent).
    """

    path: str
    kind: str
    expected_reason: str
    detail: str
    source: SeriesPlan | None = None
    missing: tuple[str, ...] = ()
    series_uid: str = ""
    sop_uid: str = ""


@dataclass(frozen=True)
class ArchivePlan:
    """The whole archive: patients, studies, series (in writing order) and bad objects."""

    patients: tuple[PatientPlan, ...]
    studies: tuple[StudyPlan, ...]
    series: tuple[SeriesPlan, ...]
    bad: tuple[BadObject, ...]
    transfer_syntaxes: tuple[str, ...]


def small_instance_count(patients: int, *, ct_slices: int = 120, include_mr: bool = True) -> int:
    """Return the number of valid instances a small-mode archive holds.

    Parameters
    ----------
    patients:
        Number of patients.
    ct_slices:
        Images per axial CT series.
    include_mr:
        Whether each patient also has an MR study.

    Returns
    -------
    int
        ``patients * (2 + ct_slices + 3 * SMALL_MR_SLICES * include_mr)`` (bad objects not
        included).

    Examples
    --------
    >>> small_instance_count(500)
    100000
    """
    return patients * (2 + ct_slices + (3 * SMALL_MR_SLICES if include_mr else 0))


def mr_matrix(rows: int, columns: int, *, small: bool) -> int:
    """Return the MR matrix size: 256, or the CT matrix when smaller, or :data:`SMALL_MATRIX`.

    Parameters
    ----------
    rows, columns:
        The CT matrix.
    small:
        Small mode.

    Returns
    -------
    int
        Rows (= columns) of every MR image.
    """
    if small:
        return SMALL_MATRIX
    return 256 if min(rows, columns) >= 256 else min(rows, columns)


def _q(value: float, step: float = 0.125) -> float:
    return round(value / step) * step


def _pick(rng: np.random.Generator, values: Sequence[str]) -> str:
    return values[int(rng.integers(len(values)))]


def _file_names(
    rng: np.random.Generator, series_uid: str, modality: str, number: int, count: int
) -> tuple[str, ...]:
    style = _NAME_STYLES[int(rng.integers(len(_NAME_STYLES)))]
    if style == "hex":
        names: list[str] = []
        seen: set[str] = set()
        for k in range(count):
            value = int(sop_instance_uid(series_uid, k)[5:]) & 0xFFFFFFFF
            name = f"{value:08X}"
            while name in seen:  # practically never
                value = (value + 1) & 0xFFFFFFFF
                name = f"{value:08X}"
            seen.add(name)
            names.append(name)
        return tuple(names)
    return tuple(style.format(n=k + 1, m=modality, s=number) for k in range(count))


class _Planner:
    def __init__(
        self,
        *,
        seed: int,
        ct_slices: int,
        rows: int,
        columns: int,
        small: bool,
        include_mr: bool,
        syntaxes: Sequence[str],
    ) -> None:
        self.seed = seed
        self.ct_slices = ct_slices
        self.rows = SMALL_MATRIX if small else rows
        self.columns = SMALL_MATRIX if small else columns
        self.small = small
        self.include_mr = include_mr
        order = np.random.default_rng([seed, 2]).permutation(len(syntaxes))
        self.syntaxes = tuple(syntaxes[int(i)] for i in order)
        self.fingerprint = (
            f"{seed}|{self.rows}x{self.columns}|{ct_slices}|{int(small)}|{int(include_mr)}"
        )
        self.series: list[SeriesPlan] = []

    def uid(self, *parts: object) -> str:
        return synth_uid(self.fingerprint, *parts)

    def next_syntax(self) -> str:
        return self.syntaxes[len(self.series) % len(self.syntaxes)]

    # ---------------------------------------------------------------------------- patients

    def patient(self, index: int) -> tuple[PatientPlan, list[StudyPlan]]:
        rng = np.random.default_rng([self.seed, 1, index])
        identity = draw_identity(rng, index=index)
        patient = PatientPlan(
            index=index,
            folder=f"P{index + 1:04d}",
            identity=identity,
            weight_kg=round(float(rng.uniform(48, 115)), 1),
            height_m=round(float(rng.uniform(1.50, 1.96)), 2),
        )
        institution = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
        if self.small:
            kinds = ["ct_chest"] + (["mr_brain"] if self.include_mr else [])
        elif index == 0:
            kinds = ["ct_chest", "mr_brain" if self.include_mr else "ct_chest"]
        else:
            n = int(rng.integers(1, 4))
            kinds = [
                "mr_brain" if self.include_mr and rng.random() < 0.35 else "ct_chest"
                for _ in range(n)
            ]
        chest = self.chest(rng)
        head = self.head(rng)
        day = dt.date(2019, 1, 7) + dt.timedelta(days=int(rng.integers(0, 1800)))
        studies: list[StudyPlan] = []
        for s, kind in enumerate(kinds):
            if s:
                day += dt.timedelta(days=int(rng.integers(60, 420)))
            studies.append(
                self.study(rng, patient, s, kind, day, institution, chest, head, first=index == 0)
            )
        return patient, studies

    def chest(self, rng: np.random.Generator) -> ChestPhantom:
        return ChestPhantom(
            origin=(0.0, 0.0, 0.0),
            thorax_length=_q(rng.uniform(260, 320)),
            body_a=_q(rng.uniform(150, 172)),
            body_b=_q(rng.uniform(100, 122)),
            fat=_q(rng.uniform(8, 26)),
            wall=_q(rng.uniform(15, 19)),
            rib_pitch=_q(rng.uniform(22, 28)),
            rib_width=_q(rng.uniform(8, 11)),
            rib_depth=_q(rng.uniform(7, 9)),
            vertebra_radius=_q(rng.uniform(15, 19)),
            lung_hu=int(rng.integers(-870, -829)),
            adipose_hu=int(rng.integers(-110, -89)),
            soft_hu=40,
            bone_hu=int(rng.integers(650, 751)),
        )

    def head(self, rng: np.random.Generator) -> HeadPhantom:
        return HeadPhantom(
            origin=(0.0, 0.0, 0.0),
            a=_q(rng.uniform(70, 78)),
            b=_q(rng.uniform(88, 98)),
            c=_q(rng.uniform(100, 112)),
            scalp=_q(rng.uniform(4, 6)),
            skull=_q(rng.uniform(5, 7)),
            csf=_q(rng.uniform(2.5, 3.5)),
            cortex=_q(rng.uniform(3.5, 4.5)),
        )

    # ---------------------------------------------------------------------------- studies

    def study(
        self,
        rng: np.random.Generator,
        patient: PatientPlan,
        s: int,
        kind: str,
        day: dt.date,
        institution: Institution,
        chest: ChestPhantom,
        head: HeadPhantom,
        *,
        first: bool,
    ) -> StudyPlan:
        ct = kind == "ct_chest"
        modality = "CT" if ct else "MR"
        if ct:
            vendor = ACME_CT if INSTITUTIONS.index(institution) % 2 == 0 else NORDLICHT_CT
        else:
            vendor = KESTREL_MR_3 if rng.random() < 0.5 else KESTREL_MR_15
        referring = draw_person(rng, prefix="Dr.")
        performing = draw_person(rng, prefix="Dr.")
        operator = _pick(rng, TECH_NAMES)
        ident = patient.identity
        description = _pick(rng, _CT_DESCRIPTIONS if ct else _MR_DESCRIPTIONS)
        charset = specific_character_set(
            ident.dicom_name, ident.address, referring, performing, operator, description,
            institution.name, institution.address,
        )  # fmt: skip
        phantom: ChestPhantom | HeadPhantom
        origin = (_q(rng.uniform(-8, 8)), _q(rng.uniform(-15, 15)), _q(rng.uniform(-120, 60)))
        if ct:
            phantom = ChestPhantom(**{**chest.__dict__, "origin": origin})
        else:
            phantom = HeadPhantom(**{**head.__dict__, "origin": origin})
        study_uid = self.uid("study", patient.index, s)
        plan = StudyPlan(
            patient=patient,
            index=s,
            folder=f"{patient.folder}/ST{s + 1:02d}",
            kind=kind,
            study_uid=study_uid,
            frame_of_reference_uid=self.uid("for", patient.index, s),
            date=day.strftime("%Y%m%d"),
            time_s=float(int(rng.uniform(7.5 * 3600, 18 * 3600))),
            accession=f"{institution.issuer[:2]}{int(rng.integers(10**7, 10**8))}",
            study_id=str(int(rng.integers(1000, 99999))),
            description=description,
            body_part="CHEST" if ct else "HEAD",
            referring_physician=referring,
            performing_physician=performing,
            operator=operator,
            institution=institution,
            vendor=vendor,
            station_name=f"{institution.station_prefix}{modality}{int(rng.integers(1, 4)):02d}",
            device_serial=str(int(rng.integers(10**5, 10**6))),
            character_set=charset,
            phantom=phantom,
        )
        if ct:
            return self.ct_series(rng, plan, first=first)
        return self.mr_series(rng, plan, first=first)

    # ---------------------------------------------------------------------------- CT

    def ct_series(self, rng: np.random.Generator, study: StudyPlan, *, first: bool) -> StudyPlan:
        phantom = study.phantom
        assert isinstance(phantom, ChestPhantom)
        ox, oy, oz = phantom.origin
        t = phantom.thorax_length
        n = self.ct_slices
        step = float(rng.choice([1.25, 1.5, 2.0, 2.5, 3.0]))
        thickness = step + (0.5 if rng.random() < 0.25 else 0.0)
        coverage = (n - 1) * step
        zc = _q(oz - 0.47 * t + rng.uniform(-10, 10))
        top = zc + coverage / 2
        descending = rng.random() < 0.75
        side = min(self.rows, self.columns)
        # 358-461 mm: 0.7-0.9 mm pixels at 512, and always room for the body in the circle
        fov = rng.uniform(max(2 * (phantom.body_a + 25), 358.4), 460.8)
        dx = max(_q(fov / side, 1 / 256), 1 / 256)
        cx, cy = _q(ox + rng.uniform(-6, 6)), _q(oy + rng.uniform(-6, 6))
        x0 = cx - (self.columns - 1) / 2 * dx
        y0 = cy - (self.rows - 1) / 2 * dx
        axial = Geometry.volume(
            rows=self.rows,
            columns=self.columns,
            pixel_spacing=(dx, dx),
            slice_thickness=thickness,
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            first_position=(x0, y0, top if descending else top - coverage),
            slice_step=-step if descending else step,
            slices=n,
        )
        lesions = () if self.small else self.lesions(rng, phantom, axial)
        phantom = ChestPhantom(**{**phantom.__dict__, "lesions": lesions})
        study = StudyPlan(**{**study.__dict__, "phantom": phantom})
        values = phantom.value_table()
        kvp = str(int(rng.choice([100, 120, 120, 140])))
        ma = int(rng.integers(120, 360))
        common: tuple[tuple[str, object], ...] = (
            ("KVP", kvp),
            ("XRayTubeCurrent", ma),
            ("ExposureTime", int(rng.integers(500, 1000))),
            ("Exposure", int(ma * 0.5)),
            ("GeneratorPower", int(ma * int(kvp) / 1000)),
            ("FocalSpots", "1.2"),
            ("FilterType", "BODY"),
            ("DistanceSourceToDetector", "1085.6"),
            ("DistanceSourceToPatient", "595"),
            ("GantryDetectorTilt", "0"),
            ("TableHeight", str(int(rng.integers(140, 190)))),
            ("RotationDirection", "CW"),
        )

        # localizer: a coronal (AP) and, mostly, a sagittal (lateral) image through the body
        n_scout = 2 if self.small or rng.random() < 0.6 else 1
        ds_row = max(_q((coverage + 120) / self.rows, 1 / 256), 1 / 256)
        ds_col = max(_q((2 * phantom.body_a + 80) / self.columns, 1 / 256), 1 / 256)
        top_s = _q(zc + (self.rows - 1) / 2 * ds_row, _GRID)
        frames = [
            Frame(
                (ox - (self.columns - 1) / 2 * ds_col, oy, top_s),
                (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
            ),
            Frame(
                (ox, oy - (self.columns - 1) / 2 * ds_col, top_s),
                (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
            ),
        ][:n_scout]
        scout_geometry = Geometry(
            self.rows, self.columns, (ds_row, ds_col), 1.0, tuple(frames), None
        )
        scout = self.add_series(
            rng,
            study,
            kind=SeriesKind.CT_SCOUT,
            number=1,
            description="Topogram 0.6 T20f" if study.vendor is ACME_CT else "Scout",
            protocol="CHEST_ROUTINE",
            geometry=scout_geometry,
            signed=False,
            bits_stored=12,
            values=values,
            bands=CT_BANDS,
            noise_sigma=3.0,
            window=(40.0, 400.0),
            time_offset=60.0,
            attributes=(("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]), *common),
        )
        reference = ((scout.sop_class_uid, sop_instance_uid(scout.series_uid, 0)),)
        recons = [("soft", "B31f" if study.vendor is ACME_CT else "STANDARD", 40.0, 400.0, 2.5)]
        if not self.small and (first or rng.random() < 0.6):
            recons.append(
                ("lung", "B70f" if study.vendor is ACME_CT else "LUNG", -600.0, 1500.0, 4.0)
            )
        signed = rng.random() < 0.4
        helical: tuple[tuple[str, object], ...] = (
            ("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"]),
            ("ScanOptions", "HELICAL MODE"),
            ("DataCollectionDiameter", "500"),
            ("ReconstructionDiameter", format_ds(side * dx)),
            ("SpiralPitchFactor", float(rng.choice([0.6, 0.8, 1.0, 1.2]))),
            ("RevolutionTime", 0.5),
            ("SingleCollimationWidth", 0.6),
            ("TotalCollimationWidth", 38.4),
            ("CTDIvol", round(float(rng.uniform(2.5, 14.0)), 2)),
        )
        for r, (name, kernel, wc, ww, sigma) in enumerate(recons):
            label = "Lung" if name == "lung" else "Soft tissue"
            self.add_series(
                rng,
                study,
                kind=SeriesKind.CT_AXIAL,
                number=2 + r,
                description=f"Thorax {_format_mm(thickness)} {kernel} {label}",
                protocol="CHEST_ROUTINE",
                geometry=axial,
                signed=signed,
                bits_stored=16 if signed else 12,
                values=values,
                bands=CT_BANDS,
                noise_sigma=sigma,
                window=(wc, ww),
                time_offset=300.0 + 20 * r,
                attributes=(*helical, *common, ("ConvolutionKernel", kernel)),
                referenced=reference,
            )
        return study

    def lesions(
        self, rng: np.random.Generator, phantom: ChestPhantom, geometry: Geometry
    ) -> tuple[Lesion, ...]:
        voxel = max(
            geometry.pixel_spacing[0], geometry.pixel_spacing[1], abs(geometry.slice_step or 0)
        )
        zs = [f.position[2] for f in geometry.frames]
        z_lo, z_hi = min(zs), max(zs)
        r_min = max(4.0, 1.5 * voxel)
        r_max = min(15.0, (z_hi - z_lo) / 2 - 2 * voxel)
        wanted = int(rng.integers(1, 4))
        if r_max < r_min:
            return ()
        ox, oy, _ = phantom.origin
        a0 = phantom.body_a - phantom.fat - phantom.wall
        b0 = phantom.body_b - 0.8 * phantom.fat - phantom.wall
        found: list[Lesion] = []
        for _ in range(200):
            if len(found) == wanted:
                break
            radius = _q(rng.uniform(r_min, r_max), 0.25)
            side = -1.0 if rng.random() < 0.5 else 1.0
            centre = (
                _q(ox + side * 0.44 * a0 + rng.uniform(-0.6, 0.6) * 0.36 * a0),
                _q(oy - 0.05 * b0 + rng.uniform(-0.6, 0.6) * 0.62 * b0),
                _q(rng.uniform(z_lo + radius + voxel, z_hi - radius - voxel)),
            )
            if any(
                math.dist(centre, other.centre) < radius + other.radius + 2 * voxel + 2
                for other in found
            ):
                continue
            if _ball_in_lung(phantom, centre, radius + 2.0):
                found.append(Lesion(centre, radius, int(rng.integers(65, 121))))
        return tuple(found)

    # ---------------------------------------------------------------------------- MR

    def mr_series(self, rng: np.random.Generator, study: StudyPlan, *, first: bool) -> StudyPlan:
        phantom = study.phantom
        assert isinstance(phantom, HeadPhantom)
        ox, oy, oz = phantom.origin
        m = mr_matrix(self.rows, self.columns, small=self.small)
        n = SMALL_MR_SLICES if self.small else int(rng.integers(20, 41))
        tesla = "3" if study.vendor is KESTREL_MR_3 else "1.5"
        freq = "123.2" if tesla == "3" else "63.87"
        wanted = ["t1_ax", "t2_ax", "t1_sag"]
        if not self.small:
            if first:
                wanted = ["t1_ax", "t2_ax"]
            else:
                wanted = ["t1_ax"] + [w for w in ("t2_ax", "t1_sag") if rng.random() < 0.6]
        for number, which in enumerate(wanted, start=1):
            sag = which == "t1_sag"
            t1 = which.startswith("t1")
            extent = max(phantom.b, phantom.c) if sag else max(phantom.a, phantom.b)
            fov = rng.uniform(2 * (extent + 8), 2 * (extent + 8) + 20)
            dx = max(_q(fov / m, 1 / 256), 1 / 256)
            step = float(rng.choice([4.0, 5.0, 5.5, 6.0]))
            coverage = (n - 1) * step
            if sag:
                orientation = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
                # the normal is -x; stepping by -step walks from right to left (+x)
                first_pos = (ox - coverage / 2, oy - (m - 1) / 2 * dx, oz + (m - 1) / 2 * dx)
                slice_step = -step
            else:
                orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
                first_pos = (ox - (m - 1) / 2 * dx, oy - (m - 1) / 2 * dx, oz - coverage / 2)
                slice_step = step
            geometry = Geometry.volume(
                rows=m,
                columns=m,
                pixel_spacing=(dx, dx),
                slice_thickness=step - 0.5 if step > 4 else step,
                orientation=orientation,
                first_position=first_pos,
                slice_step=slice_step,
                slices=n,
            )
            if t1:
                values = _mr_values(MR_T1_VALUES)
                tr, te = float(rng.integers(450, 651)), float(rng.integers(8, 16))
                seq, etl = "*se2d1", 1
            else:
                values = _mr_values(MR_T2_VALUES)
                tr, te = float(rng.integers(3500, 5001)), float(rng.integers(90, 111))
                seq, etl = "*tse2d1_15", 15
            plane = "sag" if sag else "tra"
            weighting = "T1" if t1 else "T2"
            self.add_series(
                rng,
                study,
                kind=SeriesKind(
                    f"mr_{which.replace('_ax', '_axial').replace('_sag', '_sagittal')}"
                ),
                number=number,
                description=f"{weighting} {'SE' if t1 else 'TSE'} {plane}",
                protocol=f"BRAIN_{weighting}_{plane.upper()}",
                geometry=geometry,
                signed=False,
                bits_stored=12,
                values=values,
                bands=MR_T1_BANDS if t1 else MR_T2_BANDS,
                noise_sigma=8.0,
                window=(450.0, 1000.0) if t1 else (800.0, 1800.0),
                time_offset=120.0 + 300.0 * number,
                attributes=(
                    ("ImageType", ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]),
                    ("ScanningSequence", "SE"),
                    ("SequenceVariant", ["SK", "SP", "OSP"]),
                    ("ScanOptions", "PFP" if t1 else "FS"),
                    ("MRAcquisitionType", "2D"),
                    ("SequenceName", seq),
                    ("AngioFlag", "N"),
                    ("RepetitionTime", _format_mm(tr)),
                    ("EchoTime", _format_mm(te)),
                    ("NumberOfAverages", "1"),
                    ("ImagingFrequency", freq),
                    ("ImagedNucleus", "1H"),
                    ("EchoNumbers", "1"),
                    ("MagneticFieldStrength", tesla),
                    ("SpacingBetweenSlices", _format_mm(step)),
                    ("NumberOfPhaseEncodingSteps", str(int(m * 0.75))),
                    ("EchoTrainLength", str(etl)),
                    ("PercentSampling", "100"),
                    ("PercentPhaseFieldOfView", "100"),
                    ("PixelBandwidth", str(int(rng.integers(130, 260)))),
                    ("ReceiveCoilName", "HEAD_32"),
                    ("TransmitCoilName", "Body"),
                    ("AcquisitionMatrix", [0, m, int(m * 0.75), 0]),
                    ("InPlanePhaseEncodingDirection", "ROW"),
                    ("FlipAngle", "90" if t1 else "150"),
                    ("VariableFlipAngleFlag", "N"),
                    ("SAR", _format_mm(round(float(rng.uniform(0.5, 2.5)), 3))),
                ),
            )
        return study

    # ---------------------------------------------------------------------------- series

    def add_series(
        self,
        rng: np.random.Generator,
        study: StudyPlan,
        *,
        kind: SeriesKind,
        number: int,
        description: str,
        protocol: str,
        geometry: Geometry,
        signed: bool,
        bits_stored: int,
        values: tuple[int, ...],
        bands: tuple[ValueBand, ...],
        noise_sigma: float,
        window: tuple[float, float],
        time_offset: float,
        attributes: tuple[tuple[str, object], ...],
        referenced: tuple[tuple[str, str], ...] = (),
    ) -> SeriesPlan:
        patient = study.patient
        series_uid = self.uid("series", patient.index, study.index, number)
        modality = kind.modality
        plan = SeriesPlan(
            study=study,
            index=len(self.series),
            number=number,
            folder=f"{study.folder}/SE{number:03d}",
            kind=kind,
            series_uid=series_uid,
            description=description,
            protocol=protocol,
            geometry=geometry,
            transfer_syntax=self.next_syntax(),
            signed=signed,
            bits_stored=bits_stored,
            values=values,
            bands=bands,
            noise_sigma=noise_sigma,
            noise_seed=(self.seed, 3, patient.index, study.index, number),
            window=window,
            time_s=study.time_s + time_offset,
            file_names=_file_names(rng, series_uid, modality, number, len(geometry.frames)),
            attributes=attributes,
            referenced_images=referenced,
        )
        self.series.append(plan)
        return plan


def _format_mm(value: float) -> str:
    """Format a small decimal (mm, ms, T) the way a modality writes it: ``2.5``, ``3``."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return text if text != "-0" else "0"


def _mr_values(by_label: dict[int, int]) -> tuple[int, ...]:
    table = [0] * (max(MRLabel) + 1)
    for label, value in by_label.items():
        table[label] = value
    return tuple(table)


def _ball_in_lung(phantom: ChestPhantom, centre: tuple[float, float, float], radius: float) -> bool:
    """Whether a ball lies wholly in lung (sampled on a grid and on its surface)."""
    step = max(0.75, radius / 8)
    offsets = np.arange(-radius, radius + step / 2, step)
    gx, gy, gz = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    inside = gx**2 + gy**2 + gz**2 <= radius**2
    pts = [gx[inside], gy[inside], gz[inside]]
    # plus 300 points on the surface (Fibonacci sphere)
    k = np.arange(300) + 0.5
    phi = np.arccos(1 - 2 * k / 300)
    theta = math.pi * (1 + 5**0.5) * k
    surface = [
        radius * np.cos(theta) * np.sin(phi),
        radius * np.sin(theta) * np.sin(phi),
        radius * np.cos(phi),
    ]
    x = centre[0] + np.concatenate([pts[0], surface[0]])
    y = centre[1] + np.concatenate([pts[1], surface[1]])
    z = centre[2] + np.concatenate([pts[2], surface[2]])
    labels = phantom.labels(x, y, z, x.shape)
    return bool(np.all(labels == CTLabel.LUNG))


def plan_archive(
    *,
    patients: int,
    seed: int,
    ct_slices: int,
    rows: int,
    columns: int,
    small: bool,
    include_mr: bool,
    include_bad: bool,
    syntaxes: Sequence[str],
) -> ArchivePlan:
    """Plan the whole archive.

    Parameters
    ----------
    patients:
        Number of patients (>= 1).
    seed:
        Random seed (>= 0).
    ct_slices:
        Images per axial CT series.
    rows, columns:
        CT matrix (ignored in small mode, where every image is :data:`SMALL_MATRIX` square).
    small:
        Small mode (see the module docstring).
    include_mr:
        Whether MR studies appear.
    include_bad:
        Whether to add bad objects and the no-preamble series.
    syntaxes:
        Transfer syntax UIDs to cycle through, one per series; the order is shuffled by
        ``seed``.

    Returns
    -------
    ArchivePlan
        The plan.

    Raises
    ------
    ValueError
        If an argument is out of range or ``syntaxes`` is empty.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    if not syntaxes:
        raise ValueError("at least one transfer syntax is needed")
    planner = _Planner(
        seed=seed,
        ct_slices=ct_slices,
        rows=rows,
        columns=columns,
        small=small,
        include_mr=include_mr,
        syntaxes=syntaxes,
    )
    patient_plans: list[PatientPlan] = []
    study_plans: list[StudyPlan] = []
    for index in range(patients):
        patient, studies = planner.patient(index)
        patient_plans.append(patient)
        study_plans.extend(studies)
    series = list(planner.series)
    bad: list[BadObject] = []
    if include_bad:
        series = _mark_no_preamble(series)
        bad = _plan_bad(planner, series)
    return ArchivePlan(
        patients=tuple(patient_plans),
        studies=tuple(study_plans),
        series=tuple(series),
        bad=tuple(bad),
        transfer_syntaxes=planner.syntaxes,
    )


def _mark_no_preamble(series: list[SeriesPlan]) -> list[SeriesPlan]:
    """Write one Implicit VR series (a localizer if possible) without preamble or file meta."""
    implicit = [s for s in series if s.transfer_syntax == ImplicitVRLittleEndian]
    if not implicit:
        return series
    chosen = next((s for s in implicit if s.kind is SeriesKind.CT_SCOUT), implicit[0])
    return [SeriesPlan(**{**s.__dict__, "part10": False}) if s is chosen else s for s in series]


def _plan_bad(planner: _Planner, series: list[SeriesPlan]) -> list[BadObject]:
    axial = [s for s in series if s.kind is SeriesKind.CT_AXIAL]
    if not axial:
        return []
    first = axial[0]
    last = series[-1]
    study = first.study.folder
    uid = planner.uid
    return [
        BadObject(
            path=f"{study}/SE099/IM00001",
            kind="truncated",
            expected_reason="truncated",
            detail="transfer interrupted: the file ends in the middle of Pixel Data",
            source=first,
            series_uid=uid("bad-series", "truncated"),
            sop_uid=uid("bad-sop", "truncated"),
        ),
        BadObject(
            path=f"{study}/SE098/IM00001",
            kind="missing_attribute",
            expected_reason="missing_attribute",
            detail="SOPInstanceUID is absent from the dataset and the file meta",
            source=first,
            missing=("SOPInstanceUID",),
            series_uid=uid("bad-series", "no-sop"),
        ),
        BadObject(
            path=f"{last.folder}/IM99999",
            kind="missing_attribute",
            expected_reason="missing_attribute",
            detail="SeriesInstanceUID is absent",
            source=last,
            missing=("SeriesInstanceUID",),
            sop_uid=uid("bad-sop", "no-series"),
        ),
        BadObject(
            path=f"{first.folder}/IM00000",
            kind="empty",
            expected_reason="not_dicom",
            detail="zero-byte file",
        ),
        BadObject(
            path=f"{study}/preview.png",
            kind="not_dicom",
            expected_reason="not_dicom",
            detail="a PNG thumbnail left by a viewer",
        ),
        BadObject(
            path=f"{last.study.patient.folder}/export_log.txt",
            kind="not_dicom",
            expected_reason="not_dicom",
            detail="a text log written by the export tool",
        ),
    ]
