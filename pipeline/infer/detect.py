"""Detection bundles: boxes and scores (MONAI's RetinaNet detector) on pacsflow's volumes.

A detection bundle (the model zoo's ``lung_nodule_ct_detection``) has a ``RetinaNet`` network,
a ``RetinaNetDetector`` (anchors, box coder, box selection: score threshold, top-k per level,
NMS, detections per image; and its sliding-window inferer), set up by the config's
``detector_ops``, and an ``inferer`` that calls the detector. pacsflow runs it as shipped
(trusted mode: its ``network_def`` and ``detector_ops`` are code):

1. each volume is given to the bundle's ``preprocessing`` as the MetaTensor its loader would
   give (:func:`loaded`, the same as :class:`pipeline.infer.engine.Segmenter` feeds);
2. the bundle's ``inferer`` (the detector, with its sliding window and box postprocessing)
   returns boxes in the preprocessed image's voxel coordinates (``xyzxyz``), their class and
   score; they are clipped to the image and empty ones removed (MONAI's
   ``clip_boxes_to_image``, what the bundle's ``ClipBoxToImaged`` does);
3. **pacsflow's own mapping** (:func:`map_boxes`) takes the 8 corners of each box through the
   preprocessed image's affine (which MONAI keeps through ``Orientationd``/``Spacingd``) to
   patient coordinates (RAS -> LPS mm), and through the inverse of the tensor's LPS affine to
   the tensor's voxel grid. It equals the bundle's own ``AffineBoxToWorldCoordinated`` +
   ``ConvertBoxModed`` postprocessing (tested), and also gives the tensor-grid box, which the
   bundle's postprocessing does not. Box coordinates follow MONAI's convention: a coordinate
   ``c`` is where the affine puts index ``c`` (voxel centres at integer indices);
4. boxes with a score below the registry's ``detection.score_threshold`` are dropped, the
   ``detection.max_boxes`` best kept.

torchvision: MONAI's RetinaNet uses two small parts of it at inference, both while building
the feature extractor: ``_validate_trainable_layers`` (an argument check) and
``IntermediateLayerGetter`` (a ``ModuleDict`` of the backbone's first layers); its
``Matcher``/``Sampler`` are for training only. Where no torchvision matching the installed
torch can be imported (PyPI's wheels link CUDA torch libraries; a CPU torch needs the CPU build
from download.pytorch.org), :func:`provide_torchvision_parts` supplies both, with
torchvision's semantics and module names (the same state-dict keys), so the bundle runs on a
CPU-only install; a matching torchvision (the ``detection`` extra) is used when present.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.dicom.volume import Volume, lps_to_ras
from pipeline.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = [
    "Box",
    "Detector",
    "is_detection",
    "loaded",
    "map_boxes",
    "provide_torchvision_parts",
]

Loader = Callable[[], Volume | tuple[npt.NDArray[Any], npt.NDArray[np.float64]]]
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _validate_trainable_layers(
    is_trained: bool, trainable_backbone_layers: int | None, max_value: int, default_value: int
) -> int:
    """torchvision's ``models.detection.backbone_utils._validate_trainable_layers``, the same
    result (an untrained backbone: every layer trainable)."""
    if not is_trained:
        trainable_backbone_layers = max_value
    if trainable_backbone_layers is None:
        trainable_backbone_layers = default_value
    if trainable_backbone_layers < 0 or trainable_backbone_layers > max_value:
        raise ValueError(
            f"Trainable backbone layers should be in the range [0,{max_value}], got "
            f"{trainable_backbone_layers} "
        )
    return trainable_backbone_layers


def _intermediate_layer_getter() -> type:
    """torchvision's ``models._utils.IntermediateLayerGetter`` (the backbone's children up to
    the last returned layer, under their own names: the same state-dict keys)."""
    from collections import OrderedDict

    from torch import nn

    class IntermediateLayerGetter(nn.ModuleDict):
        _version = 2

        def __init__(self, model: Any, return_layers: dict[str, str]) -> None:
            names = [name for name, _ in model.named_children()]
            if not set(return_layers).issubset(names):
                raise ValueError("return_layers are not present in model")
            wanted = {str(k): str(v) for k, v in return_layers.items()}
            layers: OrderedDict[str, Any] = OrderedDict()
            for name, module in model.named_children():
                layers[name] = module
                wanted.pop(name, None)
                if not wanted:
                    break
            super().__init__(layers)
            self.return_layers = dict(return_layers)

        def forward(self, x: Any) -> Any:
            out: OrderedDict[str, Any] = OrderedDict()
            for name, module in self.items():
                x = module(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
            return out

    return IntermediateLayerGetter


def provide_torchvision_parts() -> str:
    """Make MONAI's RetinaNet buildable: ``"torchvision"`` when a torchvision that works with
    the installed torch is importable (MONAI then uses its own), else ``"pacsflow"`` after
    giving MONAI pacsflow's :func:`_validate_trainable_layers` (the only part of torchvision a
    detector needs at inference)."""
    import types

    from monai.apps.detection.networks import retinanet_network
    from monai.networks.blocks import backbone_fpn_utils
    from monai.utils import optional_import

    _, ok = optional_import(
        "torchvision.models.detection.backbone_utils", name="_validate_trainable_layers"
    )
    if ok:
        return "torchvision"
    if retinanet_network._validate_trainable_layers is not _validate_trainable_layers:
        retinanet_network._validate_trainable_layers = _validate_trainable_layers
        backbone_fpn_utils.torchvision_models = types.SimpleNamespace(
            _utils=types.SimpleNamespace(IntermediateLayerGetter=_intermediate_layer_getter())
        )
        logger.info(
            "torchvision is not importable with this torch: the two parts of it RetinaNet "
            "needs at inference are supplied by pacsflow"
        )
    return "pacsflow"


def detector_of(inferer: Any) -> Any:
    """The ``RetinaNetDetector`` a bundle's inferer runs (the inferer itself, or its
    ``detector``), or None."""
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector

    for candidate in (inferer, getattr(inferer, "detector", None)):
        if isinstance(candidate, RetinaNetDetector):
            return candidate
    return None


def is_detection(bundle: Any) -> bool:
    """The bundle's outputs are boxes (its inferer is, or runs, a RetinaNetDetector)."""
    try:
        return detector_of(bundle.inferer) is not None
    except ImportError:
        return False


