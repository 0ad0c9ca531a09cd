"""Classification bundles: a class vector per 2D image (or per volume), as findings rows.

A bundle is a classifier when its output is a class vector: ``network_data_format.outputs``
format ``labels``/``classification``/``probabilities``/``logits`` (breast_density_classification:
``labels``, 4 channels A-D), or when its registry entry says ``task: classification``.

Input, as the bundle's own loader would give it (its preprocessing is kept unmodified):

- a **2D tensor** (``tensor_kind`` ``planar``: ``(rows, cols)`` grey, or ``(rows, cols, 3)``
  RGB) is fed as MONAI's ``LoadImaged`` gives a PNG/JPEG (``PILReader``): spatial axes
  transposed to ``(cols, rows)`` (MONAI's x first), the samples last, ``original_channel_dim``
  ``-1``. A grey image given to a bundle that takes 3 channels (its metadata
  ``num_channels: 3``; breast density: "a single grayscale is copied to 3 channels") is copied
  to 3 channels, as an RGB JPEG of a grey mammogram loads: the bundle's
  ``EnsureChannelFirstd(channel_dim=2)`` then works unmodified. Values are the tensor's
  (MONOCHROME2, VOI as ``tensors.voi`` says), float32; the bundle's own intensity scaling
  (``ScaleIntensityd`` to [0, 1]) maps them as it maps 8-bit JPEG values. A bundle without
  ``EnsureChannelFirstd`` gets the channels first;
- a **volume** (a 3D classifier) is fed as :class:`pipeline.infer.engine.Segmenter` feeds it.

The network's output goes through the bundle's ``postprocessing`` (breast density: a
**sigmoid** per class, so the four scores do not sum to 1; a softmax bundle's do). Each image
gets one findings row per class (``label`` the class name from the bundle's ``channel_def``,
``label_value`` its index, ``score`` its probability, ``predicted`` true for the top class,
``task`` ``classification``; no mask).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from pipeline.dicom.volume import lps_to_ras
from pipeline.errors import ModelError
from pipeline.infer.bundle import Bundle
from pipeline.infer.cohort import cohort_columns

logger = logging.getLogger(__name__)

__all__ = ["CLASSIFICATION_FORMATS", "Classifier", "class_names", "findings_rows", "task_of"]

#: output formats of ``network_data_format`` that mean a class vector
CLASSIFICATION_FORMATS: Final = frozenset(
    {"labels", "classification", "probabilities", "logits", "class"}
)
Task = Literal["segmentation", "classification"]
#: returns a 2D image (rows, cols[, samples]), or a volume and its LPS affine
ImageLoader = Callable[[], npt.NDArray[Any] | tuple[npt.NDArray[Any], npt.NDArray[np.float64]]]


def _output(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    outputs = metadata["network_data_format"]["outputs"]
    return outputs.get("pred") or next(iter(outputs.values()))


def task_of(metadata: Mapping[str, Any], declared: str = "auto") -> Task:
    """``classification`` when the registry says so or the bundle's output format is a class
    vector (:data:`CLASSIFICATION_FORMATS`), else ``segmentation``."""
    if declared in ("segmentation", "classification"):
        return declared  # type: ignore[return-value]
    fmt = str(_output(metadata).get("format", "")).lower()
    return "classification" if fmt in CLASSIFICATION_FORMATS else "segmentation"


def class_names(metadata: Mapping[str, Any]) -> dict[int, str]:
    """Output index -> class name: every entry of the output ``channel_def`` (channel 0 is a
    class, not a background), else ``class_<i>`` for ``num_channels``."""
    pred = _output(metadata)
    channel_def = {int(k): str(v) for k, v in (pred.get("channel_def") or {}).items()}
    n = int(pred.get("num_channels") or len(channel_def) or 0)
    if channel_def and (not n or len(channel_def) == n):
        return dict(sorted(channel_def.items()))
    if n < 1:
        raise ModelError("the bundle's output has no channel_def and no num_channels")
    return {c: channel_def.get(c, f"class_{c}") for c in range(n)}


def _input_channels(metadata: Mapping[str, Any]) -> int:
    inputs = metadata["network_data_format"]["inputs"]
    spec = inputs.get("image") or next(iter(inputs.values()))
    return int(spec.get("num_channels") or 1)


class Classifier:
    """A classification bundle on a device: images in, class probabilities out.

    Parameters
    ----------
    bundle:
        A loaded bundle whose output is a class vector.
    device:
        ``auto``, ``cpu`` or ``cuda``.
    batch_size:
        Images per forward pass (those of one shape after the preprocessing).
    """

    def __init__(self, bundle: Bundle, *, device: str = "auto", batch_size: int = 16) -> None:
        from pipeline.infer.engine import EngineStats, pick_device

        self.bundle = bundle
        self.device = pick_device(device)
        self.autocast_dtype: Any = None
        self.batch_size = max(1, int(batch_size))
        self.network = bundle.network.to(self.device).eval()
        self.classes = class_names(bundle.metadata)
        self.stats = EngineStats()
        self._channels = _input_channels(bundle.metadata)
        transforms = getattr(bundle.preprocessing, "transforms", ())
        self._channel_last = any(type(t).__name__ == "EnsureChannelFirstd" for t in transforms)

    def _prepare(self, loaded: Any) -> Any:
        import torch
        from monai.data import MetaTensor

        if isinstance(loaded, tuple):  # a volume: as the segmentation engine feeds it
            array, affine = loaded
            data = np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)[None], np.float32)
            ras = torch.from_numpy(lps_to_ras(affine))
            meta = {"original_affine": ras.clone(), "original_channel_dim": 0,
                    "spatial_shape": np.asarray(data.shape[1:]), "space": "RAS"}  # fmt: skip
            image = MetaTensor(torch.from_numpy(data), affine=ras, meta=meta)
        else:
            array = np.asarray(loaded)
            if array.ndim == 2:
                array = array[..., None]
            if array.ndim != 3:
                raise ModelError(f"expected a 2D image (rows, cols[, samples]), got {array.shape}")
            if array.shape[-1] == 1 and self._channels > 1:
                array = np.repeat(array, self._channels, axis=-1)  # grey as an RGB JPEG loads
            data = np.ascontiguousarray(array.transpose(1, 0, 2), dtype=np.float32)  # (x, y, c)
            if not self._channel_last:
                data = np.ascontiguousarray(data.transpose(2, 0, 1))
            meta = {"original_channel_dim": -1 if self._channel_last else 0,
                    "spatial_shape": np.asarray(array.shape[1::-1])}  # fmt: skip
            image = MetaTensor(torch.from_numpy(data), affine=torch.eye(3, dtype=torch.float64),
                               meta=meta)  # fmt: skip
        prepared = {self.bundle.image_key: image}
        if self.bundle.preprocessing is not None:
            prepared = self.bundle.preprocessing(prepared)
        return prepared[self.bundle.image_key]

    def _run(self, images: list[Any]) -> list[npt.NDArray[np.float64]]:
        import torch

        started = time.perf_counter()
        x = torch.stack([torch.as_tensor(i).as_subclass(torch.Tensor) for i in images])
        logits = self.bundle.inferer(x.to(self.device), self.network)
        logits = torch.as_tensor(logits).float().cpu()
        self.stats.seconds_compute += time.perf_counter() - started
        self.stats.batches += 1
        started = time.perf_counter()
        out = []
        for item, image in zip(logits.reshape(len(images), -1), images, strict=True):
            pred: Any = item
            if self.bundle.postprocessing is not None:
                pred = self.bundle.postprocessing({"pred": item, self.bundle.image_key: image})
                pred = pred["pred"]
            probs = torch.as_tensor(pred).detach().cpu().double().reshape(-1).numpy()
            if probs.shape[0] != len(self.classes):
                raise ModelError(
                    f"the bundle's output has {probs.shape[0]} values, its metadata names "
                    f"{len(self.classes)} classes"
                )
            out.append(probs)
        self.stats.seconds_post += time.perf_counter() - started
        self.stats.volumes += len(images)
        return out

    def classify(
        self, items: Iterable[tuple[str, ImageLoader]]
    ) -> Iterator[tuple[str, npt.NDArray[np.float64]]]:
        """Yield ``(key, probabilities in class order)`` for each ``(key, loader)``, in order."""
        import torch

        started = time.perf_counter()
        pending: list[tuple[str, Any]] = []
        try:
            with torch.inference_mode():
                for key, load in items:
                    waited = time.perf_counter()
                    image = self._prepare(load())
                    self.stats.seconds_waiting += time.perf_counter() - waited
                    if pending and (
                        len(pending) >= self.batch_size
                        or tuple(pending[0][1].shape) != tuple(image.shape)
                    ):
                        yield from zip([k for k, _ in pending],
                                       self._run([i for _, i in pending]), strict=True)  # fmt: skip
                        pending = []
                    pending.append((key, image))
                if pending:
                    yield from zip([k for k, _ in pending],
                                   self._run([i for _, i in pending]), strict=True)  # fmt: skip
        finally:
            self.stats.seconds_total += time.perf_counter() - started


def _activation(bundle: Bundle) -> str:
    """How the bundle turns logits into scores (for the findings' measurements)."""
    for t in getattr(bundle.postprocessing, "transforms", ()):
        if type(t).__name__ == "Activationsd":
            if t.sigmoid[0]:
                return "sigmoid"
            if t.softmax[0]:
                return "softmax"
            return "other"
    return "none"


def findings_rows(
    clf: Classifier,
    tensors: list[dict[str, Any]],
    *,
    research: Any,
    run_id: str,
    now: Any,
    entry_name: str | None = None,
) -> list[dict[str, Any]]:
    """Classify the tensors rows (``research``: the research zone's folder) and return the
    findings rows: one per (image, class)."""
    bundle = clf.bundle
    model_ref = bundle.ref
    activation = _activation(bundle)

    def loader(row: dict[str, Any]) -> ImageLoader:
        def load() -> Any:
            array = np.load(research / row["path"], allow_pickle=False)
            if row.get("affine") and array.ndim == 3 and bundle.spatial_dims == 3:
                return array, np.asarray(row["affine"], dtype=np.float64).reshape(4, 4)
            if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
                raise ModelError(f"{row['tensor_key']}: not a 2D image ({array.shape})")
            return array[..., :3] if array.ndim == 3 else array

        return load

    by_key = {row["tensor_key"]: row for row in tensors}
    rows: list[dict[str, Any]] = []
    for key, probs in clf.classify((row["tensor_key"], loader(row)) for row in tensors):
        row = by_key[key]
        top = int(np.argmax(probs))
        for value, name in clf.classes.items():
            score = float(probs[value])
            rows.append(
                {
                    "finding_key": f"{key}/{model_ref}/{name}",
                    "SeriesInstanceUID": row["SeriesInstanceUID"],
                    "tensor_key": key,
                    "tensor_checksum": row["checksum"],
                    "volume_index": row.get("volume_index"),
                    "model": bundle.name,
                    "model_version": bundle.version,
                    "weights_sha256": bundle.weights_sha256,
                    "label": name,
                    "label_value": value,
                    # codes are applied at write-back (pipeline.codes), not copied here
                    "category_code": None,
                    "type_code": None,
                    "score": score,
                    "voxel_count": None,
                    "volume_ml": None,
                    "mean_hu": None,
                    "bbox": None,
                    "measurements": json.dumps(
                        {
                            "probability": {"value": score, "unit": "1"},
                            "activation": activation,
                            "probabilities": [float(p) for p in probs],
                        },
                        sort_keys=True,
                    ),
                    "mask_path": None,
                    "mask_checksum": None,
                    "device": clf.device,
                    "run_id": run_id,
                    "inferred_at": now,
                    "task": "classification",
                    "predicted": value == top,
                    "model_entry": entry_name,
                    **cohort_columns(row),  # issue #24
                }
            )
    return rows
