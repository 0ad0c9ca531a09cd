"""``pipeline.synth._part10``: the fast instance encoder writes what ``dcmwrite`` writes."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.synth._codecs import available_syntaxes, encode_frame, is_encapsulated
from pipeline.synth._part10 import InstanceEncoder, encode_element
from pipeline.synth.core import (
    INSTANCE_TAGS,
    SeriesPlan,
    file_meta,
    instance_elements,
    render_series,
    series_header,
)
from pipeline.synth.plan import plan_archive


def _plans() -> tuple[SeriesPlan, ...]:
    usable, _ = available_syntaxes(((64, 64),))
    plan = plan_archive(
        patients=2,
        seed=1,
        ct_slices=4,
        rows=64,
        columns=64,
        small=False,
        include_mr=True,
        include_bad=True,  # one series is written without preamble
        syntaxes=usable,
    )
    return plan.series


def _reference(plan: SeriesPlan, index: int, pixels: bytes) -> bytes:
    ds = series_header(plan)
    for tag, vr, value in instance_elements(plan, index):
        ds.add_new(tag, vr, value)
    if is_encapsulated(plan.transfer_syntax):
        ds.add_new(0x7FE00010, "OB", encapsulate([pixels], has_bot=True))
        ds["PixelData"].is_undefined_length = True
    else:
        ds.add_new(0x7FE00010, "OW", pixels)
    buffer = io.BytesIO()
    if plan.part10:
        ds.file_meta = file_meta(plan)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        dcmwrite(buffer, ds, enforce_file_format=True)
    else:
        dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


@pytest.mark.parametrize("plan", _plans(), ids=lambda p: f"{p.folder}-{p.transfer_syntax}")
def test_encoder_matches_dcmwrite(plan: SeriesPlan) -> None:
    encoder = InstanceEncoder(
        series_header(plan),
        INSTANCE_TAGS,
        plan.transfer_syntax,
        meta=file_meta(plan) if plan.part10 else None,
        encapsulated=is_encapsulated(plan.transfer_syntax),
    )
    for index, (stored, _) in enumerate(render_series(plan)):
        if index > 1:
            break
        pixels = encode_frame(
            plan.transfer_syntax, stored, bits_stored=plan.bits_stored, signed=plan.signed
        )
        assert encoder.encode(instance_elements(plan, index), pixels) == _reference(
            plan, index, pixels
        )


def test_encode_element_pads_and_checks_lengths() -> None:
    assert encode_element(0x00200013, "IS", b"7", implicit=False) == (
        b"\x20\x00\x13\x00IS\x02\x007 "
    )
    assert encode_element(0x00080018, "UI", b"1.2.3", implicit=True) == (
        b"\x08\x00\x18\x00\x06\x00\x00\x001.2.3\x00"
    )
    assert encode_element(0x7FE00010, "OW", b"\x01\x02", implicit=False)[4:12] == (
        b"OW\x00\x00\x02\x00\x00\x00"
    )
    with pytest.raises(ValueError, match="too long"):
        encode_element(0x00081030, "LO", b"x" * 70000, implicit=False)


def test_encoder_refuses_per_instance_tags_in_the_header() -> None:
    header = Dataset()
    header.InstanceNumber = 1
    with pytest.raises(ValueError, match="per-instance"):
        InstanceEncoder(
            header, INSTANCE_TAGS, ExplicitVRLittleEndian, meta=None, encapsulated=False
        )
    with pytest.raises(ValueError, match="ascending"):
        InstanceEncoder(
            Dataset(),
            tuple(reversed(INSTANCE_TAGS)),
            ExplicitVRLittleEndian,
            meta=None,
            encapsulated=False,
        )


def test_encoder_checks_the_values_it_is_given() -> None:
    encoder = InstanceEncoder(
        Dataset(), INSTANCE_TAGS[:1], ExplicitVRLittleEndian, meta=None, encapsulated=False
    )
    with pytest.raises(ValueError, match="one value per"):
        encoder.encode([], b"")
    with pytest.raises(ValueError, match="expected tag"):
        encoder.encode([(0x00200013, "IS", "1")], b"")