def loaded(array: npt.NDArray[Any], affine: npt.NDArray[np.float64]) -> Any:
    """The tensor ``array`` (slices, rows, cols) with its LPS ``affine`` as the MetaTensor
    ``LoadImaged`` + ``EnsureChannelFirstd`` would give: float32, channel first, (x, y, z) =
    (columns, rows, slices), RAS affine."""
    import torch
    from monai.data import MetaTensor

    data = np.ascontiguousarray(array.transpose(2, 1, 0)[None], dtype=np.float32)
    ras = torch.from_numpy(lps_to_ras(np.asarray(affine, dtype=np.float64)))
    meta = {
        "original_affine": ras.clone(),
        "original_channel_dim": 0,
        "spatial_shape": np.asarray(data.shape[1:]),
        "space": "RAS",
    }
    return MetaTensor(torch.from_numpy(data), affine=ras, meta=meta)


@dataclass(frozen=True)
class Box:
    """One detected box, on the tensor grid and in patient coordinates."""

    #: the detector's class index (0-based)
    class_index: int
    score: float
    #: (k0, j0, i0, k1, j1, i1): continuous (slice, row, column) indices of the tensor,
    #: voxel centres at integers
    box_voxel: tuple[float, float, float, float, float, float]
    #: (x0, y0, z0, x1, y1, z1): LPS mm, min then max corner
    box_mm: tuple[float, float, float, float, float, float]
    #: [k0, j0, i0, k1, j1, i1]: inclusive voxel indices whose centres lie in the box
    bbox: tuple[int, int, int, int, int, int] | None

    @property
    def centre_mm(self) -> tuple[float, float, float]:
        lo, hi = self.box_mm[:3], self.box_mm[3:]
        return (
            (lo[0] + hi[0]) / 2.0,
            (lo[1] + hi[1]) / 2.0,
            (lo[2] + hi[2]) / 2.0,
        )

    @property
    def size_mm(self) -> tuple[float, float, float]:
        lo, hi = self.box_mm[:3], self.box_mm[3:]
        return (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])


