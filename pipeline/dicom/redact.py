"""Regions of pixel data blacked out by de-identification (burned-in text), applied again
wherever pixels are read from the source: the de-identified export carries cleaned pixels,
and the tensors stage, which decodes the source object, applies the vault's boxes itself."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["apply_boxes", "parse_boxes", "redacted"]


def apply_boxes(
    frames: NDArray[Any], boxes: Iterable[Sequence[int]], fill: int | float = 0
) -> None:
    """Set each ``(frame, x0, y0, x1, y1)`` region of ``frames`` (frames, rows, cols[, s])
    to ``fill``, in place; a frame of -1 means every frame."""
    for frame, x0, y0, x1, y1 in boxes:
        target = frames if frame < 0 else frames[frame : frame + 1]
        target[:, max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0), ...] = fill


def parse_boxes(text: str | None) -> list[tuple[int, int, int, int, int]]:
    """The vault's ``pixel_redactions`` (JSON ``[[frame, x0, y0, x1, y1], ...]``) as tuples;
    ``[]`` for none.

    Raises:
        ValueError: not such a list (a damaged vault row: never ignored).
    """
    if not text:
        return []
    raw = json.loads(text)
    if not isinstance(raw, list) or not all(
        isinstance(b, list) and len(b) == 5 and all(isinstance(v, int) for v in b) for b in raw
    ):
        raise ValueError("pixel_redactions is not a list of [frame, x0, y0, x1, y1]")
    return [(b[0], b[1], b[2], b[3], b[4]) for b in raw]


def redacted(frames: NDArray[Any], boxes: Sequence[Sequence[int]]) -> NDArray[Any]:
    """``frames`` with ``boxes`` blacked out: a writable copy when there are boxes (decoded
    frames may be a read-only view of the file's bytes), ``frames`` itself when none."""
    if not boxes:
        return frames
    out = np.array(frames, copy=True)
    if out.ndim == 2:  # one frame given as (rows, cols)
        apply_boxes(out[None], boxes)
    else:
        apply_boxes(out, boxes)
    return out
