"""Server-side images: slices of a volume with a finding's mask overlaid, and metrics plots.

PNG bytes only (Pillow for slices, matplotlib's object API without pyplot for plots), so the
pages work offline and nothing runs in the browser but a few lines of script.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.lake.paths import LakePaths
    from pipeline.review.store import VersionMetrics

__all__ = [
    "WINDOWS",
    "VolumeCache",
    "default_slice",
    "metrics_plots",
    "rate_plot",
    "slice_png",
]

#: CT window presets (centre, width) in HU; ``auto`` stretches the 1st..99th percentile of
#: the volume (any modality).
WINDOWS: dict[str, tuple[float, float] | None] = {
    "soft-tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
    "auto": None,
}

_OVERLAY_RGB = np.array([255, 40, 40], dtype=np.float32)
_MIN_SIDE = 384


class VolumeCache:
    """The last few volumes and masks opened, memory-mapped (a slice reads only its bytes)."""

    def __init__(self, lake: LakePaths, size: int = 8) -> None:
        self.lake = lake
        self.size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[str, np.ndarray[Any, Any]] = OrderedDict()
        self._auto: dict[str, tuple[float, float]] = {}

    def get(self, path: str) -> np.ndarray[Any, Any]:
        """The array at ``path`` (relative to ``research/``, as the tables give it)."""
        with self._lock:
            if path in self._items:
                self._items.move_to_end(path)
                return self._items[path]
        full = (self.lake.research / path).resolve()
        if not full.is_relative_to(self.lake.research.resolve()):
            raise ValueError("array path outside the research zone")
        array = np.load(full, mmap_mode="r", allow_pickle=False)
        with self._lock:
            self._items[path] = array
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return array

    def auto_window(self, path: str) -> tuple[float, float]:
        """Centre and width spanning the 1st..99th percentile of a volume (sampled)."""
        with self._lock:
            if path in self._auto:
                return self._auto[path]
        vol = self.get(path)
        step = max(1, vol.shape[0] // 16)
        sample = np.asarray(vol[::step], dtype=np.float32)
        lo, hi = (float(v) for v in np.percentile(sample, [1, 99]))
        win = ((lo + hi) / 2, max(hi - lo, 1e-6))
        with self._lock:
            self._auto[path] = win
        return win


def default_slice(finding: dict[str, Any]) -> int:
    """The slice a finding view opens at: the middle of the finding's box, else of the volume."""
    bbox = finding.get("bbox")
    if bbox:
        return (int(bbox[0]) + int(bbox[3])) // 2
    shape = finding.get("shape") or [1]
    return int(shape[0]) // 2


def slice_png(
    volume: np.ndarray[Any, Any],
    k: int,
    window: tuple[float, float],
    *,
    mask: np.ndarray[Any, Any] | None = None,
    label_value: int | None = None,
    opacity: float = 0.45,
    min_side: int = _MIN_SIDE,
) -> bytes:
    """Slice ``k`` of ``volume`` (slices, rows, columns) as a grey PNG windowed to ``(centre,
    width)``, with the voxels of ``mask == label_value`` tinted red at ``opacity``.

    Small images are scaled up (nearest neighbour) to at least ``min_side`` pixels.
    """
    from PIL import Image

    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    k = min(max(int(k), 0), volume.shape[0] - 1)
    centre, width = window
    plane = np.asarray(volume[k], dtype=np.float32)
    grey = np.clip((plane - (centre - width / 2)) / max(width, 1e-6), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if mask is not None and label_value is not None and opacity > 0:
        inside = np.asarray(mask[k]) == label_value
        a = float(min(max(opacity, 0.0), 1.0))
        rgb[inside] = rgb[inside] * (1 - a) + _OVERLAY_RGB * a
    img = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    side = min(img.size)
    if side < min_side:
        factor = -(-min_side // side)
        img = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def _figure(width: float = 5.2, height: float = 2.8) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96, layout="constrained")
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _rate_bars(ax: Any, rates: dict[str, Any], title: str) -> None:
    names = list(rates)
    if not names:
        ax.text(0.5, 0.5, "no decisions yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    vals, lo_err, hi_err = [], [], []
    for n in names:
        r = rates[n]
        lo, hi = r.interval
        v = r.rate if r.rate is not None else 0.0
        vals.append(v)
        lo_err.append(max(v - lo, 0.0) if r.decided else 0.0)
        hi_err.append(max(hi - v, 0.0) if r.decided else 0.0)
    x = np.arange(len(names))
    ax.bar(x, vals, yerr=[lo_err, hi_err], capsize=4, color="#3b7dd8")
    for xi, n, v in zip(x, names, vals, strict=True):
        if not rates[n].decided:
            ax.text(xi, 0.02, "no accept/reject", ha="center", va="bottom", fontsize=7)
            continue
        if v == 0:  # a 0 % bar has no height: a stub on the axis, so it is seen
            ax.bar([xi], [0.012], color="#d64541", width=0.8)
        ax.text(xi, v + 0.03, f"{100 * v:.0f} %", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{n}\n(n={rates[n].decided})" for n in names], fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("acceptance")
    ax.set_title(title, fontsize=10)


def rate_plot(rates: dict[str, Any], title: str) -> bytes:
    """A bar chart of acceptance rates by group (95% Wilson intervals as error bars; a 0 %
    bar drawn as a stub on the axis, each bar labelled with its percentage) as PNG bytes."""
    fig = _figure()
    _rate_bars(fig.add_subplot(), rates, title)
    return _png(fig)


def metrics_plots(m: VersionMetrics) -> dict[str, bytes]:
    """The plots of one model version, as PNG bytes by name: acceptance by manufacturer and by
    month (95% Wilson intervals as error bars), score distributions accepted vs rejected
    (only for a model that gives scores: no empty panel)."""
    plots: dict[str, bytes] = {}
    if m.by_manufacturer:  # no panel without decisions (the page says there are none)
        plots["manufacturer"] = rate_plot(m.by_manufacturer, "Acceptance by manufacturer")
    if m.by_month:
        plots["time"] = rate_plot(m.by_month, "Acceptance by month of review")
    if m.scores_accepted or m.scores_rejected:  # no panel for a model that gives no scores
        fig = _figure()
        ax = fig.add_subplot()
        bins = np.linspace(0.0, 1.0, 21)
        ax.hist(m.scores_accepted, bins=bins, alpha=0.6, label="accepted", color="#2a9d55")
        ax.hist(m.scores_rejected, bins=bins, alpha=0.6, label="rejected", color="#d64541")
        ax.set_xlabel("score")
        ax.legend(fontsize=8)
        ax.set_title("Scores of accepted vs rejected", fontsize=10)
        plots["scores"] = _png(fig)
    return plots
