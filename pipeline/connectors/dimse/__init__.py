"""A DICOM PACS over DIMSE (pynetdicom): C-FIND to list, C-GET or C-MOVE to retrieve.

A unit is one study, ``studies/<StudyInstanceUID>``, listed by a Study Root C-FIND at STUDY
level with the watermark ``"<NumberOfStudyRelatedSeries>:<NumberOfStudyRelatedInstances>"``.
Reading a unit retrieves the whole study into a local cache, ``<cache_dir>/<sha256 of the
study UID>/<sha256 of the SOP Instance UID>.dcm`` (files written atomically, exactly as the
PACS sent them), and yields one :class:`~pipeline.connectors.base.RawObject` per instance. A
study retrieved in full is marked in the cache with its watermark, so reading it again (a
resumed crawl) costs no network at all.

Retrieval (``source.dimse.retrieve``):

- ``get``: one C-GET of the study. The association proposes a presentation context for each
  storage SOP class of the study (from ``SOPClassesInStudy``, else an IMAGE-level C-FIND, else
  a broad default list), each with the SCP role, and one context per transfer syntax, so the
  PACS sends every instance in the syntax it stored it in (one context listing all syntaxes
  makes the PACS pick one and transcode, which fails for syntaxes it cannot transcode). An
  association holds at most 128 contexts, so when a study has many SOP classes, each gets
  fewer single-syntax contexts and a last one listing the remaining syntaxes.
- ``move``: C-MOVE to pacsflow's own Storage SCP (AE ``source.calling_aet`` on
  ``source.dimse.storage_port``), started for the retrieval and shut down after. When a
  study-level C-MOVE fails, the missing instances are moved again series by series.
- ``get-then-move`` (default): C-GET, then C-MOVE for the instances C-GET did not bring.

Instances the PACS could not send become raw objects whose ``error`` is an
:class:`~pipeline.errors.InputError` with reason ``unretrievable``; a :class:`SourceError`
means the PACS is unreachable, refuses us, or dropped an association (retry later).

Gentleness: at most ``source.dimse.max_associations`` associations at once, across all Dask
workers (a ``distributed.Semaphore`` named after the PACS) or within the process (no Dask),
and optionally only inside a local-time window such as ``19:00-07:00``.

Layers, bottom up (after pynetdicom's split):

- :mod:`~pipeline.connectors.dimse.presentation`: SOP classes, transfer syntaxes, contexts;
- :mod:`~pipeline.connectors.dimse.status`: DIMSE status codes, C-GET/C-MOVE outcomes;
- :mod:`~pipeline.connectors.dimse.tls`: TLS contexts and the check of the TLS files;
- :mod:`~pipeline.connectors.dimse.cache`: the local retrieval cache and its bound;
- :mod:`~pipeline.connectors.dimse.association`: the association cap, opening and closing;
- :mod:`~pipeline.connectors.dimse.query`: C-FIND listing and counting, the crawl window;
- :mod:`~pipeline.connectors.dimse.retrieve`: C-GET, C-MOVE with our Storage SCP, C-STORE;
- :mod:`~pipeline.connectors.dimse.source`: :class:`DimseSource`, the connector.

Logs name AE titles, counts and hashes only, never patient identifiers. pynetdicom itself logs
C-FIND identifiers at DEBUG level (its ``LOG_REQUEST_IDENTIFIERS``); keep the ``pynetdicom``
logger at INFO or above in production.
"""

from __future__ import annotations

from pipeline.connectors.dimse.cache import trim_cache
from pipeline.connectors.dimse.presentation import (
    DEFAULT_STORAGE_CLASSES,
    MAX_CONTEXTS,
    get_contexts,
)
from pipeline.connectors.dimse.query import dimse_confirm, in_window
from pipeline.connectors.dimse.retrieve import dimse_store
from pipeline.connectors.dimse.source import DimseSource, Retrieve
from pipeline.connectors.dimse.status import STORE_OK

__all__ = [
    "DEFAULT_STORAGE_CLASSES",
    "MAX_CONTEXTS",
    "STORE_OK",
    "DimseSource",
    "Retrieve",
    "dimse_confirm",
    "dimse_store",
    "get_contexts",
    "in_window",
    "trim_cache",
]
