"""The Arrow schema of every lake table, declared here and nowhere else.

Columns holding DICOM attributes use the DICOM keyword (``SeriesInstanceUID``); columns pacsflow
derives use snake_case (``patient_token``, ``crawl_run``). Each schema carries
``pacsflow.schema_version`` in its metadata; a change of columns bumps :data:`SCHEMA_VERSION`
and the README's table documentation.

The restricted tables hold original identifiers and never leave ``restricted/``. The research
tables hold pseudonyms (``2.25.<int>`` UIDs, base32 patient tokens) and shifted dates only.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["SCHEMAS", "SCHEMA_VERSION", "schema_for"]

SCHEMA_VERSION = 4

_TS = pa.timestamp("us", tz="UTC")


def _schema(fields: list[pa.Field], doc: str) -> pa.Schema:
    return pa.schema(
        fields,
        metadata={"pacsflow.schema_version": str(SCHEMA_VERSION), "pacsflow.doc": doc},
    )


def _f(name: str, typ: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


_S = pa.string()
_I = pa.int64()
_F = pa.float64()
_B = pa.bool_()

INDEX = _schema(
    [
        _f("object_key", _S, False),  # sha256(source_id + location): stable id of an object
        _f("source", _S, False),  # source id: folder path or PACS URI without credentials
        _f("source_kind", _S, False),  # folder | dicomweb | dimse
        _f("location", _S, False),  # archive-relative path or PACS reference
        _f("unit_key", _S, False),  # the crawl unit holding it: the file, or studies/<uid>
        _f("PatientID", _S),
        _f("StudyInstanceUID", _S),
        _f("SeriesInstanceUID", _S),
        _f("SOPInstanceUID", _S),
        _f("SOPClassUID", _S),
        _f("Modality", _S),
        _f("TransferSyntaxUID", _S),
        _f("InstanceNumber", _I),
        _f("has_pixel_data", _B),
        _f("size_bytes", _I),
        _f("mtime_ns", _I),  # file mtime, or the PACS timestamp
        _f("fingerprint", _S),  # blake2b of the header bytes and size, or of WADO-RS metadata
        _f("crawl_run", _S, False),
        _f("state", _S, False),  # pipeline.enums.ObjectState
        _f("crawled_at", _TS, False),
    ],
    "restricted: one row per crawled object",
)

QUARANTINE = _schema(
    [
        _f("object_key", _S, False),
        _f("source", _S, False),
        _f("location", _S, False),
        _f("unit_key", _S, False),
        _f("stage", _S, False),  # pipeline.enums.Stage
        _f("reason", _S, False),  # pipeline.enums.QuarantineReason
        _f("error_class", _S, False),
        _f("message", _S, False),  # never PHI: locations and pseudonyms only
        _f("size_bytes", _I),
        _f("mtime_ns", _I),
        _f("run_id", _S, False),
        _f("quarantined_at", _TS, False),
    ],
    "restricted: one row per object that could not be used, with a reason code",
)

UNITS = _schema(
    [
        _f("source", _S, False),
        _f("unit_key", _S, False),  # a file path, or studies/<StudyInstanceUID>
        _f("watermark", _S, False),  # "<size>:<mtime_ns>" or "<series>:<instances>"
        _f("n_objects", _I, False),
        _f("object_keys", pa.list_(_S)),  # every object seen in the unit this time
        _f("state", _S, False),  # read | gone
        _f("run_id", _S, False),
        _f("crawled_at", _TS, False),
    ],
    "restricted: one row per crawl unit read (or found gone) in a run: the incremental state",
)

VAULT = _schema(
    [
        _f("object_key", _S, False),
        _f("fingerprint", _S),  # of the header de-identified (reruns skip unchanged objects)
        _f("PatientID", _S),  # original
        _f("PatientName", _S),  # original, for `pacsflow verify`
        _f("PatientBirthDate", _S),  # original, for `pacsflow verify`
        _f("AccessionNumber", _S),  # original, for `pacsflow verify`
        # originals, for `pacsflow verify` (several values joined by backslashes, as DICOM)
        _f("OtherPatientIDs", _S),  # Other Patient IDs and Other Patient IDs Sequence
        _f("OtherPatientNames", _S),
        _f("PatientAddress", _S),
        _f("PatientTelephoneNumbers", _S),
        _f("StudyInstanceUID", _S, False),  # original
        _f("SeriesInstanceUID", _S, False),  # original
        _f("SOPInstanceUID", _S, False),  # original
        _f("patient_token", _S, False),
        _f("study_pseudonym", _S, False),
        _f("series_pseudonym", _S, False),
        _f("sop_pseudonym", _S, False),
        _f("deid_version", _S, False),
        _f("run_id", _S, False),
        _f("deidentified_at", _TS, False),
        # burned-in text blacked out (deid.clean_pixels): JSON [[frame, x0, y0, x1, y1], ...]
        # in pixels, end exclusive; whoever reads the source's pixels must apply them
        _f("pixel_redactions", _S),
    ],
    "restricted: the way back from pseudonyms to originals (write-back), and deid state",
)

OUTBOX = _schema(
    [
        _f("result_uid", _S, False),  # SOP Instance UID of the SEG/SR (deterministic)
        _f("kind", _S, False),  # SEG | SR
        _f("dest", _S, False),  # where it goes (folder path or URI, no credentials)
        _f("status", _S, False),  # built | invalid | refused | failed | sent | confirmed
        _f("detail", _S),  # the destination's or validator's words (no header values)
        _f("attempts", _I, False),  # sending attempts in this run
        _f("StudyInstanceUID", _S, False),  # original study (re-identified)
        _f("SeriesInstanceUID", _S, False),  # the result's own series
        _f("source_series_uid", _S, False),  # original source series
        _f("source_series_pseudonym", _S, False),
        _f("tensor_key", _S, False),
        _f("model", _S, False),
        _f("model_version", _S, False),
        _f("weights_sha256", _S, False),
        _f("path", _S, False),  # the built object, relative to restricted/ (results/<uid>.dcm)
        _f("run_id", _S, False),
        _f("updated_at", _TS, False),
    ],
    "restricted: SEG/SR objects built for sending, one row per status change (latest wins)",
)

PATIENTS = _schema(
    [
        _f("patient_token", _S, False),
        _f("PatientSex", _S),
        _f("n_studies", _I),
        _f("n_series", _I),
        _f("n_instances", _I),
    ],
    "research: one row per pseudonymous patient",
)

STUDIES = _schema(
    [
        _f("StudyInstanceUID", _S, False),  # pseudonym 2.25.<int>
        _f("patient_token", _S, False),
        _f("StudyDate", pa.date32()),  # shifted
        _f("PatientAge", _S),
        _f("ModalitiesInStudy", pa.list_(_S)),
        _f("n_series", _I),
        _f("n_instances", _I),
        # issue #24: PatientAge ('049Y', '018M', '003W', '010D') in years, null when absent
        _f("patient_age_years", _F),
    ],
    "research: one row per study",
)

SERIES = _schema(
    [
        _f("SeriesInstanceUID", _S, False),
        _f("StudyInstanceUID", _S, False),
        _f("patient_token", _S, False),
        _f("Modality", _S),
        _f("BodyPartExamined", _S),
        _f("Manufacturer", _S),
        _f("ManufacturerModelName", _S),
        _f("SeriesNumber", _I),
        _f("SeriesDate", pa.date32()),
        _f("SliceThickness", _F),
        _f("KVP", _F),
        _f("MagneticFieldStrength", _F),
        _f("n_instances", _I),
        _f("Rows", _I),
        _f("Columns", _I),
        _f("orientation", pa.list_(_F)),
        _f("PixelSpacing", pa.list_(_F)),
        _f("slice_spacing", _F),
        _f("slice_spacing_uniform", _B),
        _f("volume_shape", pa.list_(_I)),
        _f("volume_ok", _B),
        _f("volume_reason", _S),
    ],
    "research: one row per series, with geometry and whether it can become a volume "
    "(hive-partitioned by Modality)",
)

INSTANCES = _schema(
    [
        # keys (pseudonyms) and the partition column (hive folder Modality=<value>)
        _f("SOPInstanceUID", _S, False),  # 2.25.<int>
        _f("SeriesInstanceUID", _S, False),
        _f("StudyInstanceUID", _S, False),
        _f("FrameOfReferenceUID", _S),
        _f("patient_token", _S, False),
        _f("SOPClassUID", _S),
        _f("Modality", _S),
        _f("TransferSyntaxUID", _S),
        # what selection and analysis use, typed, named by DICOM keyword
        _f("BodyPartExamined", _S),
        _f("Manufacturer", _S),
        _f("ManufacturerModelName", _S),
        _f("SeriesNumber", _I),
        _f("InstanceNumber", _I),
        _f("AcquisitionNumber", _I),
        _f("ImageType", pa.list_(_S)),
        _f("ImagePositionPatient", pa.list_(_F)),
        _f("ImageOrientationPatient", pa.list_(_F)),
        _f("PixelSpacing", pa.list_(_F)),
        _f("SliceThickness", _F),
        _f("SpacingBetweenSlices", _F),
        _f("SliceLocation", _F),
        _f("Rows", _I),
        _f("Columns", _I),
        _f("NumberOfFrames", _I),
        _f("BitsAllocated", _I),
        _f("BitsStored", _I),
        _f("PixelRepresentation", _I),
        _f("PhotometricInterpretation", _S),
        _f("RescaleSlope", _F),
        _f("RescaleIntercept", _F),
        _f("KVP", _F),
        _f("XRayTubeCurrent", _F),
        _f("Exposure", _F),
        _f("ConvolutionKernel", pa.list_(_S)),
        _f("ContrastBolusAgent", _S),
        _f("MagneticFieldStrength", _F),
        _f("RepetitionTime", _F),
        _f("EchoTime", _F),
        _f("InversionTime", _F),
        _f("FlipAngle", _F),
        _f("ScanningSequence", pa.list_(_S)),
        _f("StudyDate", pa.date32()),  # shifted by the patient's offset
        _f("SeriesDate", pa.date32()),  # shifted
        _f("AcquisitionDate", pa.date32()),  # shifted
        _f("ContentDate", pa.date32()),  # shifted (StudyDate when absent)
        _f("PatientAge", _S),  # when the profile retains it
        _f("PatientSex", _S),  # when the profile retains it
        _f("PatientSize", _F),  # when the profile retains it
        _f("PatientWeight", _F),  # when the profile retains it
        # derived
        _f("header_json", _S),  # the whole de-identified header as DICOM JSON
        _f("deid_version", _S, False),
    ],
    "research: one row per de-identified instance (hive-partitioned by Modality)",
)

TENSORS = _schema(
    [
        _f("tensor_key", _S, False),  # <series>/<preprocessing hash>-<deid>-<volume index>
        _f("SeriesInstanceUID", _S, False),  # pseudonym
        _f("volume_index", _I),  # 0.. for the volumes of a 4D series
        _f("n_volumes", _I),
        _f("status", _S, False),  # ok | refused
        _f("reason", _S),  # why the series is not a volume (refused)
        _f("path", _S),  # relative to research/, e.g. tensors/<series>/<...>.npy
        _f("shape", pa.list_(_I)),  # array shape (slices, rows, columns)
        _f("spacing", pa.list_(_F)),  # mm, array axis order
        _f("affine", pa.list_(_F)),  # 4x4 row-major, voxel (i=column, j=row, k=slice) -> LPS mm
        _f("dtype", _S),
        _f("checksum", _S),  # "sha256:<hex>" of the file
        _f("rescaled", _B),  # Rescale Slope/Intercept applied (HU for CT)
        _f("sop_instance_uids", pa.list_(_S)),  # pseudonyms, slice order of the raw grid
        _f("frame_numbers", pa.list_(_I)),  # 1-based frame of each slice in its object
        _f("preprocessing", _S),  # JSON
        _f("preprocessing_hash", _S),
        _f("deid_version", _S),
        # 2D tensors (issue #21: radiographs, mammograms, ultrasound, cine); null for volumes
        _f("tensor_kind", _S),  # volume (null in rows before it) | planar | cine
        _f("PhotometricInterpretation", _S),  # of the source object (stored: MONOCHROME2/RGB)
        _f("monochrome1_inverted", _B),  # MONOCHROME1 inverted to MONOCHROME2
        _f("pixel_spacing_source", _S),  # PixelSpacing | ImagerPixelSpacing | SequenceOf...
        _f("PixelSpacingCalibrationType", _S),
        _f("EstimatedRadiographicMagnificationFactor", _F),
        _f("voi", _S),  # VOI applied: none | window | voi_lut
        _f("WindowCenter", _F),  # the object's first window (recorded whether applied or not)
        _f("WindowWidth", _F),
        _f("VOILUTFunction", _S),
        _f("PresentationIntentType", _S),  # FOR PRESENTATION | FOR PROCESSING
        _f("ViewPosition", _S),
        _f("ImageLaterality", _S),
        _f("Laterality", _S),
        _f("FrameTime", _F),  # ms between frames of a cine
        _f("FrameTimeVector", pa.list_(_F)),  # ms, per frame (the first 0)
        # diffusion (issue #21): b-value (s/mm^2) and unit gradient direction of the volume,
        # in the patient frame (LPS) and in dcm2niix's .bvec convention (source grid)
        _f("bvalue", _F),
        _f("bvec", pa.list_(_F)),
        _f("bvec_dcm2niix", pa.list_(_F)),
        # "<SOP class>/<image type 1>" when one Series Instance UID holds several acquisitions
        _f("acquisition", _S),
    ],
    "research: one row per stored volume or 2D image, or per series that cannot be one "
    "(status refused)",
)

FINDINGS = _schema(
    [
        _f("finding_key", _S, False),  # <tensor_key>/<model>@<version>+<weights12>/<label>
        _f("SeriesInstanceUID", _S, False),  # pseudonym
        _f("tensor_key", _S, False),
        _f("tensor_checksum", _S),  # the tensors row's checksum: what the model saw
        _f("volume_index", _I),
        _f("model", _S, False),
        _f("model_version", _S, False),
        _f("weights_sha256", _S, False),
        _f("label", _S, False),
        _f("label_value", _I),  # the value of the label in the mask
        # legacy: codes are applied at write-back (pipeline.codes), no longer frozen here; rows
        # inferred before issue #22 may hold [value, scheme, meaning]
        _f("category_code", pa.list_(_S)),
        _f("type_code", pa.list_(_S)),
        _f("score", _F),  # a model's confidence where it gives one (segmentation: null)
        _f("voxel_count", _I),
        _f("volume_ml", _F),
        _f("mean_hu", _F),  # mean Hounsfield units in the label (rescaled CT tensors), else null
        _f("bbox", pa.list_(_I)),  # [k0, j0, i0, k1, j1, i1] inclusive voxel indices, or null
        _f("measurements", _S),  # JSON: the above and any other measurement, with units
        _f("mask_path", _S),  # relative to research/: masks/<tensor_key>/<model ref>.npy
        _f("mask_checksum", _S),
        _f("device", _S),  # cpu | cuda (and the autocast dtype)
        _f("run_id", _S),
        _f("inferred_at", _TS),
        # detection models (a row per box; segmentation: null)
        _f("box_class", _S),  # the detector's class name (registry detection.classes)
        _f("box_voxel", pa.list_(_F)),  # [k0, j0, i0, k1, j1, i1] continuous tensor indices
        _f("box_mm", pa.list_(_F)),  # [x0, y0, z0, x1, y1, z1] LPS mm
        # boxes, and (issue #24) segmentation labels: the centroid of the label's voxels
        _f("centre_mm", pa.list_(_F)),  # [x, y, z] LPS mm
        _f("size_mm", pa.list_(_F)),  # [x, y, z] extents, mm
        # issue #22: classification models (one row per class, score its probability)
        _f("task", _S),  # segmentation (null in rows before it) | classification
        _f("predicted", _B),  # classification: this class is the image's top score
        _f("model_entry", _S),  # the registry entry that ran (write-back codes from it)
        # issue #24: the keys a cohort filters on, copied from the research tables at
        # inference (pseudonyms and the shifted date), so that no join is needed
        _f("patient_token", _S),
        _f("StudyInstanceUID", _S),  # pseudonym
        _f("Modality", _S),
        _f("Manufacturer", _S),
        _f("StudyDate", pa.date32()),  # shifted
        _f("patient_age_years", _F),  # the study's PatientAge in years
        # the acquisition: reconstructions of one acquisition (soft-tissue and lung kernels)
        # share both; findings there are linked by the `findings` view's lesion_id
        _f("FrameOfReferenceUID", _S),  # pseudonym
        _f("AcquisitionNumber", _I),
        # `label` is the class (lung_nodule); `instance` numbers the candidates or boxes of a
        # class in one volume (1 = the first; null for a label map's label or a class). Rows
        # before issue #24 held `<class>_<n>` in `label` and null here: the `findings` view
        # splits them. The segment's unique name is `<label>_<instance>` (finding_key).
        _f("instance", _I),
        # typed measurements (also in `measurements`, with units)
        _f("mean_value", _F),  # mean stored value in the label (any modality)
        _f("diameter_mm", _F),  # candidates: diameter of the sphere of the same volume
        _f("elongation", _F),  # candidates: longest / shortest bounding-box side
    ],
    "research: one row per (volume, model, label or box); a new model version adds rows",
)

REVIEWS = _schema(
    [
        _f("review_id", _S, False),
        _f("finding_key", _S, False),
        _f("model_version", _S),
        _f("tensor_checksum", _S),
        _f("reviewer", _S, False),
        _f("decision", _S, False),  # accept | reject | uncertain
        _f("corrected_label", _S),
        _f("comment", _S),
        _f("reviewed_at", _TS, False),
        # issue #24: the finding's cohort keys (pseudonyms, shifted date) when decided
        _f("patient_token", _S),
        _f("StudyInstanceUID", _S),
        _f("SeriesInstanceUID", _S),
        _f("Modality", _S),
        _f("Manufacturer", _S),
        _f("StudyDate", pa.date32()),
    ],
    "research: one row per reviewer decision (history kept)",
)

QUEUES = _schema(
    [
        _f("queue_id", _S, False),
        _f("name", _S, False),
        _f("reviewers", pa.list_(_S), False),  # one reader, or two reading blind
        _f("finding_keys", pa.list_(_S), False),  # in reading order, fixed when assigned
        _f("spec", _S),  # the worklist filter it was made from (a query string), or null
        _f("assigned_by", _S, False),
        _f("assigned_at", _TS, False),
    ],
    "research: review queues a lead assigned (latest row per queue_id)",
)

CORRECTIONS = _schema(
    [
        _f("correction_id", _S, False),
        _f("finding_key", _S, False),
        _f("tensor_key", _S, False),
        _f("SeriesInstanceUID", _S),  # pseudonym
        _f("model", _S),
        _f("model_version", _S),
        _f("weights_sha256", _S),
        _f("tensor_checksum", _S),  # the tensors row's checksum: what the model saw
        _f("base_mask_path", _S),  # the model's mask the reviewer started from
        _f("base_mask_checksum", _S),
        _f("label_value", _I),  # the finding's value in the model's mask
        _f("mask_path", _S),  # relative to research/: masks/<tensor_key>/corrections/<id>.npy
        _f("mask_checksum", _S),  # "sha256:<hex>" of the .npy file (uint8, 1 = the finding)
        _f("voxel_count", _I),
        _f("shape", pa.list_(_I)),
        _f("reviewer", _S, False),
        _f("corrected_at", _TS, False),
        # issue #24: the finding's cohort keys (pseudonyms, shifted date) when corrected
        _f("patient_token", _S),
        _f("StudyInstanceUID", _S),
        _f("Modality", _S),
        _f("Manufacturer", _S),
        _f("StudyDate", pa.date32()),
    ],
    "research: one row per reviewer's corrected mask (issue #23; history kept)",
)

#: a coding as FHIR carries it (issue #25): system URI, code, display (de-identified as a DICOM
#: Code Meaning: the canonical meaning of a known code, else null unless kept by configuration)
_CODING = pa.list_(pa.struct([("system", _S), ("code", _S), ("display", _S)]))

ORDERS = _schema(
    [
        _f("order_key", _S, False),  # keyed pseudonym of ServiceRequest/<id>
        _f("version_id", _S),  # meta.versionId (the newest version of a resource wins)
        _f("last_updated", _TS),  # meta.lastUpdated, shifted by the patient's offset
        _f("StudyInstanceUID", _S, False),  # pseudonym 2.25.<int> (as in studies)
        _f("patient_token", _S, False),
        _f("accession_token", _S),  # AccessionNumber token (as in the de-identified headers)
        _f("status", _S),  # ServiceRequest.status
        _f("intent", _S),
        _f("priority", _S),  # routine | urgent | asap | stat
        _f("category", _CODING),
        _f("code", _CODING),  # the procedure ordered
        _f("code_codes", pa.list_(_S)),  # the code values of `code`, for filters
        _f("reason_code", _CODING),  # the indication
        _f("reason_codes", pa.list_(_S)),  # the code values of `reason_code`, for filters
        _f("reason_text", _S),  # free text: null unless the profile keeps such text
        _f("body_site", _CODING),
        _f("note", _S),  # free text: null unless the profile keeps such text
        _f("requester_kind", _S),  # resource type of the requester (Practitioner, ...), no id
        _f("authored_on", _TS),  # shifted
        _f("occurrence", _TS),  # occurrenceDateTime or occurrencePeriod.start, shifted
        _f("run_id", _S, False),
        _f("imported_at", _TS, False),
    ],
    "research: one row per ServiceRequest (the order and reason for an exam) matched to a "
    "crawled study, from the EHR (issue #25)",
)

REPORTS = _schema(
    [
        _f("report_key", _S, False),  # keyed pseudonym of DiagnosticReport/<id>
        _f("version_id", _S),
        _f("last_updated", _TS),  # shifted
        _f("StudyInstanceUID", _S, False),  # pseudonym
        _f("patient_token", _S, False),
        _f("accession_token", _S),
        _f("order_key", _S),  # the ServiceRequest it is basedOn (orders.order_key)
        _f("status", _S),  # registered | partial | preliminary | final | amended | ...
        _f("category", _CODING),
        _f("code", _CODING),
        _f("code_codes", pa.list_(_S)),
        _f("conclusion", _S),  # free text: null unless the profile keeps such text
        _f("conclusion_code", _CODING),  # the coded findings
        _f("conclusion_codes", pa.list_(_S)),  # the code values of `conclusion_code`
        _f("performer_kind", pa.list_(_S)),  # resource types of the performers, no ids
        _f("n_results", _I),  # Observations referenced in `result`
        _f("has_presented_form", _B),  # the report text attached (never copied)
        _f("effective", _TS),  # effectiveDateTime or effectivePeriod.start, shifted
        _f("issued", _TS),  # shifted
        _f("run_id", _S, False),
        _f("imported_at", _TS, False),
    ],
    "research: one row per radiology DiagnosticReport matched to a crawled study, latest "
    "version (issue #25)",
)

FHIR_OUTBOX = _schema(
    [
        _f("bundle_id", _S, False),  # uuid5 of the result's identity: the Bundle's id
        _f("result_key", _S, False),  # <tensor_key>/<model>@<version>+<weights12> (pseudonyms)
        _f("dest", _S, False),  # folder path or server base URL (no credentials)
        _f("status", _S, False),  # built | refused | failed | sent | confirmed
        _f("detail", _S),  # the server's words or the error, one line (no identifiers)
        _f("attempts", _I, False),  # sending attempts in this run
        _f("report_status", _S),  # the DiagnosticReport's: preliminary | final | cancelled
        _f("bundle_sha256", _S, False),  # of the Bundle's JSON: a changed Bundle is sent again
        _f("n_resources", _I),
        _f("path", _S, False),  # the built Bundle, relative to restricted/ (fhir/bundles/...)
        _f("run_id", _S, False),
        _f("updated_at", _TS, False),
    ],
    "restricted: FHIR Bundles of written-back results, one row per status change (latest "
    "wins); pseudonymous keys only, the identifiers are in the Bundle files",
)

#: Every lake table's schema, by table name.
SCHEMAS: dict[str, pa.Schema] = {
    "index": INDEX,
    "quarantine": QUARANTINE,
    "units": UNITS,
    "vault": VAULT,
    "outbox": OUTBOX,
    "patients": PATIENTS,
    "studies": STUDIES,
    "series": SERIES,
    "instances": INSTANCES,
    "tensors": TENSORS,
    "findings": FINDINGS,
    "reviews": REVIEWS,
    "queues": QUEUES,
    "corrections": CORRECTIONS,
    "orders": ORDERS,
    "reports": REPORTS,
    "fhir_outbox": FHIR_OUTBOX,
}


def schema_for(table: str) -> pa.Schema:
    """The schema of lake table ``table``.

    Raises
    ------
    KeyError
        For an unknown table name, listing the known ones.
    """
    try:
        return SCHEMAS[table]
    except KeyError:
        raise KeyError(f"no schema for table {table!r}; tables: {', '.join(SCHEMAS)}") from None
