"""The in-page viewer's routes: NiiVue as static files, a finding's volume and mask as NIfTI,
and reviewers' corrected masks.

- ``GET /static/niivue/<file>``: the vendored NiiVue ES module and its licence (public code;
  long-cached under a versioned name, gzipped when the browser accepts it);
- ``GET /volume.nii?key=<finding>`` and ``GET /mask.nii?key=<finding>[&correction=<id>]``:
  the de-identified volume and the finding's mask (1 on the finding; or a stored correction)
  as NIfTI-1 in RAS (:mod:`pipeline.review.nifti`), raw or with ``gz=1`` gzipped, whole, or
  with ``step=n`` every n-th voxel along each axis (a preview), or with ``plane=a,n`` the one
  plane ``n`` (from 0) across array axis ``a`` (0 slice, 1 row, 2 column; the slice viewer's
  first frame, read from the memory-mapped tensor without the rest), or for a mask with
  ``crop=1`` the smallest box holding the finding; ``X-Region-Start`` gives the (k, j, i) of
  the answer's first voxel in the whole volume, and the affine is moved to it; login and
  the ``view`` permission required, each answer (a 304 too) audited as a view; ``Cache-Control:
  private, no-cache`` with an ETag, so a browser revalidates (and is audited) every time;
- ``POST /correction?key=<finding>``: a drawn mask (NIfTI, gzipped or not) from a role with the
  ``correct`` permission, with the session's CSRF token in ``X-CSRF-Token``, at most
  :data:`MAX_CORRECTION_BYTES`; the tensor's shape or refused (400); stored by
  :func:`pipeline.review.corrections.record_correction`; audited (saved or refused).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.review.corrections import (
    CORRECTION_ID,
    correction_path,
    latest_corrections,
    load_corrections,
)
from pipeline.review.nifti import NiftiError, nifti_header, parse_mask, ras_affine
from pipeline.review.render import WINDOWS

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from pipeline.review.app import _App

__all__ = [
    "MAX_CORRECTION_BYTES",
    "NIIVUE",
    "Viewer",
]

#: The vendored NiiVue module (tools/vendor-niivue.sh writes it).
NIIVUE = "niivue-0.69.0.js"
_STATIC = Path(__file__).parent / "static" / "niivue"
_STATIC_TYPES = {NIIVUE: "text/javascript", "LICENSE": "text/plain; charset=utf-8"}
#: Largest correction body accepted (a gzipped mask is far smaller; a raw one of a
#: 512x512x300 CT is 75 MiB and must be gzipped).
MAX_CORRECTION_BYTES = 64 * 1024 * 1024
_NII_TYPES = frozenset({"uint8", "int16", "int32", "float32", "int8", "uint16"})


#: Largest ``step`` of a preview volume (every step-th voxel along each axis).
MAX_STEP = 16
#: Bytes per chunk of a raw NIfTI answer.
_CHUNK = 8 << 20


def _plane(request: Request, shape: Any) -> tuple[int, int] | bool | None:
    """The request's ``plane=axis,index`` as (axis, index); None when absent; False when it
    is not two integers with axis 0..2 and index inside the volume."""
    text = request.query_params.get("plane")
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 5 for p in parts):
        return False
    axis, index = int(parts[0]), int(parts[1])
    if axis > 2 or index >= int(shape[axis]):
        return False
    return axis, index


def _box_part(
    shape: tuple[int, ...], box: tuple[slice, slice, slice], region: tuple[slice, slice, slice]
) -> np.ndarray[Any, Any]:
    """The uint8 mask that is 1 inside ``box`` and 0 elsewhere in a volume of ``shape``, over
    ``region`` only (one axis indicator each, multiplied out)."""
    axes = []
    for n, inside, cut in zip(shape, box, region, strict=True):
        on = np.zeros(n, dtype=np.uint8)
        on[inside] = 1
        axes.append(on[cut])
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


def _step(request: Request) -> int | None:
    """The request's ``step`` (1 when absent), or None when it is not an integer 1..MAX_STEP."""
    text = request.query_params.get("step", "1")
    if not (text.isascii() and text.isdigit() and len(text) <= 2):
        return None
    step = int(text)
    return step if 1 <= step <= MAX_STEP else None


