"""The model registry (``configs/models.yaml``): which model applies to which series, and the
coded concepts of its labels and measurements that write-back puts into SEG and SR.

A registry entry::

    models:
      <name>:
        bundle: <folder in models/, or a bundle path>
        applies_to: "Modality = 'CT' AND volume_ok"     # DuckDB WHERE over the series table
        test_time:                                      # optional: test-time augmentation
          mirror_axes: [x, y]                           # each slice also flipped along these
          transpose_xy: true                            # and each view also transposed
        labels:
          <label name as in the bundle's channel_def>:
            category: [code value, scheme, meaning]     # SEG Segmented Property Category
            type: [code value, scheme, meaning]         # SEG Segmented Property Type
            modifier: [code value, scheme, meaning]     # optional: its modifier (e.g. Left)
        code_tables: [totalsegmentator]                 # labels not above: shipped tables
        code_table_paths: {totalsegmentator: fix.csv}   # optional: a corrected copy (relative
                                                        # to this file)
        measurements:
          volume_ml: {concept: [...], unit: [...]}
          mean_hu: {concept: [...], derivation: [...], unit: [...]}
        candidates:                                     # optional: lesions the label map implies
          <name>:                                       # findings <name>_1, <name>_2, ...
            within: <label>                             # regions this label encloses per slice
            min_hu: -300                                # and its voxels this dense (CT only)
            min_diameter_mm: 4.0                        # equivalent-sphere diameter range
            max_diameter_mm: 40.0
            max_elongation: 2.0                         # longest / shortest box side (mm)
            min_fill: 0.25                              # of its bounding box (a ball: 0.52)
            max_count: 20                               # per volume, largest first
            category: [...]
            type: [...]

        outputs:                                        # optional: findings vs measurements
          findings: [lung_nodule]                       # lesion-like: the review worklist's rows
          measurements: [soft_tissue, bone]             # per series: its measurements panel

        detection:                                      # detection bundles (boxes)
          score_threshold: 0.5                          # boxes scored lower are dropped
          max_boxes: 20                                 # the best ones per volume
          classes: {0: lung_nodule}                     # detector class -> label name

(:mod:`pipeline.infer.candidates` says how candidates are found; :mod:`pipeline.infer.detect`
how boxes are; :mod:`pipeline.codes.outputs` which outputs are findings: boxes, predicted classes
and every label ``outputs.measurements`` does not name.)

Codes are applied at write-back, not at inference (:mod:`pipeline.codes`): a label the entry does
not code is looked up by name in the ``code_tables`` (TotalSegmentator's SNOMED CT mapping by
default), else written back with a local ``99PACSFLOW`` code and reported before inference.
A bundle given by path that the registry does not name applies to every series that is a volume
(``volume_ok``); its labels are coded by the default tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import ConfigError

__all__ = [
    "CandidateSpec",
    "Code",
    "DetectionSpec",
    "InputChannel",
    "LabelSpec",
    "MeasurementSpec",
    "ModelEntry",
    "OutputsSpec",
    "Registry",
    "ReportSpec",
    "TestTime",
    "default_models_dir",
    "default_registry_path",
    "load_registry",
]

_CHECKOUT = Path(__file__).resolve().parents[2]


def default_registry_path() -> Path:
    """``configs/models.yaml`` of the pacsflow checkout."""
    return _CHECKOUT / "configs" / "models.yaml"


def default_models_dir() -> Path:
    """``models/`` of the pacsflow checkout."""
    return _CHECKOUT / "models"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Strict):
    """A coded concept: value, coding scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str

    @classmethod
    def parse(cls, raw: Any) -> Code:
        if isinstance(raw, list | tuple) and len(raw) == 3:
            return cls(value=str(raw[0]), scheme=str(raw[1]), meaning=str(raw[2]))
        return cls.model_validate(raw)


class LabelSpec(_Strict):
    """What one label means: SEG's Segmented Property Category and Type."""

    category: Code | None = None
    type: Code | None = None
    modifier: Code | None = None


class MeasurementSpec(_Strict):
    """One measurement reported per label (TID 1500 concept, derivation, unit)."""

    concept: Code
    unit: Code
    derivation: Code | None = None


class ReportSpec(_Strict):
    """The FHIR DiagnosticReport of the model's written-back results (``pacsflow fhir``):
    its code and category (defaults: DCM 126000 Imaging Measurement Report; v2-0074 RAD)."""

    code: Code | None = None
    category: Code | None = None


