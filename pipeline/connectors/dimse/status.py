"""DIMSE status codes and the outcome of a C-GET or C-MOVE (PS3.4 C.4.2.1.5, C.4.3.1.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "PENDING",
    "STORE_OK",
    "STORE_OUT_OF_RESOURCES",
    "STORE_REFUSED",
    "STORE_SUCCESS",
    "SUCCESS",
    "WARNING",
    "Outcome",
    "int_or_none",
    "uids",
]

SUCCESS: Final = 0x0000
WARNING: Final = 0xB000
PENDING: Final = frozenset({0xFF00, 0xFF01})
#: Statuses a Storage SCP handler returns: success, out of resources, cannot understand.
STORE_SUCCESS: Final = 0x0000
STORE_OUT_OF_RESOURCES: Final = 0xA700
STORE_REFUSED: Final = 0xC000
#: C-STORE statuses that mean "stored" (PS3.4 B.2.3): success and the warnings (coercion,
#: elements discarded, data set does not match the SOP class)
STORE_OK: Final = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class Outcome:
    """The final response of a C-GET or C-MOVE."""

    service: str
    status: int
    completed: int
    failed: int
    warning: int
    failed_uids: tuple[str, ...]
    #: the standard's words for ``status`` (PS3.4 C.4.2.1.5 / C.4.3.1.4), e.g. "Move
    #: destination unknown"
    meaning: str = ""

    @property
    def ok(self) -> bool:
        """Every sub-operation succeeded (or warned)."""
        return self.status in (SUCCESS, WARNING) and self.failed == 0

    def describe(self) -> str:
        """E.g. ``C-GET status 0xB000, 8 of 18 sub-operations failed``."""
        total = self.completed + self.failed + self.warning
        meaning = f" ({self.meaning})" if self.meaning and self.status != WARNING else ""
        counts = f", {self.failed} of {total} sub-operations failed" if total else ""
        return f"{self.service} status 0x{self.status:04X}{meaning}{counts}"


def int_or_none(ds: Dataset | None, keyword: str) -> int | None:
    """An integer attribute of a response (IS, US), or None when absent, empty or bad."""
    if ds is None:
        return None
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def uids(value: Any) -> tuple[str, ...]:
    """The UIDs of a UI attribute value (one, a list, a backslash-joined string, or none)."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split("\\") if v)
    return tuple(str(v) for v in value if v)
