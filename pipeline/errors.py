"""The one exception tree of pacsflow.

Every error a stage raises on purpose is a :class:`PacsflowError`. Per-object problems are
:class:`InputError` subclasses, each with a stable ``reason`` code that the quarantine table
stores; a stage catches them around each object, writes a quarantine row and carries on. Any
other exception is a bug and fails the run.

Messages name the object by archive-relative location or pseudonym, never by a patient
identifier, and say what to do next.
"""

from __future__ import annotations

from pipeline.enums import QuarantineReason

__all__ = [
    "Cancelled",
    "ConfigError",
    "FhirError",
    "GeometryError",
    "InputError",
    "LakeError",
    "MalformedValue",
    "MissingAttribute",
    "ModelError",
    "NoSpace",
    "NotDicom",
    "NotImplementedStage",
    "PacsflowError",
    "SourceError",
    "TooLarge",
    "UndecodablePixelData",
    "UnreadableDicom",
    "WritebackError",
]


class PacsflowError(Exception):
    """Base class of every error pacsflow raises on purpose."""


class Cancelled(BaseException):
    """The run was cancelled by a signal (SIGINT or SIGTERM): the stage stops where it is,
    finished batches are kept, and a rerun resumes.

    A ``BaseException`` like :class:`KeyboardInterrupt`, so that no ``except Exception``
    around an object or a batch can swallow it.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"cancelled by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class ConfigError(PacsflowError):
    """A configuration file, value or flag is invalid."""


class LakeError(PacsflowError):
    """The lake is missing, inconsistent or tampered with (e.g. a broken audit chain)."""


class NotImplementedStage(PacsflowError):
    """A CLI verb whose stage is not built yet."""


class InputError(PacsflowError):
    """One object cannot be used; it is quarantined with :attr:`reason`, and the run goes on."""

    reason: QuarantineReason = QuarantineReason.INVALID

    def __init__(self, message: str, *, reason: QuarantineReason | str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = QuarantineReason(reason)


class NotDicom(InputError):
    """The file is not DICOM at all (no DICM prefix and no parseable dataset)."""

    reason = QuarantineReason.NOT_DICOM


class UnreadableDicom(InputError):
    """The object looks like DICOM but cannot be parsed (truncated, corrupt)."""

    reason = QuarantineReason.UNREADABLE


class UndecodablePixelData(UnreadableDicom):
    """The object parses, but no installed codec decodes its pixel data."""

    reason = QuarantineReason.UNDECODABLE


class TooLarge(InputError):
    """A declared size (inflated header, frame, pixel data) is beyond the configured
    ``limits``; refused before it is allocated or inflated."""

    reason = QuarantineReason.TOO_LARGE


class MalformedValue(InputError):
    """A header value cannot be read as its VR says (the message names the attribute, never
    the value)."""

    reason = QuarantineReason.MALFORMED_VALUE


class MissingAttribute(InputError):
    """An attribute the pipeline needs (e.g. SOPInstanceUID) is absent or empty."""

    reason = QuarantineReason.MISSING_ATTRIBUTE


class GeometryError(InputError):
    """A series cannot become a volume (mixed orientation, gaps, ...)."""

    reason = QuarantineReason.GEOMETRY


class SourceError(PacsflowError):
    """The archive or PACS cannot be reached or answered badly; retry later."""


class ModelError(PacsflowError):
    """A model or bundle cannot be loaded or run."""


class WritebackError(PacsflowError):
    """A result object cannot be built, validated or delivered."""


class FhirError(PacsflowError):
    """A FHIR server refused or could not be reached (``transient``: worth a retry later).

    The message is one line: what failed (HTTP status, connection refused, timeout), never a
    resource's content.
    """

    def __init__(self, message: str, *, transient: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status = status


class NoSpace(PacsflowError):
    """A disk the run writes to is full (ENOSPC, or a quota: EDQUOT).

    Not a bug and not an object's fault: nothing is quarantined for it. The stage stops,
    what finished is kept, and the same command rerun once space is freed resumes.

    Attributes:
        device: the filesystem's device (e.g. ``/dev/sda1``, ``tmpfs``).
        mount: where it is mounted.
        needed: bytes the stage needed at least: all that was free when it started
            (0: unknown).
        free: bytes free there now.
    """

    def __init__(self, device: str, mount: str, *, needed: int = 0, free: int = 0) -> None:
        self.device, self.mount, self.needed, self.free = device, mount, needed, free
        at = f"{device} (mounted at {mount})" if device != mount else device
        need = f"needed more than ~{_mb(needed)} MB, " if needed else ""
        super().__init__(
            f"no space left on {at} ({need}{_mb(free)} MB free now): free space there and "
            "rerun the same command (finished batches are kept)"
        )


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}" if n < 1e6 else f"{n / 1e6:.1f}" if n < 100e6 else f"{n / 1e6:.0f}"
