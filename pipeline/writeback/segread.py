"""Read a DICOM SEG back onto the volume of its source images (the reverse of write-back).

:func:`read_seg` returns one boolean mask per segment in the geometry pacsflow builds volumes
in (:func:`pipeline.tensors.volume.build_volumes`: slices ordered along the normal, array
``(slices, rows, cols)``): a SEG frame lands on the slice whose source image (or source frame)
it sits on, matched by its Plane Position (the geometry viewers use), so a SEG written by
pacsflow, or by any conformant tool, overlays the right slices whatever its frame order and
whether or not empty frames were left out. A frame that lies on no source slice is an error,
not silently dropped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline.dicom.volume import Volume
from pipeline.errors import WritebackError
from pipeline.writeback.objects import segment_of_frames

__all__ = ["POSITION_TOL_MM", "read_seg"]

#: a SEG frame belongs to the source slice whose origin is within this distance (mm)
POSITION_TOL_MM = 0.01


def read_seg(seg_ds: Any, volume: Volume) -> dict[int, tuple[str, npt.NDArray[np.bool_]]]:
    """``{segment number: (label, mask)}`` with masks shaped like ``volume``.

    Parameters
    ----------
    seg_ds:
        The SEG dataset (pydicom, or a highdicom ``Segmentation``).
    volume:
        The :class:`~pipeline.dicom.volume.Volume` of the source images (its ``affine`` and
        array shape; build it with ``pipeline.tensors.volume.build_volume`` from the source
        headers, or ``Volume.from_tensor_row`` from a stored tensor's geometry), on the source
        frames' grid.

    Raises
    ------
    WritebackError
        If ``volume`` is not on the source frames' grid, or the SEG does not fit it.
    """
    if not volume.on_source_grid:
        raise WritebackError(
            f"the volume is {volume.grid.value}: SEG frames map onto native grids only"
        )
    import highdicom as hd

    seg = (
        seg_ds
        if isinstance(seg_ds, hd.seg.Segmentation)
        else hd.seg.Segmentation.from_dataset(seg_ds)
    )
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    shape = volume.array.shape[:3]
    masks = {n: np.zeros(shape, dtype=bool) for n in labels}
    # each slice's origin in patient space, from the volume's affine (LPS)
    k = np.arange(shape[0], dtype=np.float64)
    origins = (volume.affine @ np.stack([np.zeros_like(k), np.zeros_like(k), k, np.ones_like(k)]))[
        :3
    ].T
    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.shape[1:3] != shape[1:3]:
        raise WritebackError(
            f"SEG frames of {frames.shape[1:3]} do not match the source frames {shape[1:3]}"
        )
    shared = seg.get("SharedFunctionalGroupsSequence", [None])[0]
    numbers = segment_of_frames(seg)  # a single-segment SEG says it once, in shared groups
    for index, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = numbers[index]
        plane = fg.get("PlanePositionSequence") or (
            shared.get("PlanePositionSequence") if shared is not None else None
        )
        if not plane:
            raise WritebackError(f"SEG frame {index + 1} has no Plane Position")
        ipp = np.asarray([float(v) for v in plane[0].ImagePositionPatient])
        distance = np.linalg.norm(origins - ipp, axis=1)
        slice_k = int(np.argmin(distance))
        if distance[slice_k] > POSITION_TOL_MM:
            raise WritebackError(
                f"SEG frame {index + 1} lies {distance[slice_k]:.2f} mm from every source slice"
            )
        masks[number][slice_k] |= frames[index] > 0
    return {n: (labels[n], masks[n]) for n in labels}
