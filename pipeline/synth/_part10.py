"""Fast encoding of many instances that share most of their header.

``pydicom.dcmwrite`` re-encodes every element of every instance (a few ms each for a full
header). A series' instances differ only in a handful of elements, so :class:`InstanceEncoder`
encodes the shared elements once, with pydicom, into byte segments between the per-instance
tags, and then only splices in the per-instance elements and Pixel Data. The result is
byte-for-byte what ``dcmwrite(..., enforce_file_format=True)`` writes for the full dataset (a
unit test checks this). Elements are encoded by :mod:`pipeline.dicom.elements`
(``encode_element`` is re-exported here).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag
from pydicom.uid import UID

from pipeline.dicom.elements import (
    PIXEL_DATA,
    SEQUENCE_DELIMITER,
    UNDEFINED,
    encode_element,
    encode_header,
)

logger = logging.getLogger(__name__)

__all__ = ["InstanceEncoder", "encode_element"]

_PIXEL_DATA = PIXEL_DATA
_MEDIA_SOP_INSTANCE = 0x00020003


class InstanceEncoder:
    """Encode instances of one series: a shared header plus per-instance elements.

    Parameters
    ----------
    header:
        The elements every instance shares (no Pixel Data, none of ``instance_tags``; no
        ambiguous VRs).
    instance_tags:
        ``(tag, VR)`` of the per-instance elements, every one given to :meth:`encode`, in
        ascending tag order.
    transfer_syntax:
        A little-endian transfer syntax UID.
    meta:
        File meta information without MediaStorageSOPInstanceUID, or ``None`` to write the
        bare dataset (no preamble, no file meta, as old exporters do).
    encapsulated:
        Whether Pixel Data is encapsulated (compressed transfer syntaxes).
    pixel_vr:
        VR of native Pixel Data (``"OW"`` for 16-bit).

    Raises
    ------
    ValueError
        If ``header`` holds a per-instance tag or Pixel Data, or the tags are not ascending.
    """

    def __init__(
        self,
        header: Dataset,
        instance_tags: Sequence[tuple[int, str]],
        transfer_syntax: str,
        *,
        meta: FileMetaDataset | None,
        encapsulated: bool,
        pixel_vr: str = "OW",
    ) -> None:
        tags = [t for t, _ in instance_tags]
        if tags != sorted(tags) or len(set(tags)) != len(tags):
            raise ValueError("instance tags must be unique and ascending")
        clash = [f"{t:08X}" for t in (*tags, _PIXEL_DATA) if Tag(t) in header]
        if clash:
            raise ValueError(f"the shared header holds per-instance tags {clash}")
        ts = UID(transfer_syntax)
        if not ts.is_little_endian:
            raise ValueError(f"{ts} is not little endian")
        self.implicit = bool(ts.is_implicit_VR)
        self.encapsulated = encapsulated
        self.pixel_vr = pixel_vr
        self.instance_tags = tuple(instance_tags)
        self._segments = self._split(header, tags)
        self._meta_parts = self._meta(meta) if meta is not None else None

    def _split(self, header: Dataset, tags: list[int]) -> list[bytes]:
        """Encode the shared elements into segments around the per-instance tags.

        Segment ``i < n`` precedes per-instance tag ``i``, segment ``n`` precedes Pixel Data
        and segment ``n + 1`` follows it. Elements are written one by one in tag order, as
        ``write_dataset`` does (without its ambiguous-VR pass: the header has none).
        """
        encodings = convert_encodings(header.get("SpecificCharacterSet", "ISO_IR 6"))
        bounds = [*tags, _PIXEL_DATA, 0x1_0000_0000]
        buffers = [DicomBytesIO() for _ in bounds]
        for fp in buffers:
            fp.is_little_endian = True
            fp.is_implicit_VR = self.implicit
        slot = 0
        for tag in sorted(header.keys()):
            while tag >= bounds[slot]:
                slot += 1
            write_data_element(buffers[slot], header[tag], encodings)
        return [fp.getvalue() for fp in buffers]

    def _meta(self, meta: FileMetaDataset) -> tuple[bytes, bytes]:
        if _MEDIA_SOP_INSTANCE in meta:
            raise ValueError("the file meta must not hold MediaStorageSOPInstanceUID")
        fp_before = DicomBytesIO()
        fp_after = DicomBytesIO()
        for fp in (fp_before, fp_after):
            fp.is_little_endian = True
            fp.is_implicit_VR = False
        for elem in meta:
            if elem.tag == 0x00020000:
                continue
            write_data_element(fp_before if elem.tag < _MEDIA_SOP_INSTANCE else fp_after, elem)
        return fp_before.getvalue(), fp_after.getvalue()

    def encode(
        self, values: Sequence[tuple[int, str, str]], pixel_data: bytes | Sequence[bytes]
    ) -> bytes:
        """Return the complete file of one instance.

        Parameters
        ----------
        values:
            ``(tag, VR, text)`` of every per-instance element, in the order of
            ``instance_tags``; the first must be SOPInstanceUID when a file meta is written.
        pixel_data:
            Native pixel bytes, or the compressed frames (encapsulated here with a basic
            offset table).

        Returns
        -------
        bytes
            The Part 10 file (preamble, ``DICM``, file meta, dataset), or the bare dataset.

        Raises
        ------
        ValueError
            If ``values`` does not match ``instance_tags``.
        """
        if len(values) != len(self.instance_tags):
            raise ValueError("one value per instance tag is needed")
        out: list[bytes] = []
        if self._meta_parts is not None:
            sop = values[0][2].encode("ascii")
            before, after = self._meta_parts
            media = encode_element(_MEDIA_SOP_INSTANCE, "UI", sop, implicit=False)
            length = len(before) + len(media) + len(after)
            out += [
                b"\x00" * 128,
                b"DICM",
                struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, length),
                before,
                media,
                after,
            ]
        for segment, (tag, vr, text), (want, _) in zip(
            self._segments, values, self.instance_tags, strict=False
        ):
            if tag != want:
                raise ValueError(f"expected tag {want:08X}, got {tag:08X}")
            out.append(segment)
            out.append(encode_element(tag, vr, text.encode("ascii"), implicit=self.implicit))
        out.append(self._segments[-2])
        out.append(self._pixel_data(pixel_data))
        out.append(self._segments[-1])
        return b"".join(out)

    def _pixel_data(self, pixel_data: bytes | Sequence[bytes]) -> bytes:
        if not self.encapsulated:
            assert isinstance(pixel_data, bytes | bytearray)
            return encode_element(
                _PIXEL_DATA, self.pixel_vr, bytes(pixel_data), implicit=self.implicit
            )
        frames = [pixel_data] if isinstance(pixel_data, bytes | bytearray) else list(pixel_data)
        value = encapsulate([bytes(f) for f in frames], has_bot=True)
        head = encode_header(_PIXEL_DATA, "OB", UNDEFINED, implicit=self.implicit)
        assert head is not None  # OB has a 4-byte length
        return head + value + SEQUENCE_DELIMITER
