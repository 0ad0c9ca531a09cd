"""C-FIND (Study Root): listing studies, counting them, finding instances; the crawl window.

A unit is one study, ``studies/<StudyInstanceUID>``, listed by a STUDY-level C-FIND with the
watermark ``"<NumberOfStudyRelatedSeries>:<NumberOfStudyRelatedInstances>"``; studies whose
counts the PACS leaves empty are counted at SERIES level (IMAGE level if needed).

Logs name AE titles and counts only, never patient identifiers. pynetdicom itself logs C-FIND
identifiers at DEBUG level (its ``LOG_REQUEST_IDENTIFIERS``); keep the ``pynetdicom`` logger
at INFO or above in production.
"""

from __future__ import annotations

import itertools
import logging
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from datetime import time as dtime
from typing import TYPE_CHECKING, Final

from pipeline.connectors.base import Unit
from pipeline.connectors.dimse.association import find_association
from pipeline.connectors.dimse.cache import UNKNOWN_SERIES
from pipeline.connectors.dimse.presentation import DEFAULT_STORAGE_CLASSES, FIND
from pipeline.connectors.dimse.status import PENDING, SUCCESS, int_or_none, uids
from pipeline.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from pydicom import Dataset
    from pynetdicom.association import Association

    from pipeline.connectors.dimse.source import DimseSource

logger = logging.getLogger(__name__)

__all__ = [
    "Target",
    "apply_filters",
    "check_filters",
    "check_window",
    "count_study",
    "dimse_confirm",
    "expected_instances",
    "find",
    "find_instances",
    "in_window",
    "list_studies",
    "local_now",
    "parse_window",
    "sop_classes",
]

