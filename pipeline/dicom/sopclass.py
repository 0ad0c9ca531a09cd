"""Which objects of a series can be slices of a volume (issue #21).

An image study also holds objects that are not images of the patient's anatomy: structured
reports (SR, e.g. Siemens' "PhoenixZIPReport" Enhanced SR in an MR series), presentation
states, key object selections, RT structure sets and plans, waveforms, encapsulated documents,
raw data and spectroscopy. None has pixel data, so none can be a slice; a segmentation (SEG)
has pixel data but labels another series' frames. Such objects are no volume candidates: the
tensors stage never reads them (no refused volume, no quarantine row), the ``series`` table
marks a series made only of them as no candidate (``volume_ok`` null).
"""

from __future__ import annotations

from typing import Final

__all__ = ["NON_VOLUME_SOP_CLASSES", "is_volume_candidate_class"]

#: SOP classes with pixel data that still are no slices of the series' volume
NON_VOLUME_SOP_CLASSES: Final = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
        "1.2.840.10008.5.1.4.1.1.66.8",  # Height Map Segmentation Storage
    }
)


def is_volume_candidate_class(sop_class_uid: str | None, has_pixel_data: bool | None) -> bool:
    """Whether an object of ``sop_class_uid`` can be a slice of a volume.

    Parameters
    ----------
    sop_class_uid:
        The object's SOP Class UID (None: unknown, judged by its pixel data alone).
    has_pixel_data:
        Whether it holds (Float/Double Float) Pixel Data; None: unknown, taken as True so that
        the tensors stage reads the object and says what it finds.

    Returns
    -------
    bool
        False for objects without pixel data and for :data:`NON_VOLUME_SOP_CLASSES`.
    """
    if has_pixel_data is False:
        return False
    return (sop_class_uid or "").strip() not in NON_VOLUME_SOP_CLASSES
