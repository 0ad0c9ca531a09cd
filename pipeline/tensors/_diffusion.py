"""The diffusion b-value and gradient direction of one MR image (issue #21).

Read, in this order, from the standard attributes -- Diffusion b-value (0018,9087) and
Diffusion Gradient Orientation (0018,9089), at the top level, in an MR Diffusion Sequence, or
in an enhanced object's per-frame group -- and, where they are absent, from the vendors'
private elements that dcm2niix reads:

========  ====================================  =============================  ============
vendor    b-value                               direction                      frame
========  ====================================  =============================  ============
Siemens   (0019,xx0C) ``SIEMENS MR HEADER``     (0019,xx0E)                    patient
GE        (0043,xx39)[0] mod 1e9                (0019,xxBB/BC/BD)              image
          ``GEMS_PARM_01``                      ``GEMS_ACQU_01``
Philips   (2001,xx03) ``Philips Imaging DD      (2005,xxB0/B1/B2) ``Philips    patient
          001``                                 MR Imaging DD 001``
UIH       (0065,xx09) ``Image Private Header``  (0065,xx37)                    image
========  ====================================  =============================  ============

Directions in the image frame (row, column, normal cosines) are turned into the patient frame
(LPS). A private element is looked up in the block its creator reserved; where the object
names no creator in that group at all (some anonymisers strip them), at its usual element.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydicom import Dataset

__all__ = ["Diffusion", "diffusion_of"]

#: (b-value in s/mm^2, unit gradient direction in the patient frame (LPS) or None)
Diffusion = tuple[float, tuple[float, float, float] | None]

_SIEMENS: Final = "SIEMENS MR HEADER"
_GE_ACQU: Final = "GEMS_ACQU_01"
_GE_PARM: Final = "GEMS_PARM_01"
_PHILIPS_IMAGING: Final = "Philips Imaging DD 001"
_PHILIPS_MR: Final = "Philips MR Imaging DD 001"
_UIH: Final = "Image Private Header"


def _private(ds: Dataset, group: int, element: int, creator: str) -> Any:
    """The raw value of private ``(group, xxEE)`` in the block ``creator`` reserved."""
    low = element & 0xFF
    named = False
    for slot in range(0x10, 0x100):
        tag = (group << 16) | slot
        if tag not in ds:
            continue
        named = True
        value = ds[tag].value
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if str(value).strip().rstrip("\x00").strip() == creator:
            target = (group << 16) | (slot << 8) | low
            return ds[target].value if target in ds else None
    if not named:
        tag = (group << 16) | element
        return ds[tag].value if tag in ds else None
    return None


def _floats(value: Any, binary: str = "") -> list[float] | None:
    """Numbers of a DS/IS/FD/FL value, also when read as bytes (VR UN in implicit VR)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("latin-1").strip("\x00 ")
        try:
            return [float(v) for v in text.split("\\")] if text else None
        except ValueError:
            pass
        if binary and len(value) % struct.calcsize(binary) == 0 and value:
            n = len(value) // struct.calcsize(binary)
            return [float(v) for v in struct.unpack(f"<{n}{binary}", value)]
        return None
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if out and all(math.isfinite(v) for v in out) else None


def _unit(values: list[float] | None) -> tuple[float, float, float] | None:
    if values is None or len(values) != 3:
        return None
    return (float(values[0]), float(values[1]), float(values[2]))


def _public(item: Dataset | None) -> tuple[float | None, tuple[float, float, float] | None]:
    if item is None:
        return None, None
    b = _floats(item.get("DiffusionBValue"), "d")
    vec = _unit(_floats(item.get("DiffusionGradientOrientation"), "d"))
    seq = item.get("DiffusionGradientDirectionSequence")
    if vec is None and seq:
        vec = _unit(_floats(seq[0].get("DiffusionGradientOrientation"), "d"))
    return (b[0] if b else None), vec


def _vendor(ds: Dataset) -> tuple[float | None, tuple[float, float, float] | None, bool]:
    """(b, direction, direction is in the image frame) from private elements."""
    b = _floats(_private(ds, 0x0019, 0x100C, _SIEMENS))
    if b:
        return b[0], _unit(_floats(_private(ds, 0x0019, 0x100E, _SIEMENS), "d")), False
    b = _floats(_private(ds, 0x0043, 0x1039, _GE_PARM))
    if b:
        parts = [_floats(_private(ds, 0x0019, e, _GE_ACQU)) for e in (0x10BB, 0x10BC, 0x10BD)]
        vec = _unit([p[0] for p in parts if p]) if all(parts) else None
        return math.fmod(b[0], 1e9), vec, True
    b = _floats(_private(ds, 0x2001, 0x1003, _PHILIPS_IMAGING), "f")
    if b:
        parts = [
            _floats(_private(ds, 0x2005, e, _PHILIPS_MR), "f") for e in (0x10B0, 0x10B1, 0x10B2)
        ]
        vec = _unit([p[0] for p in parts if p]) if all(parts) else None
        return b[0], vec, False
    b = _floats(_private(ds, 0x0065, 0x1009, _UIH), "d")
    if b:
        return b[0], _unit(_floats(_private(ds, 0x0065, 0x1037, _UIH), "d")), True
    return None, None, False


def diffusion_of(
    ds: Dataset, orientation: npt.NDArray[np.float64], item: Dataset | None = None
) -> Diffusion | None:
    """The b-value and LPS gradient direction of ``ds`` (or of one enhanced frame, whose MR
    Diffusion Sequence item is ``item``); None where the image says nothing of diffusion.

    A zero b-value without a direction gets the zero vector (an unweighted volume, as dcm2niix
    writes it); a direction of length zero stays zero; others are normalised.
    """
    b, vec = _public(item)
    image_frame = False
    if b is None:
        top = ds.get("MRDiffusionSequence")
        b, vec = _public(top[0] if top else ds)
    if b is None:
        b, vec, image_frame = _vendor(ds)
    if b is None:
        return None
    if vec is not None:
        v = np.asarray(vec, dtype=np.float64)
        if image_frame:
            row, col = orientation[:3], orientation[3:]
            v = v[0] * row + v[1] * col + v[2] * np.cross(row, col)
        norm = float(np.linalg.norm(v))
        v = v / norm if norm > 1e-6 else np.zeros(3)
        vec = (
            round(float(v[0]), 6) + 0.0,
            round(float(v[1]), 6) + 0.0,
            round(float(v[2]), 6) + 0.0,
        )
    elif b == 0:
        vec = (0.0, 0.0, 0.0)
    return round(float(b), 6), vec
