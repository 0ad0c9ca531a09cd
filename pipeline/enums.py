"""String enums shared across stages. Their values are what tables and configs store."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ObjectState", "QuarantineReason", "SkipReason", "SourceKind", "Stage", "Zone"]


class Stage(StrEnum):
    """Pipeline stages, named after the CLI verbs."""

    CRAWL = "crawl"
    DEID = "deid"
    TENSORS = "tensors"
    INFER = "infer"
    WRITEBACK = "writeback"
    REVIEW = "review"
    FHIR = "fhir"


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
    #: ``limits``: refused before anything of that size is allocated or inflated; also a
    #: member decompressing past ``max_decompressed_bytes``, packages nested deeper than
    #: ``max_archive_depth`` or holding more than ``max_archive_members`` members
    TOO_LARGE = "too_large"
    #: a header value its VR does not allow (e.g. Number of Frames ``1A``)
    MALFORMED_VALUE = "malformed_value"
    #: a package member that is encrypted (a zip with a password): never guessed at
    ENCRYPTED = "encrypted"
    #: a compressed file or package that is corrupt (bad CRC, no central directory, bad data)
    CORRUPT_ARCHIVE = "corrupt_archive"


class SkipReason(StrEnum):
    """Why the crawl skipped an entry of a folder archive without reading it (counted per
    reason in the run manifest; an entry is a file, a link or a folder, never both, or a
    member of a package: a FIFO or device member is ``not_regular_file``)."""

    #: pacsflow's own temporary file (``.*.tmp-*``, an atomic write in progress): skipped by design
    PACSFLOW_TEMPORARY = "pacsflow_temporary"
    #: a symlink whose target is inside the archive root: the walk reaches it at its own path
    SYMLINK_INSIDE_ROOT = "symlink_inside_root"
    #: a symlink whose target is outside the archive root (``source.follow_symlinks_outside_root``)
    SYMLINK_OUTSIDE_ROOT = "symlink_outside_root"
    #: any symlink, when ``crawl.follow_symlinks`` is false
    SYMLINK_NOT_FOLLOWED = "symlink_not_followed"
    #: a symlink to nothing, or a link loop
    BROKEN_SYMLINK = "broken_symlink"
    #: a folder already walked under another path (reached again through followed links)
    FOLDER_REPEAT = "folder_repeat"
    #: a FIFO, socket or device
    NOT_REGULAR_FILE = "not_regular_file"
    #: a folder that cannot be listed, or an entry that cannot be stat-ed (e.g. permissions)
    UNREADABLE = "unreadable"
    #: a member of a package (zip, tar) that is a symbolic or hard link
    ARCHIVE_LINK = "archive_link"
    #: a member of a package with the name of an earlier member (the first one is the object)
    ARCHIVE_DUPLICATE = "archive_duplicate"


class SourceKind(StrEnum):
    """Kinds of archive a crawl can read."""

    FOLDER = "folder"
    DICOMWEB = "dicomweb"
    DIMSE = "dimse"


class Zone(StrEnum):
    """The two zones of the lake, which never mix."""

    RESTRICTED = "restricted"
    RESEARCH = "research"
