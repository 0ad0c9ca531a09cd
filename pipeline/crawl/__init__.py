"""Crawl: archive headers into the restricted index; unusable objects into quarantine."""

from pipeline.crawl.core import IndexRecord, parse_raw, read_header, record_from_metadata
from pipeline.crawl.stage import (
    CrawlResult,
    crawl_batch,
    current_index,
    object_key,
    object_states,
    run,
    skipped_text,
)

__all__ = [
    "CrawlResult",
    "IndexRecord",
    "crawl_batch",
    "current_index",
    "object_key",
    "object_states",
    "parse_raw",
    "read_header",
    "record_from_metadata",
    "run",
    "skipped_text",
]
