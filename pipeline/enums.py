"""String enums shared across stages. Their values are what tables and configs store."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ObjectState", "QuarantineReason", "SourceKind", "Stage", "Zone"]


class Stage(StrEnum):
    """Pipeline stages, named after the CLI verbs."""

    CRAWL = "crawl"
    DEID = "deid"
    TENSORS = "tensors"
    INFER = "infer"
    WRITEBACK = "writeback"
    REVIEW = "review"


class ObjectState(StrEnum):
    """Where one crawled object stands. Later stages add their states."""

    SEEN = "seen"
    INDEXED = "indexed"
    QUARANTINED = "quarantined"
    GONE = "gone"
    DEIDENTIFIED = "deidentified"
    TENSORISED = "tensorised"
    INFERRED = "inferred"
    WRITTEN_BACK = "written_back"


class QuarantineReason(StrEnum):
    """Stable reason codes stored in the quarantine table."""

    NOT_DICOM = "not_dicom"
    UNREADABLE = "unreadable"
    TRUNCATED = "truncated"
    MISSING_ATTRIBUTE = "missing_attribute"
    DIRECTORY_RECORD = "directory_record"
    GEOMETRY = "geometry"
    UNDECODABLE = "undecodable"
    UNRETRIEVABLE = "unretrievable"
    BURNED_IN_PHI = "burned_in_phi"
    INVALID = "invalid"
    #: a declared size (header, frame, pixel data, inflated stream) beyond the configured
    #: ``limits``: refused before anything of that size is allocated or inflated
    TOO_LARGE = "too_large"
    #: a header value its VR does not allow (e.g. Number of Frames ``1A``)
    MALFORMED_VALUE = "malformed_value"


class SourceKind(StrEnum):
    """Kinds of archive a crawl can read."""

    FOLDER = "folder"
    DICOMWEB = "dicomweb"
    DIMSE = "dimse"


class Zone(StrEnum):
    """The two zones of the lake, which never mix."""

    RESTRICTED = "restricted"
    RESEARCH = "research"