class CandidateSpec(_Strict):
    """Lesion candidates derived from the label map (:mod:`pipeline.infer.candidates`)."""

    within: str
    min_hu: float | None = -300.0
    min_diameter_mm: float = Field(4.0, gt=0)
    max_diameter_mm: float = Field(40.0, gt=0)
    max_elongation: float = Field(2.0, ge=1)
    min_fill: float = Field(0.25, ge=0, le=1)
    max_count: int = Field(20, ge=1, le=200)
    category: Code | None = None
    type: Code | None = None


class DetectionSpec(_Strict):
    """What a detection model's boxes become (:mod:`pipeline.infer.detect`): the boxes scored
    at least ``score_threshold``, the ``max_boxes`` best, each a finding
    ``<class name>_<rank>`` coded by ``labels[<class name>]``."""

    score_threshold: float = Field(0.5, ge=0, le=1)
    max_boxes: int = Field(20, ge=1, le=1000)
    #: the detector's class index -> name (default ``class_<index>``)
    classes: dict[int, str] = Field(default_factory=dict)

    def class_name(self, index: int) -> str:
        return self.classes.get(index, f"class_{index}")


class OutputsSpec(_Strict):
    """Which of a model's outputs are findings (lesion-like: reviewed one by one) and which
    are per-series measurements (tissue volumes, mean HU: the series' measurements panel).
    Labels named in neither are findings (:func:`pipeline.codes.outputs.output_kind`)."""

    findings: tuple[str, ...] = ()
    measurements: tuple[str, ...] = ()

    @field_validator("measurements")
    @classmethod
    def _not_both(cls, value: tuple[str, ...], info: Any) -> tuple[str, ...]:
        both = sorted(set(value) & set(info.data.get("findings", ())))
        if both:
            raise ValueError(f"outputs: {both[0]!r} is listed as a finding and a measurement")
        return value


class TestTime(_Strict):
    """Test-time augmentation of a model (:class:`pipeline.infer.engine.Segmenter`): the
    logits of every view, brought back, are averaged. Part of how the model was validated."""

    #: axes of MONAI's image (x = columns, y = rows, z = slices) the input is also flipped
    #: along, every combination of them
    mirror_axes: tuple[Literal["x", "y", "z"], ...] = ()
    #: each of those views also with x and y swapped
    transpose_xy: bool = False

    @property
    def views(self) -> int:
        """How many forward passes each input takes."""
        return 2 ** len(set(self.mirror_axes)) * (2 if self.transpose_xy else 1)


class InputChannel(_Strict):
    """One input channel of a multi-sequence model (:mod:`pipeline.infer.inputs`): the series
    of a study that feeds it, a DuckDB WHERE over the research ``series`` table joined with its
    instances' sequence attributes (``RepetitionTime``, ``EchoTime``, ``InversionTime``,
    ``FlipAngle``, ``ContrastBolusAgent``, ``ScanningSequence``, ``SeriesDescription`` where
    the de-identification kept it)."""

    #: the channel's name, as the bundle's input ``channel_def`` names it (e.g. ``T1c``)
    name: str
    where: str


