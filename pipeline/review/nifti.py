"""NIfTI-1 bytes of research tensors for the in-page viewer, and the parse of a drawn mask.

The tensors are stored as (slices, rows, columns) arrays in C order with an affine from
(i=column, j=row, k=slice) to LPS millimetres. NIfTI indexes voxels (x, y, z) with x fastest
and maps them to RAS: so the header's dims are (columns, rows, slices), the bytes are the
array's own C-order bytes unchanged (column fastest), and the sform is
``diag(-1, -1, 1, 1) @ affine``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["HEADER_BYTES", "NiftiError", "nifti_header", "parse_mask"]

#: Header (348 bytes) plus the 4-byte extension flag: where the voxels start.
HEADER_BYTES = 352
#: NIfTI datatype codes of the dtypes served.
_CODES: dict[str, int] = {
    "uint8": 2,
    "int16": 4,
    "int32": 8,
    "float32": 16,
    "float64": 64,
    "int8": 256,
    "uint16": 512,
}
_DTYPES = {code: np.dtype(name) for name, code in _CODES.items()}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class NiftiError(ValueError):
    """A NIfTI that cannot be served or accepted (one-line reason)."""


def ras_affine(affine_lps: Sequence[float]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """The 4x4 voxel (i, j, k) -> RAS mm matrix of a tensors row's row-major LPS affine."""
    a = np.asarray(affine_lps, dtype=np.float64)
    if a.size != 16 or not np.all(np.isfinite(a)):
        raise NiftiError("the tensor's affine is not 16 finite numbers")
    return _LPS_TO_RAS @ a.reshape(4, 4)


def nifti_header(
    shape: Sequence[int], dtype: np.dtype[Any] | str, affine_lps: Sequence[float]
) -> bytes:
    """The 352 bytes (header and empty extension flag) before a (slices, rows, columns)
    array's C-order bytes that make them a NIfTI-1 file (``.nii``) in RAS millimetres."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        raise NiftiError("big-endian arrays are not served")
    code = _CODES.get(dt.name)
    if code is None:
        raise NiftiError(f"dtype {dt.name} has no NIfTI code here")
    if len(shape) != 3 or min(shape) < 1 or max(shape) > 32767:
        raise NiftiError(f"a 3-D shape of 1..32767 per axis is served, not {tuple(shape)}")
    nk, nj, ni = (int(v) for v in shape)
    ras = ras_affine(affine_lps)
    pixdim = np.sqrt((ras[:3, :3] ** 2).sum(axis=0))
    hdr = bytearray(HEADER_BYTES)
    struct.pack_into("<i", hdr, 0, 348)
    hdr[38] = ord("r")
    struct.pack_into("<8h", hdr, 40, 3, ni, nj, nk, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, code, dt.itemsize * 8)
    struct.pack_into("<8f", hdr, 76, 1.0, *pixdim, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, float(HEADER_BYTES))
    struct.pack_into("<ff", hdr, 112, 1.0, 0.0)  # scl_slope, scl_inter: values as stored
    hdr[123] = 2  # xyzt_units: millimetres
    hdr[148 : 148 + 16] = b"pacsflow review".ljust(16, b"\0")
    struct.pack_into("<hh", hdr, 252, 0, 1)  # qform_code 0, sform_code 1 (scanner)
    struct.pack_into("<12f", hdr, 280, *ras[:3, :].reshape(-1))
    hdr[344:348] = b"n+1\0"
    return bytes(hdr)


def parse_mask(body: bytes, shape: Sequence[int]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A drawn mask sent by the viewer (a NIfTI-1 ``.nii``, optionally gzipped) as a
    (slices, rows, columns) uint8 array of 0 and 1 (any non-zero voxel is 1).

    The NIfTI's dims must be the tensor's (columns, rows, slices); decompression stops at the
    size such a file can have, so a small gzip bomb cannot fill memory.

    Raises
    ------
    NiftiError
        Not a NIfTI-1, another shape, an unknown datatype, or a short or oversized file.
    """
    nk, nj, ni = (int(v) for v in shape)
    voxels = nk * nj * ni
    limit = HEADER_BYTES + 1024 * 1024 + voxels * 8  # extensions, and the widest datatype
    if body[:2] == b"\x1f\x8b":
        d = zlib.decompressobj(wbits=31)
        try:
            data = d.decompress(body, limit + 1)
        except zlib.error as exc:
            raise NiftiError(f"the gzip stream is broken ({exc})") from None
        if len(data) > limit or d.unconsumed_tail:
            raise NiftiError("the mask is larger than the tensor's shape allows")
    else:
        data = body
    if len(data) < HEADER_BYTES:
        raise NiftiError("not a NIfTI-1 file (too short)")
    (sizeof_hdr,) = struct.unpack_from("<i", data, 0)
    if sizeof_hdr != 348 or data[344:347] not in (b"n+1", b"ni1"):
        raise NiftiError("not a little-endian NIfTI-1 file")
    dim = struct.unpack_from("<8h", data, 40)
    ndim = dim[0]
    if not 3 <= ndim <= 7 or any(v > 1 for v in dim[4 : ndim + 1]):
        raise NiftiError(f"the mask must be 3-D, not {ndim}-D")
    if tuple(dim[1:4]) != (ni, nj, nk):
        raise NiftiError(
            f"the mask's shape {tuple(reversed(dim[1:4]))} is not the tensor's {(nk, nj, ni)}"
        )
    (code,) = struct.unpack_from("<h", data, 70)
    dt = _DTYPES.get(code)
    if dt is None:
        raise NiftiError(f"NIfTI datatype {code} is not accepted for a mask")
    (offset,) = struct.unpack_from("<f", data, 108)
    start = int(offset)
    if start < HEADER_BYTES or start + voxels * dt.itemsize != len(data):
        raise NiftiError("the mask's voxel data is not the size its header says")
    values = np.frombuffer(data, dtype=dt.newbyteorder("<"), count=voxels, offset=start)
    return (values != 0).astype(np.uint8).reshape(nk, nj, ni)
