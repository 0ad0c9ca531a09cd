"""Presentation contexts: what an association proposes (PS3.8 §9.3.2.2, PS3.4 C.4.3).

The SOP classes of the services pacsflow uses, the transfer syntaxes in the order it offers
them, and the storage contexts of a C-GET (SCP role) and of a C-STORE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "DEFAULT_STORAGE_CLASSES",
    "FIND",
    "GET",
    "MAX_CONTEXTS",
    "MOVE",
    "TS_PRIORITY",
    "UNCOMPRESSED",
    "VERIFICATION",
    "get_contexts",
    "store_contexts",
]

#: Most presentation contexts one association may propose (PS3.8 §9.3.2.2: context IDs 1-255,
#: odd). The C-GET association spends one on the Query/Retrieve model itself.
MAX_CONTEXTS: Final = 128

VERIFICATION: Final = "1.2.840.10008.1.1"
FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model
MOVE: Final = "1.2.840.10008.5.1.4.1.2.2.2"
GET: Final = "1.2.840.10008.5.1.4.1.2.2.3"
#: Transfer syntaxes of the non-storage contexts (Verification, Query/Retrieve).
UNCOMPRESSED: Final = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

#: Transfer syntaxes in the order they are offered when a SOP class cannot have one
#: presentation context per syntax: the common ones in real archives first.
TS_PRIORITY: Final = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)

#: Storage SOP classes proposed for C-GET when the PACS says nothing about a study's classes
#: (no SOPClassesInStudy, no SOPClassUID at IMAGE level): CT, MR, PET, NM, US, CR, DX, MG,
#: XA/RF, SC, SEG, SR, RT, presentation states and the enhanced and legacy-converted classes.
DEFAULT_STORAGE_CLASSES: Final = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.20",  # NM Image
    "1.2.840.10008.5.1.4.1.1.6.1",  # US Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # US Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX Image, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX Image, For Processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG Image, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # MG Image, For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis Image
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA Image
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image
    "1.2.840.10008.5.1.4.1.1.12.2",  # XRF Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
    "1.2.840.10008.5.1.4.1.1.481.8",  # RT Ion Plan
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
)


def get_contexts(sop_classes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The storage presentation contexts a C-GET proposes for ``sop_classes``.

    Each class gets an equal share of the 127 contexts left beside the Query/Retrieve one:
    one context per transfer syntax while the share lasts (so the PACS can send each instance
    as stored), then one context listing every remaining syntax.

    Parameters
    ----------
    sop_classes:
        Storage SOP Class UIDs, without repeats.

    Returns
    -------
    list of (str, list of str)
        ``(abstract syntax, transfer syntaxes)`` per context, at most 127.

    Raises
    ------
    ValueError
        For no class, or more classes than contexts.
    """
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    budget = MAX_CONTEXTS - 1
    if not sop_classes or len(sop_classes) > budget:
        raise ValueError(f"C-GET needs 1 to {budget} SOP classes; got {len(sop_classes)}")
    syntaxes = list(TS_PRIORITY) + [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in TS_PRIORITY]
    share = budget // len(sop_classes)
    contexts: list[tuple[str, list[str]]] = []
    for sop_class in sop_classes:
        if share >= len(syntaxes):
            contexts.extend((sop_class, [ts]) for ts in syntaxes)
        else:
            contexts.extend((sop_class, [ts]) for ts in syntaxes[: share - 1])
            contexts.append((sop_class, syntaxes[share - 1 :]))
    return contexts


def store_contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    """One presentation context per SOP class being sent, in the files' own transfer syntax
    (and Explicit VR Little Endian as an alternative): nothing else is proposed."""
    contexts: dict[str, list[str]] = {}
    for ds in datasets:
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), [])
        ts = str(ds.file_meta.TransferSyntaxUID)
        for syntax in (ts, UNCOMPRESSED[0]):
            if syntax not in syntaxes:
                syntaxes.append(syntax)
    return sorted(contexts.items())