class ModelEntry(_Strict):
    """One model of the registry."""

    name: str
    bundle: str
    applies_to: str = "volume_ok"
    test_time: TestTime = Field(default_factory=lambda: TestTime())
    labels: dict[str, LabelSpec] = Field(default_factory=dict)
    measurements: dict[str, MeasurementSpec] = Field(default_factory=dict)
    candidates: dict[str, CandidateSpec] = Field(default_factory=dict)
    #: the bundle's content hash (configs/ and scripts/) this entry pins: with an approval
    #: (``pacsflow models trust PATH``) the bundle's config code may run (pipeline.infer.trust)
    bundle_sha256: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")
    #: changes to the bundle's inference.json, ``id#path: plain value`` (e.g. a variant:
    #: ``displayable_configs#highres: false``)
    overrides: dict[str, Any] = Field(default_factory=dict)
    #: ids removed from inference.json (e.g. a keyword the installed MONAI no longer takes)
    drop: tuple[str, ...] = ()
    #: which outputs are findings and which per-series measurements (empty: all findings)
    outputs: OutputsSpec = Field(default_factory=lambda: OutputsSpec())
    #: the FHIR DiagnosticReport's code and category (pipeline.fhir)
    report: ReportSpec = Field(default_factory=lambda: ReportSpec())
    #: detection models: threshold, top-k and class names of the boxes
    detection: DetectionSpec = Field(default_factory=lambda: DetectionSpec())
    #: ``segmentation`` (label maps), ``classification`` (a class vector per image or
    #: volume), or ``auto``: the bundle's metadata decides (:func:`pipeline.infer.classify.task_of`)
    task: Literal["auto", "segmentation", "classification"] = "auto"
    #: multi-sequence input: the study's series stacked as the bundle's channels, in order,
    #: resampled onto the first one's grid (:mod:`pipeline.infer.inputs`); empty: one series
    inputs: tuple[InputChannel, ...] = ()
    #: label map value -> label name, where the bundle's postprocessing writes values other
    #: than its output channels (BraTS' lambda: 1, 2, 4); empty: the bundle's channel_def
    output_labels: dict[int, str] = Field(default_factory=dict)
    #: shipped code tables (pipeline.codes.TABLES) that code the labels ``labels`` does not
    code_tables: tuple[str, ...] = ("totalsegmentator",)
    #: a table name -> another copy of it (a path relative to the registry file)
    code_table_paths: dict[str, str] = Field(default_factory=dict)

    @field_validator("code_tables")
    @classmethod
    def _known_tables(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from pipeline.codes import TABLES

        unknown = [t for t in value if t not in TABLES]
        if unknown:
            raise ValueError(
                f"code_tables: no table {unknown[0]!r}; shipped: {', '.join(sorted(TABLES))}"
            )
        return value

    def output_kind(
        self,
        label: str,
        *,
        task: str | None = None,
        box: bool = False,
        predicted: bool | None = None,
    ) -> str:
        """``finding``, ``measurement`` or ``class_score``: what a findings row of this model
        is (:func:`pipeline.codes.outputs.output_kind`)."""
        from pipeline.codes.outputs import OutputRoles, output_kind

        roles = OutputRoles(
            findings=frozenset(self.outputs.findings),
            measurements=frozenset(self.outputs.measurements),
            candidates=frozenset(self.candidates),
        )
        return output_kind(roles, label, task=task, box=box, predicted=predicted)

    def label_codes(self, labels: list[str], registry_path: Path | None = None) -> dict[str, Any]:
        """The :class:`pipeline.codes.LabelCodes` of ``labels`` (finding labels: a
        candidate's ``<name>_<n>`` too) as write-back will apply them (label -> codes)."""
        from pipeline.codes import ModelCodes

        base = (registry_path or default_registry_path()).parent
        return ModelCodes(
            labels=dict(self.labels),
            candidates=dict(self.candidates),
            tables=self.code_tables,
            table_paths={k: base / v for k, v in self.code_table_paths.items()},
        ).resolve(labels)


class Registry(_Strict):
    """Every registered model, by name."""

    path: Path | None = None
    models: dict[str, ModelEntry] = Field(default_factory=dict)

    def entry(self, ref: str) -> ModelEntry:
        """The entry named ``ref``; for a bundle path the registry does not name, an ad hoc
        entry (every ``volume_ok`` series, no codes).

        Raises:
            ConfigError: ``ref`` is neither a registered name nor an existing path.
        """
        if ref in self.models:
            return self.models[ref]
        for entry in self.models.values():
            if entry.bundle == ref:
                return entry
        path = Path(ref).expanduser()
        if path.exists():
            return ModelEntry(name=path.stem, bundle=str(path))
        raise ConfigError(
            f"no model {ref!r}: not in the registry {self.path} "
            f"(there: {', '.join(sorted(self.models)) or 'none'}) and not a bundle path"
        )


def _codes(raw: Any, where: str) -> Any:
    """Turn ``[value, scheme, meaning]`` lists into Code mappings, recursively."""
    if isinstance(raw, dict):
        out = {}
        for key, value in raw.items():
            if key in ("category", "type", "modifier", "concept", "unit", "derivation", "code"):
                out[key] = Code.parse(value) if value is not None else None
            else:
                out[key] = _codes(value, f"{where}.{key}")
        return out
    return raw


def load_registry(path: Path | None = None) -> Registry:
    """Read and validate the registry at ``path`` (default :func:`default_registry_path`).

    Raises:
        ConfigError: the file is missing or malformed; the message names the entry and field.
    """
    path = path or default_registry_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"no model registry at {path} (set infer.registry)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models", {}), dict):
        raise ConfigError(f"{path}: expected a mapping with a `models:` mapping")
    models = {}
    for name, body in (raw.get("models") or {}).items():
        try:
            models[name] = ModelEntry.model_validate(
                {"name": name, **_codes(body or {}, str(name))}
            )
        except (ValidationError, ValueError) as exc:
            first = str(exc).splitlines()
            detail = " ".join(line.strip() for line in first[1:3])
            raise ConfigError(f"{path}: model {name!r}: {detail}") from None
    return Registry(path=path, models=models)
