"""Text regions an OCR engine may not read: burned-in annotations found by their grey level.

A screen's annotations (names, IDs, dates, labels) are drawn by the device's graphics at one
constant level (or colour), anti-aliased at the edges. Image content does not do that: the
speckle of an ultrasound, the noise and gradients of a page, the anatomy of a radiograph have
histograms that are smooth at the scale of one grey level. Such text therefore shows as a
*spike* in the histogram of the frame (of each colour channel), at its level, and the
pixels at that level sit in thin strokes next to one another, in rows. Tesseract, which
reads text well on plain margins, often finds nothing where the same text is drawn over
speckle; this finds it there, whatever the contrast, as long as the text is drawn at a
level of its own:

1. the levels whose count is at least 3 times the median count of the 4 levels either side
   and above it by ``sigma`` Poisson standard deviations; and the levels that stand out so
   (6 times) in the histogram of stroke pixels alone (thin, with an equal neighbour), where
   text at a level the image itself often takes (low contrast over speckle) still shows. A
   lookup table's comb (every n-th level up to twice as frequent; four times among stroke
   pixels) stays below both ratios. At most ``max_levels`` of each, the strongest;
2. per level, its *stroke* pixels: at that level (within 4 % of its contrast to the frame's
   median for a level of the whole histogram: the cores of small anti-aliased glyphs), with
   such a neighbour, and not in a plateau (the equal run through the pixel is at most
   ``max_stroke`` long across, so the black surround of a fan is not text);
3. those pixels joined across a character gap into clusters; a cluster with at least
   ``min_pixels`` stroke pixels and no taller than ``max_height`` (and than a twelfth of the
   frame, 16 pixels at least) is a line of text, widened along its rows over pixels near
   the level (within 35 % of the contrast: glyphs of the line without full-level pixels) and
   padded by its height sideways and half its height up and down (the anti-aliased rim,
   accents and descenders).

Measured on the synthetic set it finds every token box, at 3-8 % of a frame blacked out;
on colour-flow Doppler (saturated flow colours) it proposes much of the image, which the
caller's ``max_blackout`` turns into a quarantine.

It proposes regions; it does not read them. The caller blacks them out where all text goes,
and otherwise decides with the OCR engine (and quarantines where it cannot).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["find_text_regions", "spike_levels"]

#: widest range of values whose histogram is searched
_MAX_RANGE = 1 << 20

#: character gap joined within a cluster: rows, columns either side
_JOIN = (2, 6)


def spike_levels(
    channel: NDArray[Any],
    *,
    sigma: float = 6.0,
    ratio: float = 3.0,
    min_excess: int = 24,
    max_levels: int = 8,
    where: NDArray[np.bool_] | None = None,
) -> list[int]:
    """The grey levels of an integer ``channel`` (of its pixels in ``where``, when given)
    whose pixel count stands out of the
    histogram (the strongest first, at most ``max_levels``): at least ``ratio`` times the
    median count of the 4 levels either side, and above it by ``sigma`` Poisson standard
    deviations and ``min_excess`` pixels. The ratio keeps out the comb a lookup table leaves
    in a rescaled channel (every n-th level twice as frequent)."""
    lo, hi = int(channel.min()), int(channel.max())
    if hi - lo > _MAX_RANGE:  # not the integer pixels of a display
        return []
    flat = channel.ravel() if where is None else channel[where]
    counts = np.bincount(flat.astype(np.int64) - lo, minlength=hi - lo + 1).astype(np.float64)
    if counts.size < 2:
        return []
    padded = np.pad(counts, 4, constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 9)
    neighbours = np.delete(windows, 4, axis=1)
    with np.errstate(all="ignore"):
        smooth = np.nan_to_num(np.nanmedian(neighbours, axis=1))
    spread = np.sqrt(np.maximum(smooth, 1.0))
    excess = counts - smooth
    hits = np.nonzero(
        (excess >= min_excess) & (excess >= sigma * spread) & (counts >= ratio * smooth)
    )[0]
    order = hits[np.argsort(-(excess[hits] / spread[hits]), kind="stable")]
    return [int(v) + lo for v in order[:max_levels]]


def _run_lengths(equal: NDArray[np.bool_]) -> NDArray[np.int64]:
    """Per pixel, the length of the run of equal values along axis 1 it is in (``equal``:
    each pixel equals the next, shape (rows, cols - 1))."""
    rows, cols = equal.shape[0], equal.shape[1] + 1
    start = np.ones((rows, cols), bool)
    start[:, 1:] = ~equal
    ids = np.cumsum(start.ravel()) - 1
    return np.bincount(ids)[ids].reshape(rows, cols)


def _regions_of_channel(
    img: NDArray[np.int64],
    *,
    sigma: float,
    max_levels: int,
    max_stroke: int,
    min_pixels: int,
    max_height: int,
) -> list[tuple[int, int, int, int]]:
    from scipy import ndimage

    rows, cols = img.shape
    across = np.minimum(
        _run_lengths(img[:, 1:] == img[:, :-1]), _run_lengths((img[1:, :] == img[:-1, :]).T).T
    )
    thin = across <= max_stroke
    # the levels that stand out of the histogram of all pixels, and those that stand out
    # of the histogram of stroke pixels (thin, with a neighbour at the same level): text
    # at a level the image itself often takes (low contrast over speckle) shows only there
    padded = np.pad(img, 1, mode="edge")
    same = np.zeros(img.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                same |= padded[1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols] == img
    # (a lookup table's comb makes some levels up to twice as frequent as their
    # neighbours, so up to four times among stroke pixels: the ratios stay above both)
    background = float(np.median(img))
    plain = spike_levels(img, sigma=sigma, max_levels=max_levels)
    strokes = spike_levels(img, sigma=sigma, ratio=6.0, max_levels=max_levels, where=same & thin)
    # a level of the whole histogram takes in the cores of small anti-aliased glyphs (a few
    # per cent of its contrast either side); one of the stroke pixels alone, which the image
    # itself takes often, is held to the exact level
    levels = [(v, round(0.04 * abs(v - background))) for v in plain]
    levels += [(v, 0) for v in strokes if v not in plain]
    boxes = []
    for level, tolerance in levels:
        # at the level, with such a neighbour, not in a plateau
        band = np.abs(img - level) <= tolerance
        anchors = band & thin & (_neighbours(band) >= 1)
        joined = ndimage.maximum_filter1d(anchors.view(np.uint8), 2 * _JOIN[1] + 1, axis=1)
        joined = ndimage.maximum_filter1d(joined, 2 * _JOIN[0] + 1, axis=0)
        labels, count = ndimage.label(joined)
        if not count:
            continue
        sizes = np.bincount(labels.ravel(), weights=anchors.ravel(), minlength=count + 1)[1:]
        # the glyphs of a line with no pixel at the full level (small anti-aliased text):
        # pixels near the level, looked for only along the rows of a line found
        near = (np.abs(img - level) <= max(2.0, 0.35 * abs(level - background))) & thin
        for index, where in enumerate(ndimage.find_objects(labels)):
            if where is None or sizes[index] < min_pixels:
                continue
            y0, y1 = where[0].start + _JOIN[0], where[0].stop - _JOIN[0]
            x0, x1 = where[1].start + _JOIN[1], where[1].stop - _JOIN[1]
            height = y1 - y0
            if height > min(max_height, max(16, rows // 12)):
                continue
            columns: NDArray[np.bool_] = np.any(near[y0:y1], axis=0)
            x0, x1 = _extend(columns, x0, x1, gap=max(4, height))
            across_pad, down_pad = max(3, height), max(2, (height + 1) // 2)
            boxes.append(
                (
                    max(0, x0 - across_pad),
                    max(0, y0 - down_pad),
                    min(cols, x1 + across_pad),
                    min(rows, y1 + down_pad),
                )
            )
    return boxes


def _neighbours(mask: NDArray[np.bool_]) -> NDArray[np.int8]:
    """Per pixel, how many of its 8 neighbours are in ``mask``."""
    rows, cols = mask.shape
    padded = np.pad(mask, 1)
    out = np.zeros(mask.shape, np.int8)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                out += padded[1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]
    return out


def _extend(columns: NDArray[np.bool_], x0: int, x1: int, *, gap: int) -> tuple[int, int]:
    """Widen ``[x0, x1)`` over the ``columns`` that hold a near-level pixel, across gaps of
    at most ``gap`` columns."""
    hits = np.nonzero(columns)[0]
    while True:
        right = hits[(hits >= x1) & (hits < x1 + gap)]
        left = hits[(hits < x0) & (hits >= x0 - gap)]
        if not right.size and not left.size:
            return x0, x1
        if right.size:
            x1 = int(right.max()) + 1
        if left.size:
            x0 = int(left.min())


def find_text_regions(
    frame: NDArray[Any],
    *,
    sigma: float = 6.0,
    max_levels: int = 8,
    max_stroke: int = 8,
    min_pixels: int = 8,
    max_height: int = 64,
) -> list[tuple[int, int, int, int]]:
    """Regions ``(x0, y0, x1, y1)`` (end exclusive, padded) of text drawn at a level of its
    own in ``frame`` (rows, cols) or (rows, cols, channels), integer pixels; each colour
    channel is searched on its own and the regions joined."""
    planes: list[NDArray[Any]] = []
    for plane in [frame] if frame.ndim == 2 else [frame[..., c] for c in range(frame.shape[-1])]:
        if not any(np.array_equal(plane, seen) for seen in planes):  # grey stored as colour
            planes.append(plane)
    boxes: list[tuple[int, int, int, int]] = []
    for plane in planes:
        boxes += _regions_of_channel(
            np.asarray(plane, dtype=np.int64),
            sigma=sigma,
            max_levels=max_levels,
            max_stroke=max_stroke,
            min_pixels=min_pixels,
            max_height=max_height,
        )
    return sorted(set(boxes))
