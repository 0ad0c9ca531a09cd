"""Crawl: archive headers into the restricted index; unusable objects into quarantine."""

from pipeline.crawl.core import IndexRecord, read_header
from pipeline.crawl.stage import CrawlResult, crawl_partition, current_index, object_key, run

__all__ = [
    "CrawlResult",
    "IndexRecord",
    "crawl_partition",
    "current_index",
    "object_key",
    "read_header",
    "run",
]
