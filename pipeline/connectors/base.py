"""The interface every archive connector implements."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

from pipeline.enums import SourceKind

__all__ = ["ObjectRef", "Source"]


@dataclass(frozen=True)
class ObjectRef:
    """One object in an archive, as listed (before it is read).

    ``location`` is archive-relative (a POSIX path below a folder root, or a PACS reference
    ``studies/<uid>/series/<uid>/instances/<uid>``); it is what logs and quarantine rows name.
    """

    location: str
    size_bytes: int | None
    mtime_ns: int | None


@runtime_checkable
class Source(Protocol):
    """An archive pacsflow can crawl and read objects from.

    Implementations must be picklable (they travel to Dask workers) and hold no open
    connections between calls.
    """

    @property
    def kind(self) -> SourceKind:
        """What kind of archive this is."""
        ...

    @property
    def source_id(self) -> str:
        """A stable identifier of the archive, without credentials (stored in the index)."""
        ...

    def list_objects(self) -> Iterator[ObjectRef]:
        """Yield every object of the archive."""
        ...

    def open(self, location: str) -> BinaryIO:
        """Open one object for reading, by its ``location``."""
        ...
