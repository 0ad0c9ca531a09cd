"""Run a stage's batches in-process or on a Dask cluster, with a bounded number in flight.

Every stage maps one function over batches of its input; this is the one place that does it,
so the driver never holds more than a few batches at once, whatever the archive's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "map_bounded", "set_total"]


class Progress:
    """What a stage reports its progress to: ``progress(n)`` after ``n`` more items are done,
    ``progress.total(n)`` once it knows how many there are (for the rate and the ETA).

    Stages also accept a bare ``Callable[[int], None]``; :func:`set_total` skips those.
    """

    def __call__(self, n: int) -> None:  # pragma: no cover - an interface
        """``n`` more items are done."""

    def total(self, n: int | None) -> None:  # pragma: no cover - an interface
        """There are ``n`` items in all (None: unknown)."""


def set_total(progress: Callable[[int], None] | None, n: int | None) -> None:
    """Tell ``progress`` how many items the stage will do, when it can take a total."""
    total = getattr(progress, "total", None)
    if callable(total):
        total(n)


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
