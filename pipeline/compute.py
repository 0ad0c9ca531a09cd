"""Run a stage's batches in-process or on a Dask cluster, with a bounded number in flight.

Every stage maps one function over batches of its input; this is the one place that does it,
so the driver never holds more than a few batches at once, whatever the archive's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["map_bounded"]

R = TypeVar("R")
Call = tuple[tuple[Any, ...], dict[str, Any]]


def map_bounded(
    func: Callable[..., R],
    calls: Iterable[Call],
    *,
    client: Any = None,
    resources: dict[str, float] | None = None,
) -> Iterator[R]:
    """Yield ``func(*args, **kwargs)`` for each ``(args, kwargs)`` of ``calls``.

    With ``client`` None the calls run here, one after another, in order. With a
    ``distributed.Client`` they run on its workers, at most ``2 * workers + 2`` at a time (the
    next call is only drawn from ``calls`` when one finishes), and results come as they finish;
    ``resources`` (e.g. ``{"GPU": 1}``) restricts them to workers that declare those resources.
    """
    if client is None:
        for args, kwargs in calls:
            yield func(*args, **kwargs)
        return
    from distributed import as_completed

    limit = 2 * max(1, len(client.scheduler_info().get("workers", {}))) + 2
    pending = as_completed()
    in_flight = 0
    for args, kwargs in calls:
        pending.add(client.submit(func, *args, pure=False, resources=resources, **kwargs))
        in_flight += 1
        while in_flight >= limit:
            yield next(pending).result()
            in_flight -= 1
    for future in pending:
        yield future.result()
