"""Batched segmentation with a loaded bundle: many volumes, one model, large batches.

:class:`Segmenter` keeps the network on its device and streams volumes through it:

1. a thread pool loads and preprocesses the next volumes (``np.load`` of the tensor, the
   bundle's ``preprocessing``) while the device computes on the current batch;
2. a 2D bundle (``spatial_dims == 2``) sees axial slices: slices of *several* volumes are packed
   into one batch of ``batch_size`` slices; a 3D bundle gets each whole volume through its
   ``inferer`` (e.g. ``SlidingWindowInferer``, whose ``sw_batch_size`` batches the patches);
3. when a volume's predictions are complete they go through the bundle's ``postprocessing``
   (argmax, inversion of the preprocessing back onto the tensor grid) and come out as a label
   map in tensor geometry, ``(slices, rows, columns)`` uint8.

Test-time augmentation: with ``mirror_axes`` (as nnU-Net mirrors) the network also sees the
input flipped along those axes, every combination of them, and with ``transpose_xy`` each of
those with its X and Y axes swapped; the logits, brought back, are averaged before the
postprocessing. ``("x", "y")`` quadruples the compute, with ``transpose_xy`` it is 8 times.

Runs under ``torch.inference_mode``; on CUDA with autocast (bf16 where supported, else fp16)
unless ``amp="off"``; the same code on CPU. Results are deterministic for the same input,
model, device and batch size (cuDNN benchmark off, deterministic kernels requested).

Volume convention: a tensor ``array`` ``(slices, rows, cols)`` with its LPS ``affine`` (see
:mod:`pipeline.tensors.volume`) is given to MONAI as ``MetaTensor(array.transpose(2, 1, 0)[None],
affine=RAS affine)``: channel, then x = column, y = row, z = slice, MONAI's RAS convention.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import logging
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from pipeline.dicom.volume import Volume, lps_to_ras
from pipeline.errors import ModelError
from pipeline.infer.bundle import Bundle

logger = logging.getLogger(__name__)

__all__ = ["MIRROR_AXES", "EngineStats", "Segmenter", "augmentation_views", "pick_device"]

K = TypeVar("K")
#: returns the volume to segment: a :class:`~pipeline.dicom.volume.Volume`, or the bare
#: ``(array, LPS affine)`` pair
Loader = Callable[[], Volume | tuple[npt.NDArray[Any], npt.NDArray[np.float64]]]
#: axes of MONAI's (X, Y, Z) = (columns, rows, slices) image a bundle can be mirrored along
MIRROR_AXES: tuple[str, ...] = ("x", "y", "z")

#: one test-time view of a (B, C, X, Y[, Z]) batch: the dims flipped, then X and Y swapped or not
View = tuple[tuple[int, ...], bool]


def augmentation_views(
    mirror_axes: Sequence[str], transpose_xy: bool, spatial_dims: int
) -> list[View]:
    """The views of a batch for test-time augmentation: flips along every combination of
    ``mirror_axes``, each also with X and Y swapped when ``transpose_xy`` (the 8 symmetries of
    a square for ``("x", "y")``); the identity first, ``[((), False)]`` for none."""
    dims: list[int] = []
    for axis in mirror_axes:
        if axis not in MIRROR_AXES[:spatial_dims]:
            raise ModelError(
                f"mirror axis {axis!r}: a {spatial_dims}D bundle can be mirrored along "
                f"{', '.join(MIRROR_AXES[:spatial_dims])}"
            )
        dim = 2 + MIRROR_AXES.index(axis)
        if dim not in dims:
            dims.append(dim)
    flips = [c for n in range(len(dims) + 1) for c in itertools.combinations(dims, n)]
    return [(f, t) for t in ((False, True) if transpose_xy else (False,)) for f in flips]


#: How to get a torch that computes on CUDA (README, "Installing").
CUDA_TORCH_HINT = (
    "install a CUDA build of torch, e.g. `pip install torch=={version} --index-url "
    "https://download.pytorch.org/whl/cu126` (or `make setup TORCH_SPEC=...`, README "
    "'Installing')"
)


def cuda_problem() -> str | None:
    """Why torch cannot compute on CUDA in this process (None: it can): a torch built
    without CUDA (the CPU wheel), or no device it can see."""
    import torch

    version = str(torch.__version__)
    if torch.version.cuda is None or not torch.backends.cuda.is_built():
        hint = CUDA_TORCH_HINT.format(version=version.split("+")[0])
        return f"this torch build ({version}) has no CUDA: {hint}"
    if not torch.cuda.is_available():
        return (
            f"torch {version} (CUDA {torch.version.cuda}) sees no CUDA device: check the "
            "NVIDIA driver (`nvidia-smi`) and CUDA_VISIBLE_DEVICES"
        )
    return None


def pick_device(device: str = "auto") -> str:
    """``"cuda"`` when asked for or (``auto``) available, else ``"cpu"``.

    Raises:
        ModelError: ``cuda`` asked for where torch cannot use it (:func:`cuda_problem`).
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        problem = cuda_problem()
        if problem:
            raise ModelError(f"device cuda asked for, but {problem}")
    return device


