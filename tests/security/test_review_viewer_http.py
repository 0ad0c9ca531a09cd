"""Issue #23: the viewer's routes under attack, over HTTP against the real app.

Volumes and masks need a login and are audited views; a correction needs the ``correct``
permission (reviewer, admin; not a lead), the session's CSRF token in ``X-CSRF-Token``, a mask
of the tensor's shape and a bounded body; keys and correction ids cannot walk out of the
research zone; NiiVue is served from the package, long-cached.
"""

from __future__ import annotations

import gzip
import http.client
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
import requests
from test_review_support import (
    WAIT_S,
    audit_records,
    csrf_token,
    finding_rows,
    logged_in,
    review_config,
    serve,
    shared_lake,
)

from pipeline.lake import LakePaths, read_table
from pipeline.review.nifti import HEADER_BYTES, nifti_header

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, session_key_file: Path) -> LakePaths:
    return shared_lake(tmp_path_factory, session_key_file)


@pytest.fixture(scope="module")
def base(lake: LakePaths, session_key_file: Path) -> Iterator[str]:
    with serve(review_config(lake), lake, session_key_file) as url:
        yield url


def _positive(lake: LakePaths) -> dict[str, Any]:
    return next(f for f in finding_rows(lake) if (f["voxel_count"] or 0) > 0)


def test_volume_and_mask_are_nifti_for_a_login_and_audited(lake: LakePaths, base: str) -> None:
    f = _positive(lake)
    key = f["finding_key"]
    anon = requests.get(base + "/volume.nii", params={"key": key}, allow_redirects=False)
    assert anon.status_code == 303
    assert "/login" in anon.headers["location"]
    with logged_in(base, "lena") as s:
        vol = s.get(base + "/volume.nii", params={"key": key}, timeout=WAIT_S)
        assert vol.status_code == 200
        assert vol.headers["Cache-Control"] == "private, no-cache"
        dims = struct.unpack_from("<8h", vol.content, 40)[1:4]
        shape = np.load(lake.research / f["mask_path"], mmap_mode="r").shape
        assert dims == tuple(reversed(shape))  # x = column, y = row, z = slice
        assert len(vol.content) > HEADER_BYTES + int(np.prod(shape))
        again = s.get(
            base + "/volume.nii",
            params={"key": key},
            headers={"If-None-Match": vol.headers["ETag"]},
            timeout=WAIT_S,
        )
        assert again.status_code == 304
        gz = s.get(base + "/volume.nii", params={"key": key, "gz": "1"}, timeout=WAIT_S)
        assert gzip.decompress(gz.content) == vol.content
        mask = s.get(base + "/mask.nii", params={"key": key}, timeout=WAIT_S)
        values = np.frombuffer(mask.content, dtype=np.uint8, offset=HEADER_BYTES)
        assert set(np.unique(values)) <= {0, 1}
        assert int(values.sum()) == f["voxel_count"]
        assert struct.unpack_from("<8h", mask.content, 40)[1:4] == dims
        for params in (
            {"key": "../../../etc/passwd"},
            {"key": key, "correction": "../../tables/reviews"},
            {"key": key, "gz": "2"},
        ):
            r = s.get(base + "/mask.nii", params=params, timeout=WAIT_S)
            assert r.status_code in (400, 404), params
        assert s.get(base + "/static/niivue/..%2F..%2Fapp.py", timeout=WAIT_S).status_code == 404
    lib = requests.get(base + "/static/niivue/niivue-0.69.0.js", timeout=WAIT_S)
    assert lib.status_code == 200
    assert "immutable" in lib.headers["Cache-Control"]
    events = [(r["event"], r["details"].get("finding_key")) for r in audit_records(lake)]
    assert events.count(("review_volume_viewed", key)) >= 3  # the 304 is a view too
    assert ("review_mask_viewed", key) in events


def test_preview_is_every_nth_voxel_with_a_scaled_affine(lake: LakePaths, base: str) -> None:
    """``step=n`` serves every n-th voxel along each axis (the page's preview of a large
    volume), the affine's voxel axes scaled so voxel i of the preview sits where voxel n*i of
    the whole does; a step outside 1..16 or not a number is refused; it is audited too."""
    f = _positive(lake)
    key = f["finding_key"]
    full_mask = np.load(lake.research / f["mask_path"]) == f["label_value"]
    with logged_in(base, "lena") as s:
        whole = s.get(base + "/mask.nii", params={"key": key}, timeout=WAIT_S)
        part = s.get(base + "/mask.nii", params={"key": key, "step": "2"}, timeout=WAIT_S)
        assert part.status_code == 200
        assert part.headers["ETag"] != whole.headers["ETag"]
        want = full_mask[::2, ::2, ::2]
        assert struct.unpack_from("<8h", part.content, 40)[1:4] == tuple(reversed(want.shape))
        got = np.frombuffer(part.content, dtype=np.uint8, offset=HEADER_BYTES)
        assert np.array_equal(got.reshape(want.shape), want.astype(np.uint8))
        srow = np.array(struct.unpack_from("<12f", part.content, 280)).reshape(3, 4)
        full = np.array(struct.unpack_from("<12f", whole.content, 280)).reshape(3, 4)
        np.testing.assert_allclose(srow[:, :3], 2 * full[:, :3], rtol=1e-6)
        np.testing.assert_allclose(srow[:, 3], full[:, 3], rtol=1e-6)
        vol = s.get(base + "/volume.nii", params={"key": key, "step": "3"}, timeout=WAIT_S)
        assert vol.status_code == 200
        for bad in ("0", "17", "-1", "1.5", "x", "٣", "100"):
            r = s.get(base + "/volume.nii", params={"key": key, "step": bad}, timeout=WAIT_S)
            assert r.status_code == 400, bad
    events = [(r["event"], r["details"].get("finding_key")) for r in audit_records(lake)]
    assert ("review_mask_viewed", key) in events