def _corners(boxes: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """(N, 8, 4) homogeneous corners of ``xyzxyz`` boxes (N, 6)."""
    lo, hi = boxes[:, :3], boxes[:, 3:]
    out = np.ones((len(boxes), 8, 4))
    for n in range(8):
        pick = [(n >> a) & 1 for a in range(3)]
        out[:, n, :3] = np.where(pick, hi, lo)
    return out


def map_boxes(
    boxes: npt.NDArray[Any],
    image_affine_ras: npt.NDArray[Any],
    tensor_affine_lps: npt.NDArray[Any],
    tensor_shape: tuple[int, int, int],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], list[tuple[int, ...] | None]]:
    """Map ``xyzxyz`` boxes (N, 6) in the voxel coordinates of the image the detector saw
    (affine ``image_affine_ras``, MONAI's RAS) to the tensor's grid and to LPS mm.

    Returns ``(box_voxel, box_mm, bbox)``: (N, 6) ``(k0, j0, i0, k1, j1, i1)`` continuous tensor
    indices (slices, rows, columns), (N, 6) LPS ``(x0, y0, z0, x1, y1, z1)`` mm (the bounds of
    the 8 corners: exact for the axis-aligned grids ``Orientationd``/``Spacingd`` make), and per
    box the inclusive voxel indices whose centres lie inside (None when none does).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    corners = _corners(boxes)  # (N, 8, 4) in the detector's image indices
    world = corners @ (_LPS_RAS @ np.asarray(image_affine_ras, dtype=np.float64)).T  # LPS
    index = world @ np.linalg.inv(np.asarray(tensor_affine_lps, dtype=np.float64)).T  # (i, j, k)
    box_mm = np.concatenate([world[..., :3].min(1), world[..., :3].max(1)], axis=1)
    ijk_lo, ijk_hi = index[..., :3].min(1), index[..., :3].max(1)
    box_voxel = np.concatenate([ijk_lo[:, ::-1], ijk_hi[:, ::-1]], axis=1)  # (k, j, i)
    shape = np.asarray(tensor_shape)
    bboxes: list[tuple[int, ...] | None] = []
    for row in box_voxel:
        first = np.maximum(np.ceil(row[:3] - 1e-6), 0).astype(int)
        last = np.minimum(np.floor(row[3:] + 1e-6), shape - 1).astype(int)
        bboxes.append(tuple(int(v) for v in (*first, *last)) if np.all(first <= last) else None)
    return box_voxel, box_mm, bboxes


class Detector:
    """A detection bundle on a device, boxing a stream of volumes (one at a time: the
    detector's sliding window batches the patches).

    Parameters
    ----------
    bundle:
        A loaded detection bundle (:func:`is_detection`).
    device:
        ``auto``, ``cpu`` or ``cuda``.
    score_threshold:
        Boxes scored lower are dropped (after the detector's own threshold).
    max_boxes:
        At most this many boxes per volume, best first.
    """

    def __init__(
        self,
        bundle: Any,
        *,
        device: str = "auto",
        score_threshold: float = 0.5,
        max_boxes: int = 20,
    ) -> None:
        from pipeline.infer.engine import EngineStats, pick_device

        self.bundle = bundle
        self.detector = detector_of(bundle.inferer)
        if self.detector is None:
            raise ModelError(f"bundle {bundle.name!r} has no RetinaNet detector")
        self.device = pick_device(device)
        self.autocast_dtype: Any = None
        self.score_threshold = float(score_threshold)
        self.max_boxes = int(max_boxes)
        self.network = bundle.network.to(self.device).eval()
        self.stats = EngineStats()

    def _boxes(
        self, volume: Volume | tuple[npt.NDArray[Any], npt.NDArray[np.float64]]
    ) -> list[Box]:
        import torch
        from monai.data.box_utils import clip_boxes_to_image

        array, affine = (volume.array, volume.affine) if isinstance(volume, Volume) else volume
        if array.ndim != 3:
            raise ModelError(f"expected a 3D volume (slices, rows, cols), got shape {array.shape}")
        key = self.bundle.image_key
        prepared = {key: loaded(array, affine)}
        if self.bundle.preprocessing is not None:
            prepared = self.bundle.preprocessing(prepared)
        image = prepared[key]
        started = time.perf_counter()
        with warnings.catch_warnings():
            # MONAI's padding notes and its NumPy 2 deprecations: not actionable here
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            out = self.bundle.inferer([image.as_tensor().to(self.device)], self.network)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stats.seconds_compute += time.perf_counter() - started
        self.stats.batches += 1
        det = self.detector
        result = out[0]
        boxes = result[det.target_box_key].detach().float().cpu()
        labels = result[det.target_label_key].detach().cpu()
        scores = result[det.pred_score_key].detach().float().cpu()
        started = time.perf_counter()
        spatial = tuple(int(s) for s in image.shape[1:])
        boxes, keep = clip_boxes_to_image(boxes, spatial, remove_empty=True)
        labels, scores = labels[keep], scores[keep]
        order = [int(i) for i in torch.argsort(scores, descending=True, stable=True)]
        order = [i for i in order if float(scores[i]) >= self.score_threshold][: self.max_boxes]
        if not order:
            self.stats.seconds_post += time.perf_counter() - started
            return []
        image_affine = np.asarray(image.affine, dtype=np.float64)
        box_voxel, box_mm, bboxes = map_boxes(
            np.asarray(boxes[order]), image_affine, np.asarray(affine), tuple(array.shape)
        )
        found = [
            Box(
                class_index=int(labels[i]),
                score=float(scores[i]),
                box_voxel=tuple(float(v) for v in box_voxel[n]),  # type: ignore[arg-type]
                box_mm=tuple(float(v) for v in box_mm[n]),  # type: ignore[arg-type]
                bbox=bboxes[n],  # type: ignore[arg-type]
            )
            for n, i in enumerate(order)
        ]
        self.stats.seconds_post += time.perf_counter() - started
        return found

    def detect(self, items: Iterable[tuple[Any, Loader]]) -> Iterator[tuple[Any, list[Box]]]:
        """Yield ``(key, boxes)`` for each ``(key, loader)``, in input order, best box first."""
        import torch

        started = time.perf_counter()
        try:
            with torch.inference_mode():
                for key, load in items:
                    waited = time.perf_counter()
                    volume = load()
                    self.stats.seconds_waiting += time.perf_counter() - waited
                    found = self._boxes(volume)
                    shape = volume.array.shape if isinstance(volume, Volume) else volume[0].shape
                    self.stats.volumes += 1
                    self.stats.voxels += int(np.prod(shape))
                    yield key, found
        finally:
            self.stats.seconds_total += time.perf_counter() - started


def detect_batch(
    detector: Detector,
    tensors: list[dict[str, Any]],
    *,
    lake: Any,
    run_id: str,
    part: str,
    entry: dict[str, Any],
) -> dict[str, Any]:
    """Box a batch of stored volumes; write one findings row per box (no mask).

    A row's ``label`` is the class name and ``instance`` the rank (1 the best box of the
    volume; the finding key ends ``<class name>_<rank>``), its ``label_value`` the rank,
    ``score`` the detector's, ``box_class`` the class name, and the box on the tensor grid
    (``box_voxel``, ``bbox``) and in LPS mm (``box_mm``, ``centre_mm``, ``size_mm``); coded
    at write-back by its class name (the registry's ``labels[<class name>]``, the code
    tables, or a local code)."""
    import datetime as dt
    import json

    from pipeline.infer.cohort import cohort_columns
    from pipeline.lake import write_partition

    bundle = detector.bundle
    model_ref = bundle.ref
    spec = entry.get("detection") or {}
    classes = {int(k): str(v) for k, v in (spec.get("classes") or {}).items()}
    now = dt.datetime.now(dt.UTC)
    by_key = {row["tensor_key"]: row for row in tensors}
    spacings: dict[str, tuple[float, ...]] = {}

    def loader(row: dict[str, Any]) -> Callable[[], Volume]:
        def load() -> Volume:
            array = np.load(lake.research / row["path"], allow_pickle=False)
            volume = Volume.from_tensor_row(row, array)
            spacings[row["tensor_key"]] = tuple(float(s) for s in volume.spacing)
            return volume

        return load

    before = detector.stats.as_dict()
    rows: list[dict[str, Any]] = []
    for key, boxes in detector.detect((row["tensor_key"], loader(row)) for row in tensors):
        row = by_key[key]
        for rank, box in enumerate(boxes, start=1):
            cls = classes.get(box.class_index, f"class_{box.class_index}")
            name = f"{cls}_{rank}"
            centre, size = list(box.centre_mm), list(box.size_mm)
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
                    "label": cls,
                    "label_value": rank,
                    # codes are applied at write-back (pipeline.codes), not copied here
                    "category_code": None,
                    "type_code": None,
                    "score": box.score,
                    "voxel_count": None,
                    "volume_ml": None,
                    "mean_hu": None,
                    "bbox": list(box.bbox) if box.bbox is not None else None,
                    "measurements": json.dumps(
                        {
                            "score": {"value": box.score, "unit": "1"},
                            "centre_mm": {"value": centre, "unit": "mm"},
                            "size_mm": {"value": size, "unit": "mm"},
                            "voxel_spacing_mm": list(spacings.get(key, ())),
                        },
                        sort_keys=True,
                    ),
                    "mask_path": None,
                    "mask_checksum": None,
                    "device": detector.device,
                    "run_id": run_id,
                    "inferred_at": now,
                    "box_class": cls,
                    "box_voxel": list(box.box_voxel),
                    "box_mm": list(box.box_mm),
                    "centre_mm": centre,
                    "size_mm": size,
                    "task": "detection",
                    "predicted": None,
                    "model_entry": entry.get("name"),
                    **cohort_columns(row),  # issue #24
                    "instance": rank,
                }
            )
    if rows:
        write_partition(lake, "findings", rows, part=part)
    after = detector.stats.as_dict()
    return {
        "volumes": len(tensors),
        "findings": len(rows),
        "stats": {k: after[k] - before[k] for k in after if k != "wait_fraction"},
    }