@dataclass
class EngineStats:
    """Where the time went, for bench/infer.py and the run manifest."""

    volumes: int = 0
    slices: int = 0
    voxels: int = 0
    batches: int = 0
    #: the compute loop blocked on the loading/preprocessing threads
    seconds_waiting: float = 0.0
    #: network forward passes (synchronised on CUDA)
    seconds_compute: float = 0.0
    #: postprocessing (argmax, inversion onto the tensor grid)
    seconds_post: float = 0.0
    seconds_total: float = 0.0

    @property
    def wait_fraction(self) -> float:
        """Share of the total time the model waited for data."""
        return self.seconds_waiting / self.seconds_total if self.seconds_total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "volumes": self.volumes,
            "slices": self.slices,
            "voxels": self.voxels,
            "batches": self.batches,
            "seconds_waiting": round(self.seconds_waiting, 3),
            "seconds_compute": round(self.seconds_compute, 3),
            "seconds_post": round(self.seconds_post, 3),
            "seconds_total": round(self.seconds_total, 3),
            "wait_fraction": round(self.wait_fraction, 4),
        }


@dataclass
class _Prepared(Generic[K]):
    key: K
    shape: tuple[int, ...]  # the tensor's (slices, rows, cols)
    image: Any  # the preprocessed MetaTensor (C, X, Y, Z)
    pieces: list[Any] = field(default_factory=list)  # logits chunks, in slice order
    done: int = 0


def _is_plain_argmax(transform: Any) -> bool:
    """``transform`` is ``AsDiscreted(keys="pred", argmax=True)`` and nothing else."""
    from monai.transforms import AsDiscreted

    if not isinstance(transform, AsDiscreted) or tuple(transform.keys) != ("pred",):
        return False
    return bool(
        transform.argmax[0] is True
        and transform.to_onehot[0] is None
        and transform.threshold[0] is None
        and transform.rounding[0] is None
        and not getattr(transform.converter, "kwargs", {})  # e.g. dim, keepdim, dtype
    )


def _split_argmax(post: Any) -> tuple[Literal["first", "last"] | None, Any]:
    """Where ``post``, a Compose, takes a plain ``AsDiscreted(keys="pred", argmax=True)``
    (``"first"``, or ``"last"`` after e.g. an ``Invertd`` of the logits) and the rest of it
    (``None`` when nothing is left): the engine then takes that argmax itself (same result,
    faster). ``(None, post)`` otherwise."""
    from monai.transforms import Compose

    if not isinstance(post, Compose) or not post.transforms:
        return None, post
    transforms = list(post.transforms)
    for where, index in (("first", 0), ("last", len(transforms) - 1)):
        if _is_plain_argmax(transforms[index]):
            rest = transforms[:index] + transforms[index + 1 :]
            return where, (Compose(rest) if rest else None)  # type: ignore[return-value]
    return None, post


def _argmax(pred: Any) -> Any:
    """= ``AsDiscreted(argmax=True)``: ``torch.argmax`` over the channel dim is ~7x slower on
    CPU than ``max(0).indices``, which returns the same (first) index of the maximum."""
    out = pred.max(0, keepdim=True).indices.to(pred.dtype)
    if hasattr(out, "copy_meta_from"):
        out.copy_meta_from(pred)
    return out