class Viewer:
    """The viewer's handlers over the app's state (sessions, catalogue, audit)."""

    def __init__(self, app: _App) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._gz: dict[str, bytes] = {}
        self._tensors: dict[str, dict[str, Any]] = {}
        self._extents: dict[str, tuple[slice, slice, slice]] = {}

    def routes(self) -> list[Route]:
        """The routes to register in the app."""
        from starlette.routing import Route

        return [
            Route("/static/niivue/{name}", self.static),
            Route("/volume.nii", self.volume),
            Route("/mask.nii", self.mask),
            Route("/correction", self.correction, methods=["POST"]),
        ]

    # ---------------------------------------------------------------- page context

    def context(self, f: dict[str, Any], role: str) -> dict[str, Any]:
        """What the finding page's viewer needs (data attributes; no inline script)."""
        from urllib.parse import urlencode

        from pipeline.review.app import PERMISSIONS

        key = str(f["finding_key"])
        has_mask = bool(f.get("mask_path") or f.get("bbox"))
        corrections = [c for c in load_corrections(self.app.lake) if c["finding_key"] == key]
        latest = latest_corrections(corrections).get(key)
        centre = self.centre_mm(f)
        t = self.tensor(str(f["tensor_key"]))
        vox = self.centre_vox(f)
        ct = f.get("Modality") == "CT" and bool(f.get("rescaled", True))
        return {
            "module": f"/static/niivue/{NIIVUE}",
            "slices": "/static/slices.js",
            "affine": ",".join(f"{float(v):.6g}" for v in t["affine"]) if t else "",
            "centre_vox": ",".join(str(v) for v in vox) if vox else "",
            "volume": "/volume.nii?" + urlencode({"key": key}),
            "mask": "/mask.nii?" + urlencode({"key": key}) if has_mask else "",
            "correction": (
                "/mask.nii?" + urlencode({"key": key, "correction": latest["correction_id"]})
                if latest
                else ""
            ),
            "save": "/correction?" + urlencode({"key": key}),
            "centre": ",".join(f"{v:.3f}" for v in centre) if centre else "",
            "shape": ",".join(str(int(v)) for v in f.get("shape") or (1, 1, 1)),
            "windows": [w for w in WINDOWS if ct or w == "auto"],
            "presets": json.dumps({w: v for w, v in WINDOWS.items() if v is not None and ct}),
            "can_correct": "correct" in PERMISSIONS.get(role, frozenset()),
            "corrections": len(corrections),
        }

    def tensor(self, tensor_key: str) -> dict[str, Any] | None:
        """The tensors row (affine, dtype, shape, checksum) of a key, cached."""
        with self._lock:
            if tensor_key in self._tensors:
                return self._tensors[tensor_key]
        import pyarrow.compute as pc

        from pipeline.lake.io import read_table

        rows = read_table(
            self.app.lake,
            "tensors",
            columns=["tensor_key", "affine", "shape", "checksum", "status"],
            filter=pc.field("tensor_key") == tensor_key,
        ).to_pylist()
        row = next((r for r in rows if r.get("status") == "ok" and r.get("affine")), None)
        if row is not None:
            with self._lock:
                self._tensors[tensor_key] = row
        return row

    def centre_mm(self, f: dict[str, Any]) -> list[float] | None:
        """The finding's centre in RAS mm: its box's middle voxel, else ``centre_mm`` (LPS),
        else None (the viewer opens at the volume's middle)."""
        t = self.tensor(str(f["tensor_key"]))
        if t is None:
            return None
        bbox = f.get("bbox")
        if bbox:
            k0, j0, i0, k1, j1, i1 = (float(v) for v in bbox)
            vox = np.array([(i0 + i1) / 2, (j0 + j1) / 2, (k0 + k1) / 2, 1.0])
            return [float(v) for v in (ras_affine(t["affine"]) @ vox)[:3]]
        c = f.get("centre_mm")
        if c and len(c) == 3:
            return [-float(c[0]), -float(c[1]), float(c[2])]
        return None

    def centre_vox(self, f: dict[str, Any]) -> list[int] | None:
        """The finding's centre as a voxel (k, j, i) of its volume: its box's middle, else
        ``centre_mm`` (LPS) through the affine, else None (the volume's middle)."""
        shape = [int(v) for v in f.get("shape") or ()]
        if len(shape) != 3:
            return None
        bbox = f.get("bbox")
        if bbox:
            vox = [(int(bbox[a]) + int(bbox[a + 3])) // 2 for a in range(3)]
        else:
            t = self.tensor(str(f["tensor_key"]))
            c = f.get("centre_mm")
            if t is None or not c or len(c) != 3:
                return None
            a = np.asarray(t["affine"], dtype=np.float64).reshape(4, 4)
            try:
                ijk = np.linalg.solve(a, np.array([float(v) for v in c] + [1.0]))[:3]
            except np.linalg.LinAlgError:
                return None
            if not np.all(np.isfinite(ijk)):
                return None
            vox = [round(float(ijk[2])), round(float(ijk[1])), round(float(ijk[0]))]
        return [min(max(v, 0), n - 1) for v, n in zip(vox, shape, strict=True)]

    # ---------------------------------------------------------------- static

    def static(self, request: Request) -> Response:
        """NiiVue and its licence; gzipped once (kept in memory) for browsers that accept it."""
        from starlette.responses import PlainTextResponse, Response

        name = str(request.path_params.get("name", ""))
        if name not in _STATIC_TYPES:
            return PlainTextResponse("not found", status_code=404)
        headers = {
            "Cache-Control": "public, max-age=31536000, immutable",
            "Vary": "Accept-Encoding",
        }
        body = (_STATIC / name).read_bytes()
        if "gzip" in request.headers.get("accept-encoding", ""):
            with self._lock:
                packed = self._gz.get(name)
            if packed is None:
                packed = gzip.compress(body, compresslevel=6, mtime=0)
                with self._lock:
                    self._gz[name] = packed
            body = packed
            headers["Content-Encoding"] = "gzip"
        return Response(body, media_type=_STATIC_TYPES[name], headers=headers)

    # ---------------------------------------------------------------- volumes and masks

    def _finding(self, request: Request) -> tuple[tuple[str, str], dict[str, Any]] | Response:
        from starlette.responses import PlainTextResponse

        who = self.app.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        key = request.query_params.get("key", "")
        f = self.app.catalog.finding(key)
        if f is None or not f.get("tensor_path") or not f.get("shape"):
            return PlainTextResponse("no such finding or volume", status_code=404)
        if request.query_params.get("gz", "0") not in ("0", "1"):
            return PlainTextResponse("gz must be 0 or 1", status_code=400)
        if _step(request) is None:
            return PlainTextResponse(f"step must be 1..{MAX_STEP}", status_code=400)
        plane = _plane(request, f["shape"])
        if plane is False:
            return PlainTextResponse(
                "plane must be axis,index: axis 0..2, index inside the volume", status_code=400
            )
        if plane is not None and "step" in request.query_params:
            return PlainTextResponse("plane and step do not go together", status_code=400)
        return who, f

    @staticmethod
    def _region(request: Request, shape: Any) -> tuple[slice, slice, slice]:
        """The part of the (slices, rows, columns) array a request asks for."""
        plane = _plane(request, shape)
        step = _step(request) or 1
        region = [slice(None, None, step)] * 3
        if isinstance(plane, tuple):
            region[plane[0]] = slice(plane[1], plane[1] + 1)
        return region[0], region[1], region[2]

    def _nifti(
        self,
        request: Request,
        array: np.ndarray[Any, Any],
        affine: list[float],
        tag: str,
        region: tuple[slice, slice, slice],
    ) -> Response:
        from starlette.responses import Response, StreamingResponse

        gz = request.query_params.get("gz", "0") == "1"
        step = _step(request) or 1
        starts = ",".join(str(r.start or 0) for r in region)
        cut = ",".join(f"{r.start}:{r.stop}:{r.step}" for r in region)
        etag = hashlib.sha256(f"{tag}|{int(gz)}|{cut}".encode()).hexdigest()[:32]
        headers = {
            "Cache-Control": "private, no-cache",
            "ETag": f'"{etag}"',
            "X-Region-Start": starts,  # (k, j, i) of its first voxel in the whole volume
        }
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        # the region asked for (``array`` is already cut to it): the affine moved to its
        # first voxel and its voxel axes scaled by the step, so that its voxel (i, j, k)
        # sits where the whole volume's voxel does
        start = [float(region[a].start or 0) for a in (2, 1, 0)]  # (i, j, k)
        if step > 1 or any(start):
            move = np.diag([float(step), float(step), float(step), 1.0])
            move[:3, 3] = start
            moved = np.asarray(affine, dtype=np.float64).reshape(4, 4) @ move
            affine = [float(v) for v in moved.reshape(-1)]
        if array.dtype.name not in _NII_TYPES:
            array = array.astype(np.float32 if array.dtype.kind == "f" else np.int32)
        head = nifti_header(array.shape, array.dtype, affine)
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        name = "volume.nii.gz" if gz else "volume.nii"
        headers["Content-Disposition"] = f'inline; filename="{name}"'
        if gz:
            body = gzip.compress(head + data.tobytes(), compresslevel=1, mtime=0)
            return Response(body, media_type="application/gzip", headers=headers)
        # raw: the header, then the array's own bytes (a memory-mapped tensor's pages, not
        # copied into one more 157 MB string for a 512x512x300 CT)
        view = data.reshape(-1).view(np.uint8).data
        headers["Content-Length"] = str(len(head) + view.nbytes)

        def chunks() -> Any:
            yield head
            for at in range(0, view.nbytes, _CHUNK):
                yield view[at : at + _CHUNK]

        return StreamingResponse(chunks(), media_type="application/octet-stream", headers=headers)

    def volume(self, request: Request) -> Response:
        """A finding's de-identified volume as NIfTI (audited)."""
        from starlette.responses import PlainTextResponse

        got = self._finding(request)
        if not isinstance(got, tuple):
            return got
        who, f = got
        t = self.tensor(str(f["tensor_key"]))
        vol = self.app.volumes.get(str(f["tensor_path"]))
        if t is None or vol.ndim != 3:
            return PlainTextResponse("this volume cannot be shown in 3-D", status_code=404)
        if "crop" in request.query_params:
            return PlainTextResponse("crop is for masks", status_code=400)
        self.app.record("review_volume_viewed", request, who[0], finding_key=f["finding_key"])
        region = self._region(request, vol.shape)
        return self._nifti(request, vol[region], t["affine"], f"volume|{t['checksum']}", region)

    def mask(self, request: Request) -> Response:
        """A finding's mask (1 on the finding), or one of its corrections, as NIfTI (audited)."""
        from starlette.responses import PlainTextResponse

        got = self._finding(request)
        if not isinstance(got, tuple):
            return got
        who, f = got
        t = self.tensor(str(f["tensor_key"]))
        if t is None:
            return PlainTextResponse("this volume cannot be shown in 3-D", status_code=404)
        shape = tuple(int(v) for v in f["shape"])
        region = self._region(request, shape)
        correction = request.query_params.get("correction")
        if correction is not None:
            if not CORRECTION_ID.match(correction):
                return PlainTextResponse("correction must be 32 hex digits", status_code=400)
            rows = [
                c
                for c in load_corrections(self.app.lake)
                if c["correction_id"] == correction and c["finding_key"] == f["finding_key"]
            ]
            if not rows:
                return PlainTextResponse("no such correction of this finding", status_code=404)
            path = correction_path(self.app.lake, str(f["tensor_key"]), correction)
            full = np.load(path, mmap_mode="r", allow_pickle=False)
            tag = f"correction|{rows[0]['mask_checksum']}"
            value = None
        elif f.get("mask_path"):
            full = self.app.volumes.get(str(f["mask_path"]))
            tag = f"mask|{f.get('mask_checksum')}|{f.get('label_value')}"
            value = int(f.get("label_value") or 1)
        elif f.get("bbox"):
            # a box: never built at the volume's size, only over the region asked for
            b = [int(v) for v in f["bbox"]]
            box = (slice(b[0], b[3] + 1), slice(b[1], b[4] + 1), slice(b[2], b[5] + 1))
            full = None
            tag = f"box|{f['finding_key']}|{f['bbox']}"
            value = None
        else:
            return PlainTextResponse("this finding has no mask", status_code=404)
        if full is not None and tuple(full.shape) != shape:
            return PlainTextResponse("the mask is not the volume's shape", status_code=404)
        crop = request.query_params.get("crop", "0")
        if crop not in ("0", "1"):
            return PlainTextResponse("crop must be 0 or 1", status_code=400)
        if crop == "1":
            if "plane" in request.query_params or "step" in request.query_params:
                return PlainTextResponse("crop goes with neither plane nor step", status_code=400)
            region = box if full is None else self._extent(tag, full, value)
        if full is None:
            mask = _box_part(shape, box, region)
        else:  # only the region asked for is read (a plane of a memory-mapped label map)
            part = np.asarray(full[region])
            mask = (part == value).astype(np.uint8) if value is not None else part
        self.app.record(
            "review_mask_viewed",
            request,
            who[0],
            finding_key=f["finding_key"],
            correction_id=correction,
        )
        return self._nifti(request, mask, t["affine"], tag, region)

    def _extent(
        self, tag: str, full: np.ndarray[Any, Any], value: int | None
    ) -> tuple[slice, slice, slice]:
        """The smallest box holding every voxel of a mask (``== value``, else non-zero), as
        the region to serve for ``crop=1``; one voxel at the origin for an empty mask. Kept
        per mask (its tag names its checksum)."""
        with self._lock:
            got = self._extents.get(tag)
        if got is not None:
            return got
        on = np.asarray(full == value) if value is not None else np.asarray(full) != 0
        bounds = [slice(0, 1)] * 3  # an empty mask: one voxel at the origin
        if on.any():
            for axis in range(3):
                hit = np.flatnonzero(on.any(axis=tuple(a for a in range(3) if a != axis)))
                bounds[axis] = slice(int(hit[0]), int(hit[-1]) + 1)
        region = (bounds[0], bounds[1], bounds[2])
        with self._lock:
            self._extents[tag] = region
        return region

    # ---------------------------------------------------------------- corrections

    async def correction(self, request: Request) -> Response:
        """Store a reviewer's corrected mask (see the module docstring)."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse, PlainTextResponse

        from pipeline.review.corrections import record_correction

        app = self.app
        who = await app.aguard(request, "correct")
        if not isinstance(who, tuple):
            return who
        s = app.live(request)[0]
        sent = request.headers.get("x-csrf-token", "")
        if s is None or not sent or not secrets.compare_digest(sent.encode(), s.csrf.encode()):
            return await app.csrf_refused(request, who[0])
        key = request.query_params.get("key", "")
        f = app.catalog.finding(key)
        if f is None or not f.get("tensor_path") or not f.get("shape"):
            return PlainTextResponse("no such finding or volume", status_code=404)
        body = await request.body()
        if len(body) > MAX_CORRECTION_BYTES:
            return PlainTextResponse(f"body over {MAX_CORRECTION_BYTES} bytes", 413)
        try:
            mask = await run_in_threadpool(parse_mask, body, f["shape"])
        except NiftiError as exc:
            await app.arecord(
                "review_correction_refused",
                request,
                who[0],
                finding_key=key,
                reason=str(exc)[:200],
            )
            return PlainTextResponse(f"correction refused: {exc}", status_code=400)
        row = await run_in_threadpool(record_correction, app.lake, f, mask, reviewer=who[0])
        await app.arecord(
            "review_correction_saved",
            request,
            who[0],
            finding_key=key,
            correction_id=row["correction_id"],
            voxel_count=row["voxel_count"],
            model_version=f["model_version"],
        )
        out = {k: row[k] for k in ("correction_id", "mask_path", "mask_checksum", "voxel_count")}
        return JSONResponse(json.loads(json.dumps(out)), status_code=201)
