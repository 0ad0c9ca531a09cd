"""Inference tasks keep every worker busy (issue #19 §3: the demo's 7 volumes ran as one task
of up to 8 on one of its two workers, the other core idle)."""

from __future__ import annotations

import pytest

from pipeline.infer.stage import tasks_of


@pytest.mark.parametrize(
    ("per_task", "total", "workers", "expected"),
    [
        (8, 7, 2, 4),  # the demo: 4 + 3, both workers busy
        (8, 7, 1, 7),  # in-process: one task, one model load
        (8, 100, 2, 8),  # many volumes: the configured size
        (8, 1, 4, 1),
        (8, 0, 2, 1),  # nothing to do: no division by zero
        (1, 50, 2, 1),
    ],
)
def test_volumes_per_task(per_task: int, total: int, workers: int, expected: int) -> None:
    assert tasks_of(per_task, total, workers) == expected