class Segmenter:
    """A bundle on a device, segmenting streams of volumes in batches.

    Parameters
    ----------
    bundle:
        A loaded bundle (:func:`pipeline.infer.bundle.load_bundle`).
    device:
        ``auto``, ``cpu`` or ``cuda``.
    batch_size:
        Slices per forward pass for 2D bundles (packed across volumes).
    amp:
        ``auto`` (bf16/fp16 autocast on CUDA, none on CPU), ``bf16``, ``fp16`` or ``off``.
    prefetch:
        Volumes loaded and preprocessed ahead of the device (memory: about that many volumes
        plus the ones in the current batch).
    loader_threads:
        Threads loading and preprocessing.
    mirror_axes:
        Test-time mirroring: also run the network on the input flipped along these axes of
        MONAI's image (``x`` = columns, ``y`` = rows, ``z`` = slices, 3D bundles only), every
        combination of them, and average the flipped-back logits. Empty: none.
    transpose_xy:
        Test-time transposition: each of those views also with X and Y swapped.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        batch_size: int = 64,
        amp: Literal["auto", "bf16", "fp16", "off"] = "auto",
        prefetch: int = 2,
        loader_threads: int = 1,
        mirror_axes: Sequence[str] = (),
        transpose_xy: bool = False,
    ) -> None:
        import torch

        self.bundle = bundle
        self.device = pick_device(device)
        self.batch_size = max(1, int(batch_size))
        self.prefetch = max(1, int(prefetch))
        self.loader_threads = max(1, int(loader_threads))
        self.autocast_dtype: Any = None
        if self.device == "cuda" and amp != "off":
            if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
                self.autocast_dtype = torch.float16
            else:
                self.autocast_dtype = torch.bfloat16
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.mirror_axes = tuple(mirror_axes)
        self.transpose_xy = bool(transpose_xy)
        self._views = augmentation_views(self.mirror_axes, self.transpose_xy, bundle.spatial_dims)
        self.network = bundle.network.to(self.device).eval()
        self.stats = EngineStats()
        self._fast_argmax, self._post = _split_argmax(bundle.postprocessing)

    # ---------------------------------------------------------------- preparation (threads)

    def _prepare(self, key: K, load: Loader) -> _Prepared[K]:
        import torch
        from monai.data import MetaTensor

        loaded = load()
        array, affine = (loaded.array, loaded.affine) if isinstance(loaded, Volume) else loaded
        if array.ndim == 4:  # channels stacked (pipeline.infer.inputs): (C, slices, rows, cols)
            data = np.ascontiguousarray(array.transpose(0, 3, 2, 1), dtype=np.float32)
            array = array[0]
        elif array.ndim == 3:
            data = np.ascontiguousarray(array.transpose(2, 1, 0)[None], dtype=np.float32)
        else:
            raise ModelError(f"expected a 3D volume (slices, rows, cols), got shape {array.shape}")
        ras = torch.from_numpy(lps_to_ras(affine))
        # what LoadImaged + EnsureChannelFirstd would give a bundle (float32, channel first,
        # RAS affine): its own EnsureChannelFirstd is then a no-op
        meta = {
            "original_affine": ras.clone(),
            "original_channel_dim": 0,
            "spatial_shape": np.asarray(data.shape[1:]),
            "space": "RAS",
        }
        image = MetaTensor(torch.from_numpy(data), affine=ras, meta=meta)
        image_key = self.bundle.image_key
        prepared = {image_key: image}
        if self.bundle.preprocessing is not None:
            prepared = self.bundle.preprocessing(prepared)
        return _Prepared(key=key, shape=tuple(array.shape), image=prepared[image_key])

    # ---------------------------------------------------------------- compute (this thread)

    def _forward(self, batch: Any) -> Any:
        import torch

        started = time.perf_counter()
        x = batch.to(self.device, non_blocking=True)
        autocast: Any = (
            torch.autocast("cuda", dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        total: Any = None
        for dims, swap in self._views:
            xi = x.flip(dims) if dims else x
            xi = xi.transpose(2, 3) if swap else xi
            with autocast:
                yi = self.bundle.inferer(xi, self.network)
            yi = yi.transpose(2, 3) if swap else yi
            yi = (yi.flip(dims) if dims else yi).float()
            total = yi if total is None else total.add_(yi)
        y = (total / len(self._views) if len(self._views) > 1 else total).cpu()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stats.seconds_compute += time.perf_counter() - started
        self.stats.batches += 1
        return y

    def _finish(self, item: _Prepared[K], logits: Any) -> npt.NDArray[np.uint8]:
        """Postprocess one volume's logits (C, X', Y', Z') onto the tensor grid."""
        import torch
        from monai.data import MetaTensor

        started = time.perf_counter()
        pred = MetaTensor(logits)
        if isinstance(item.image, MetaTensor):
            pred.copy_meta_from(item.image)
        out: Any = pred
        if self._fast_argmax == "first":
            out = _argmax(pred)
        if self._post is not None:
            with warnings.catch_warnings():
                # Invertd over a preprocessing with nothing to invert (BraTS: intensity only)
                warnings.filterwarnings("ignore", "inverse has been called but no invertible")
                out = self._post({"pred": out, self.bundle.image_key: item.image})["pred"]
        if self._fast_argmax == "last":
            out = _argmax(out)
        labels = torch.as_tensor(out).detach().cpu()
        if labels.ndim == 4 and labels.shape[0] > 1:
            labels = labels.max(0, keepdim=True).indices
        if labels.ndim == 4:
            labels = labels[0]
        if labels.is_floating_point():
            labels = labels.round()
        # to uint8 first, then (x, y, z) -> (z, y, x): a quarter of the bytes to transpose
        # (numpy's strided copy is about 2x torch's here)
        result = np.ascontiguousarray(labels.to(torch.uint8).numpy().transpose(2, 1, 0))
        if result.shape != item.shape:
            raise ModelError(
                f"the bundle's output has shape {result.shape}, the tensor {item.shape}: its "
                "postprocessing must bring predictions back to the input grid (e.g. Invertd)"
            )
        self.stats.seconds_post += time.perf_counter() - started
        self.stats.volumes += 1
        self.stats.voxels += int(np.prod(item.shape))
        return result

    def segment(
        self, items: Iterable[tuple[K, Loader]]
    ) -> Iterator[tuple[K, npt.NDArray[np.uint8]]]:
        """Yield ``(key, label map)`` for each ``(key, loader)``, in input order.

        ``loader()`` returns the :class:`~pipeline.dicom.volume.Volume` (or ``(array,
        affine)``): the tensor ``(slices, rows, cols)`` and its LPS affine. A loader or
        preprocessing error propagates (the stage records it per batch).
        """
        import torch

        started = time.perf_counter()
        pool = cf.ThreadPoolExecutor(self.loader_threads, thread_name_prefix="infer-load")
        source = iter(items)
        pending: deque[cf.Future[_Prepared[K]]] = deque()

        def refill() -> None:
            while len(pending) < self.prefetch:
                try:
                    key, load = next(source)
                except StopIteration:
                    return
                pending.append(pool.submit(self._prepare, key, load))

        def take() -> _Prepared[K] | None:
            refill()
            if not pending:
                return None
            waited = time.perf_counter()
            item = pending.popleft().result()
            self.stats.seconds_waiting += time.perf_counter() - waited
            refill()
            return item

        try:
            with torch.inference_mode():
                if self.bundle.spatial_dims == 3:
                    while (item := take()) is not None:
                        logits = self._forward(item.image.as_tensor()[None])[0]
                        yield item.key, self._finish(item, logits)
                else:
                    yield from self._segment_2d(take)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.stats.seconds_total += time.perf_counter() - started

    def _segment_2d(
        self, take: Callable[[], _Prepared[K] | None]
    ) -> Iterator[tuple[K, npt.NDArray[np.uint8]]]:
        """Pack slices of consecutive volumes into batches; finish volumes in order."""
        import torch

        open_items: deque[_Prepared[K]] = deque()  # volumes with slices not yet finished
        queue: deque[tuple[_Prepared[K], int, int]] = deque()  # (volume, z0, z1) to run
        queued = 0
        exhausted = False
        while True:
            while not exhausted and queued < self.batch_size:
                item = take()
                if item is None:
                    exhausted = True
                    break
                depth = int(item.image.shape[-1])
                open_items.append(item)
                queue.append((item, 0, depth))
                queued += depth
                self.stats.slices += depth
            if not queue:
                break
            # one batch of up to batch_size slices, possibly from several volumes
            parts, owners, room = [], [], self.batch_size
            while queue and room:
                item, z0, z1 = queue.popleft()
                take_n = min(room, z1 - z0)
                chunk = item.image.as_tensor()[..., z0 : z0 + take_n].permute(3, 0, 1, 2)
                parts.append(chunk)
                owners.append((item, take_n))
                room -= take_n
                queued -= take_n
                if z0 + take_n < z1:
                    queue.appendleft((item, z0 + take_n, z1))
            logits = self._forward(torch.cat(parts))  # (B, C, H, W)
            offset = 0
            for item, n in owners:
                item.pieces.append(logits[offset : offset + n])
                item.done += n
                offset += n
            while open_items and open_items[0].done == int(open_items[0].image.shape[-1]):
                item = open_items.popleft()
                volume_logits = torch.cat(item.pieces).permute(1, 2, 3, 0)  # (C, H, W, Z)
                item.pieces.clear()
                yield item.key, self._finish(item, volume_logits)
