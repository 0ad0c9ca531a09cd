"""The interface every archive connector implements.

A crawl works in **units**: the smallest piece of an archive whose change can be detected
cheaply and that a worker reads independently. For a folder a unit is one file (changed when its
size or mtime changes); for a PACS it is one study (changed when its watermark, the numbers of
series and instances QIDO-RS or C-FIND report for it, changes). The driver lists units, skips
unchanged ones, and hands the others to Dask workers in batches; a worker fetches a unit and
yields one :class:`RawObject` per object in it, which the crawl stage parses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from pipeline.enums import SkipReason, SourceKind

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "Destination",
    "RawObject",
    "Skipped",
    "Source",
    "StoreResult",
    "Unit",
    "result_path",
]


@dataclass(frozen=True)
class Unit:
    """One unit of an archive, as listed (before it is read).

    ``key`` is archive-relative and identifies the unit within its source: a POSIX path below
    a folder root, or ``studies/<StudyInstanceUID>`` for a PACS. ``watermark`` is what tells a
    changed unit from an unchanged one (``"<size>:<mtime_ns>"`` for a file,
    ``"<series>:<instances>"`` for a study); equal watermarks mean "skip".
    """

    key: str
    watermark: str
    size_bytes: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Skipped:
    """An entry of the archive that the listing passed over without making it a unit.

    ``location`` is archive-relative as for a unit (a folder's entry: a file, a link or a
    folder whose contents were not walked); ``reason`` says why. The crawl counts these per
    reason, so that every entry is accounted for once; PACS sources list none.
    """

    location: str
    reason: SkipReason


@dataclass(frozen=True)
class RawObject:
    """One object of a unit as a connector delivers it, before its header is parsed.

    ``location`` is the object's archive-relative location (a file path, or
    ``studies/<uid>/series/<uid>/instances/<uid>``); it is what logs and quarantine rows name.
    Exactly one of ``path`` (a local Part 10 file or bare dataset: a folder's file, or a DIMSE
    retrieval in the cache), ``stream`` (the same, as an open seekable binary file valid until
    the connector's iteration resumes: a member of a package, decompressed), ``dataset`` (a
    header without pixel data, e.g. WADO-RS metadata), ``error`` (a
    :class:`pipeline.errors.InputError` saying why the object could not be had) and ``skip``
    (a member of a package passed over on purpose, e.g. a link: counted, not an object) is
    set. Parsing is the crawl stage's job, not the connector's.
    """

    location: str
    unit_key: str
    size_bytes: int | None = None
    mtime_ns: int | None = None
    path: Path | None = None
    dataset: Dataset | None = None
    error: Exception | None = None
    stream: BinaryIO | None = None
    skip: SkipReason | None = None


@runtime_checkable
class Source(Protocol):
    """An archive pacsflow can crawl and read objects from.

    Implementations must be picklable (they travel to Dask workers), hold no open connection
    between calls, and never carry credentials in ``source_id``.
    """

    @property
    def kind(self) -> SourceKind:
        """What kind of archive this is."""
        ...

    @property
    def source_id(self) -> str:
        """A stable identifier of the archive, without credentials (stored in the index)."""
        ...

    def check(self) -> None:
        """Raise :class:`pipeline.errors.SourceError` when the archive cannot be reached."""
        ...

    def list_units(self) -> Iterator[Unit | Skipped]:
        """Yield every unit of the archive, streaming (never all at once), and a
        :class:`Skipped` for each entry passed over on purpose (with its reason)."""
        ...

    def read_unit(self, unit: Unit) -> Iterator[RawObject]:
        """Fetch one unit's objects (headers only where the protocol allows) and yield them.

        Per-object problems are raw objects with ``error`` set; a
        :class:`pipeline.errors.SourceError` (the archive went away) propagates.
        """
        ...

    def open(self, location: str) -> BinaryIO:
        """Open one object (a Part 10 stream) for reading, by its ``location``."""
        ...


@dataclass(frozen=True)
class StoreResult:
    """What a destination answered for one object sent to it."""

    sop_instance_uid: str
    stored: bool
    #: the destination's own words: "0x0000", "0xB000 (warning)", "HTTP 409", "written"
    status: str
    #: a failure worth retrying (connection lost, server busy), as opposed to a refusal
    transient: bool = False


@runtime_checkable
class Destination(Protocol):
    """Where write-back sends objects: the same three kinds as sources."""

    def store(self, files: list[Path]) -> list[StoreResult]:
        """Send Part 10 files; one result per file, in order. Transport failures of the whole
        batch raise :class:`pipeline.errors.SourceError`."""
        ...

    def confirm(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """Whether the destination holds the object now (asked again, not remembered)."""
        ...


def result_path(root: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where a folder destination keeps an object: ``<root>/<study>/<series>/<sop>.dcm``."""
    for uid in (study_uid, series_uid, sop_uid):
        if not uid or "/" in uid or uid.startswith("."):
            raise ValueError(f"not a UID: {uid!r}")
    return root / study_uid / series_uid / f"{sop_uid}.dcm"