def test_one_plane_is_that_plane_with_a_moved_affine(lake: LakePaths, base: str) -> None:
    """``plane=a,n`` serves plane n across array axis a of the volume and of the mask (the
    slice viewer's first frame), the affine moved so its voxels sit where the whole's do; an
    axis or index outside the volume, a malformed value, or plane with step is refused (400),
    and each plane served is an audited view."""
    f = _positive(lake)
    key = f["finding_key"]
    full_mask = np.load(lake.research / f["mask_path"]) == f["label_value"]
    tensors = read_table(lake, "tensors").to_pylist()
    path = next(t["path"] for t in tensors if t["tensor_key"] == f["tensor_key"])
    volume = np.load(lake.research / path)
    k, j, i = (int((a + b) // 2) for a, b in zip(f["bbox"][:3], f["bbox"][3:], strict=True))
    before = len(audit_records(lake))
    with logged_in(base, "lena") as s:
        whole = s.get(base + "/volume.nii", params={"key": key}, timeout=WAIT_S)
        full_srow = np.array(struct.unpack_from("<12f", whole.content, 280)).reshape(3, 4)
        for axis, index in ((0, k), (1, j), (2, i)):
            region = [slice(None)] * 3
            region[axis] = slice(index, index + 1)
            want_mask = full_mask[tuple(region)].astype(np.uint8)
            want_vol = volume[tuple(region)]
            m = s.get(base + "/mask.nii", params={"key": key, "plane": f"{axis},{index}"})
            v = s.get(base + "/volume.nii", params={"key": key, "plane": f"{axis},{index}"})
            assert m.status_code == v.status_code == 200, (m.text, v.text)
            dims = struct.unpack_from("<8h", v.content, 40)[1:4]
            assert dims == tuple(reversed(want_vol.shape))
            got = np.frombuffer(v.content, dtype=want_vol.dtype.newbyteorder("<"), offset=352)
            assert np.array_equal(got.reshape(want_vol.shape), want_vol)
            got_m = np.frombuffer(m.content, dtype=np.uint8, offset=HEADER_BYTES)
            assert np.array_equal(got_m.reshape(want_mask.shape), want_mask)
            assert int(got_m.sum()) > 0  # the planes through the finding's box cross it
            # the plane's voxel 0 is the whole's voxel with `index` along `axis`
            srow = np.array(struct.unpack_from("<12f", v.content, 280)).reshape(3, 4)
            np.testing.assert_allclose(srow[:, :3], full_srow[:, :3], rtol=1e-6)
            ijk = np.zeros(4)
            ijk[2 - axis], ijk[3] = index, 1.0
            np.testing.assert_allclose(srow[:, 3], full_srow @ ijk, rtol=1e-5, atol=1e-3)
            assert v.headers["ETag"] != whole.headers["ETag"]
        shape = volume.shape
        for bad in (
            "3,0",
            f"0,{shape[0]}",
            f"2,{shape[2]}",
            "0",
            "0,1,2",
            "-1,0",
            "0,x",
            "0,٣",
            "0, 1",
            "",
            "0,1000000",
        ):
            r = s.get(base + "/volume.nii", params={"key": key, "plane": bad}, timeout=WAIT_S)
            assert r.status_code == 400, bad
        r = s.get(base + "/mask.nii", params={"key": key, "plane": "0,0", "step": "2"})
        assert r.status_code == 400
    events = [r["event"] for r in audit_records(lake)[before:]]
    assert events.count("review_volume_viewed") >= 4  # the whole and the three planes
    assert events.count("review_mask_viewed") >= 3


def test_a_cropped_mask_is_the_box_of_the_finding(lake: LakePaths, base: str) -> None:
    """``crop=1`` serves the mask cut to the smallest box holding the finding, its first
    voxel in ``X-Region-Start`` (k, j, i) and in the moved affine; refused with plane or step
    and on the volume; audited like the whole mask."""
    f = _positive(lake)
    key = f["finding_key"]
    on = np.load(lake.research / f["mask_path"]) == f["label_value"]
    hits = [np.flatnonzero(on.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    box = tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hits)
    before = len(audit_records(lake))
    with logged_in(base, "lena") as s:
        whole = s.get(base + "/mask.nii", params={"key": key}, timeout=WAIT_S)
        r = s.get(base + "/mask.nii", params={"key": key, "crop": "1"}, timeout=WAIT_S)
        assert r.status_code == 200, r.text
        assert r.headers["X-Region-Start"] == ",".join(str(b.start) for b in box)
        assert whole.headers["X-Region-Start"] == "0,0,0"
        assert r.headers["ETag"] != whole.headers["ETag"]
        want = on[box].astype(np.uint8)
        assert struct.unpack_from("<8h", r.content, 40)[1:4] == tuple(reversed(want.shape))
        got = np.frombuffer(r.content, dtype=np.uint8, offset=HEADER_BYTES)
        assert np.array_equal(got.reshape(want.shape), want)
        assert int(got.sum()) == int(on.sum())  # nothing of the finding left out
        srow = np.array(struct.unpack_from("<12f", r.content, 280)).reshape(3, 4)
        full = np.array(struct.unpack_from("<12f", whole.content, 280)).reshape(3, 4)
        ijk = np.array([box[2].start, box[1].start, box[0].start, 1.0])
        np.testing.assert_allclose(srow[:, 3], full @ ijk, rtol=1e-5, atol=1e-3)
        for params in ({"crop": "1", "plane": "0,0"}, {"crop": "1", "step": "2"}, {"crop": "2"}):
            bad = s.get(base + "/mask.nii", params={"key": key, **params}, timeout=WAIT_S)
            assert bad.status_code == 400, params
        bad = s.get(base + "/volume.nii", params={"key": key, "crop": "1"}, timeout=WAIT_S)
        assert bad.status_code == 400
    events = [r["event"] for r in audit_records(lake)[before:]]
    assert events.count("review_mask_viewed") >= 2


def _mask_nii(shape: list[int], affine: list[float] | None = None) -> bytes:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(s // 2 for s in shape)] = 1
    aff = affine or [1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0, 1]
    return gzip.compress(nifti_header(mask.shape, mask.dtype, aff) + mask.tobytes())


def test_corrections_need_the_role_the_token_and_the_shape(lake: LakePaths, base: str) -> None:
    f = _positive(lake)
    key = f["finding_key"]
    shape = [int(v) for v in np.load(lake.research / f["mask_path"], mmap_mode="r").shape]
    url = base + "/correction?key=" + quote(key, safe="")
    body = _mask_nii(shape)
    with logged_in(base, "rudi") as s:
        token = csrf_token(s.get(base + "/", timeout=WAIT_S).text)
        assert s.post(url, data=body, timeout=WAIT_S).status_code == 403  # no token
        bad = s.post(url, data=body, headers={"X-CSRF-Token": "x" * 43}, timeout=WAIT_S)
        assert bad.status_code == 403
        wrong = _mask_nii([shape[0], shape[2], shape[1] + 1])
        r = s.post(url, data=wrong, headers={"X-CSRF-Token": token}, timeout=WAIT_S)
        assert r.status_code == 400
        assert "not the tensor's" in r.text
        r = s.post(url, data=b"junk" * 100, headers={"X-CSRF-Token": token}, timeout=WAIT_S)
        assert r.status_code == 400
        r = s.post(base + "/correction?key=../../x", data=body, headers={"X-CSRF-Token": token})
        assert r.status_code == 404
        ok = s.post(url, data=body, headers={"X-CSRF-Token": token}, timeout=WAIT_S)
        assert ok.status_code == 201, ok.text
        saved = ok.json()
        assert saved["voxel_count"] == 1
        assert (lake.research / saved["mask_path"]).is_file()
        back = s.get(
            base + "/mask.nii",
            params={"key": key, "correction": saved["correction_id"]},
            timeout=WAIT_S,
        )
        assert back.status_code == 200
    with logged_in(base, "lena") as s:  # a lead may not correct
        token = csrf_token(s.get(base + "/", timeout=WAIT_S).text)
        r = s.post(url, data=body, headers={"X-CSRF-Token": token}, timeout=WAIT_S)
        assert r.status_code == 403
    # an oversized body is refused before it is read
    host = urlsplit(base)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=WAIT_S)
    conn.putrequest("POST", "/correction?key=x")
    conn.putheader("Content-Length", str(64 * 1024 * 1024 + 1))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    events = [r["event"] for r in audit_records(lake)]
    assert "review_correction_saved" in events
    assert "review_correction_refused" in events
    denied = [r["details"].get("reason") for r in audit_records(lake)]
    assert "csrf" in denied
    assert "role" in denied