#: Studies listed per batch before the ones without counts get a SERIES-level C-FIND.
_LISTING_BATCH: Final = 256
#: Keys of our own C-FIND identifiers, which ``study_filters`` may not override.
_RESERVED_KEYS: Final = frozenset(
    {"QueryRetrieveLevel", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"}
)


# ---------------------------------------------------------------------------------------------
# the crawl window
# ---------------------------------------------------------------------------------------------


def local_now() -> datetime:
    """The local wall-clock time (the default clock of the crawl window)."""
    return datetime.now()


def parse_window(window: str) -> tuple[dtime, dtime]:
    """``"19:00-07:00"`` -> ``(19:00, 07:00)`` (validated by :class:`DimseConfig`)."""
    start, end = window.split("-")
    h1, m1 = start.split(":")
    h2, m2 = end.split(":")
    return dtime(int(h1), int(m1)), dtime(int(h2), int(m2))


def in_window(window: str | None, now: datetime) -> bool:
    """Whether ``now`` (local time) lies in ``window``, which may wrap midnight.

    The start is inside the window and the end is not: ``19:00-07:00`` allows 19:00 to
    06:59:59.

    Parameters
    ----------
    window:
        ``HH:MM-HH:MM`` or None (always inside).
    now:
        The local time to test.

    Returns
    -------
    bool
        True inside the window.
    """
    if window is None:
        return True
    start, end = parse_window(window)
    t = now.time()
    if start < end:
        return start <= t < end
    return t >= start or t < end


def check_window(window: str | None, clock: Callable[[], datetime]) -> None:
    """Raise :class:`SourceError` when ``clock()`` lies outside ``window``."""
    if not in_window(window, clock()):
        raise SourceError(
            f"outside the crawl window {window} (local time); rerun inside it: "
            "finished studies are kept"
        )


# ---------------------------------------------------------------------------------------------
# identifiers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What one retrieval asks for: a study, or one instance of it."""

    study_uid: str
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_uids: tuple[str, ...] = ()

    def query(self) -> Dataset:
        """The C-GET/C-MOVE identifier: STUDY level, or IMAGE level (a UID list allowed)."""
        from pydicom import Dataset

        ds = Dataset()
        ds.StudyInstanceUID = self.study_uid
        sops = list(self.sop_uids) or ([self.sop_uid] if self.sop_uid else [])
        if not sops:
            ds.QueryRetrieveLevel = "STUDY"
            return ds
        ds.QueryRetrieveLevel = "IMAGE"
        ds.SeriesInstanceUID = self.series_uid or ""
        ds.SOPInstanceUID = sops if len(sops) > 1 else sops[0]
        return ds


def check_filters(filters: Iterable[tuple[str, str]]) -> None:
    """Raise ConfigError for a study filter that is not a DICOM keyword or is reserved."""
    from pydicom.datadict import tag_for_keyword

    for keyword, _value in filters:
        if tag_for_keyword(keyword) is None:
            raise ConfigError(
                f"source.study_filters: {keyword!r} is not a DICOM keyword (e.g. StudyDate, "
                "ModalitiesInStudy, AccessionNumber)"
            )
        if keyword in _RESERVED_KEYS:
            raise ConfigError(f"source.study_filters: {keyword!r} is set by the connector")


def apply_filters(query: Dataset, filters: Iterable[tuple[str, str]]) -> None:
    """Add the configured study filters as matching keys (backslash-separated: a list)."""
    for keyword, value in filters:
        setattr(query, keyword, value.split("\\") if "\\" in value else value)


# ---------------------------------------------------------------------------------------------
# C-FIND
# ---------------------------------------------------------------------------------------------


def find(source: DimseSource, assoc: Association, query: Dataset) -> Iterator[Dataset]:
    """Send a Study Root C-FIND and yield its matches; raise unless it ends in success."""
    final: int | None = None
    for status, identifier in assoc.send_c_find(query, FIND):
        if "Status" not in status:
            break
        code = int(status.Status)
        if code in PENDING:
            if identifier is not None:
                yield identifier
        else:
            final = code
    if final is None:
        raise SourceError(
            f"C-FIND on {source.peer} got no final status (association aborted or timed "
            f"out); a PACS that does not list our calling AE title {source.calling_aet!r} "
            "may answer so"
        )
    if final != SUCCESS:
        raise SourceError(
            f"C-FIND on {source.peer} failed with status 0x{final:04X} "
            f"({query.QueryRetrieveLevel} level); see the PACS log"
        )


def find_instances(
    source: DimseSource, assoc: Association, target: Target
) -> tuple[dict[str, str], list[str]]:
    """IMAGE-level C-FIND: each instance's series, and the SOP classes seen."""
    from pydicom import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = target.study_uid
    query.SeriesInstanceUID = target.series_uid or ""
    query.SOPInstanceUID = target.sop_uid or ""
    query.SOPClassUID = ""
    expected: dict[str, str] = {}
    classes: dict[str, None] = {}
    for ident in find(source, assoc, query):
        sop = str(ident.get("SOPInstanceUID", "") or "")
        if sop:
            expected[sop] = str(ident.get("SeriesInstanceUID", "") or "") or UNKNOWN_SERIES
        sop_class = str(ident.get("SOPClassUID", "") or "")
        if sop_class:
            classes[sop_class] = None
    return expected, list(classes)


def count_study(source: DimseSource, assoc: Association, study_uid: str) -> tuple[int, int]:
    """(series, instances) of a study by SERIES-level C-FIND (IMAGE level if needed)."""
    from pydicom import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.NumberOfSeriesRelatedInstances = ""
    n_series = 0
    n_instances: int | None = 0
    for ident in find(source, assoc, query):
        n_series += 1
        count = int_or_none(ident, "NumberOfSeriesRelatedInstances")
        n_instances = None if count is None or n_instances is None else n_instances + count
    if n_instances is None:
        expected, _ = find_instances(source, assoc, Target(study_uid))
        n_instances = len(expected)
    return n_series, n_instances


def sop_classes(source: DimseSource, target: Target) -> tuple[list[str], dict[str, str] | None]:
    """The SOP classes a C-GET of ``target`` must propose, and the instances if learned.

    STUDY-level ``SOPClassesInStudy`` first; else an IMAGE-level C-FIND (which also gives
    every instance's series); else :data:`DEFAULT_STORAGE_CLASSES`.
    """
    from pydicom import Dataset

    with find_association(source, "C-FIND SOP classes") as assoc:
        if target.sop_uid is None:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = target.study_uid
            query.SOPClassesInStudy = ""
            classes: list[str] = []
            for ident in find(source, assoc, query):
                classes.extend(uids(ident.get("SOPClassesInStudy")))
            if classes:
                return list(dict.fromkeys(classes)), None
        expected, image_classes = find_instances(source, assoc, target)
    if image_classes:
        return image_classes, expected
    logger.debug("no SOP classes from the PACS; proposing the default storage classes")
    return list(DEFAULT_STORAGE_CLASSES), expected


def expected_instances(source: DimseSource, target: Target) -> dict[str, str]:
    """SOP Instance UID -> Series Instance UID of ``target``'s instances (IMAGE C-FIND)."""
    with find_association(source, "C-FIND instances") as assoc:
        expected, _ = find_instances(source, assoc, target)
    return expected


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _batched(rows: Iterable[list[str]], n: int) -> Iterator[list[tuple[str, str, str]]]:
    """Rows of the listing spill, ``n`` at a time."""
    it = iter(rows)
    while batch := [(r[0], r[1], r[2]) for r in itertools.islice(it, n)]:
        yield batch


def list_studies(source: DimseSource) -> Iterator[Unit]:
    """Yield one unit per study the PACS finds (see :meth:`DimseSource.list_units`)."""
    from pydicom import Dataset

    check_window(source.window, source.clock)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.NumberOfStudyRelatedSeries = ""
    query.NumberOfStudyRelatedInstances = ""
    apply_filters(query, source.study_filters)
    source.cache_dir.mkdir(parents=True, exist_ok=True)
    found = skipped = counted = 0
    with tempfile.TemporaryFile("w+", encoding="ascii", dir=source.cache_dir) as spill:
        with find_association(source, "C-FIND studies") as assoc:
            for ident in find(source, assoc, query):
                uid = str(ident.get("StudyInstanceUID", "") or "")
                if not uid or not re.fullmatch(r"[0-9.]+", uid):
                    skipped += 1
                    continue
                series = int_or_none(ident, "NumberOfStudyRelatedSeries")
                instances = int_or_none(ident, "NumberOfStudyRelatedInstances")
                spill.write(f"{uid}\t{_opt(series)}\t{_opt(instances)}\n")
                found += 1
        logger.info(
            "C-FIND on %s as %s: %d studies%s",
            source.peer,
            source.calling_aet,
            found,
            f" ({skipped} without a valid StudyInstanceUID skipped)" if skipped else "",
        )
        spill.seek(0)
        rows = (line.rstrip("\n").split("\t") for line in spill)
        for batch in _batched(rows, _LISTING_BATCH):
            missing = [uid for uid, s, i in batch if not s or not i]
            counts: dict[str, tuple[int, int]] = {}
            if missing:
                counted += len(missing)
                with find_association(source, "C-FIND series counts") as assoc:
                    for uid in missing:
                        counts[uid] = count_study(source, assoc, uid)
            for uid, s, i in batch:
                n_series, n_instances = counts.get(uid) or (int(s), int(i))
                yield Unit(key=f"studies/{uid}", watermark=f"{n_series}:{n_instances}")
    if counted:
        logger.info("%d studies counted at SERIES level (the PACS left counts empty)", counted)


def dimse_confirm(source: DimseSource, study_uid: str, series_uid: str, sop_uid: str) -> bool:
    """C-FIND at IMAGE level for the instance in its study and series."""
    from pydicom import Dataset

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = sop_uid
    with find_association(source, "confirm") as assoc:
        return any(str(m.get("SOPInstanceUID", "")) == sop_uid for m in find(source, assoc, query))
