"""The in-page viewer's routes: NiiVue as static files, a finding's volume and mask as NIfTI,
and reviewers' corrected masks.

- ``GET /static/niivue/<file>``: the vendored NiiVue ES module and its licence (public code;
  long-cached under a versioned name, gzipped when the browser accepts it);
- ``GET /volume.nii?key=<finding>`` and ``GET /mask.nii?key=<finding>[&correction=<id>]``:
  the de-identified volume and the finding's mask (1 on the finding; or a stored correction)
  as NIfTI-1 in RAS (:mod:`pipeline.review.nifti`), raw or with ``gz=1`` gzipped, whole or
  with ``step=n`` every n-th voxel along each axis (a preview the page shows first); login and
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
        ct = f.get("Modality") == "CT" and bool(f.get("rescaled", True))
        return {
            "module": f"/static/niivue/{NIIVUE}",
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
        return who, f

    def _nifti(
        self, request: Request, array: np.ndarray[Any, Any], affine: list[float], tag: str
    ) -> Response:
        from starlette.responses import Response

        gz = request.query_params.get("gz", "0") == "1"
        step = _step(request) or 1
        etag = '"' + hashlib.sha256(f"{tag}|{int(gz)}|{step}".encode()).hexdigest()[:32] + '"'
        headers = {"Cache-Control": "private, no-cache", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        if step > 1:  # a preview: every step-th voxel, the affine's voxel axes scaled
            array = array[::step, ::step, ::step]
            scaled = np.asarray(affine, dtype=np.float64).reshape(4, 4) @ np.diag(
                [step, step, step, 1.0]
            )
            affine = [float(v) for v in scaled.reshape(-1)]
        if array.dtype.name not in _NII_TYPES:
            array = array.astype(np.float32 if array.dtype.kind == "f" else np.int32)
        body = (
            nifti_header(array.shape, array.dtype, affine)
            + np.ascontiguousarray(array)
            .astype(array.dtype.newbyteorder("<"), copy=False)
            .tobytes()
        )
        if gz:
            body = gzip.compress(body, compresslevel=1, mtime=0)
        media = "application/gzip" if gz else "application/octet-stream"
        name = "volume.nii.gz" if gz else "volume.nii"
        headers["Content-Disposition"] = f'inline; filename="{name}"'
        return Response(body, media_type=media, headers=headers)

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
        self.app.record("review_volume_viewed", request, who[0], finding_key=f["finding_key"])
        return self._nifti(request, vol, t["affine"], f"volume|{t['checksum']}")

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
            mask = np.load(path, mmap_mode="r", allow_pickle=False)
            tag = f"correction|{rows[0]['mask_checksum']}"
        elif f.get("mask_path"):
            full = self.app.volumes.get(str(f["mask_path"]))
            mask = (np.asarray(full) == int(f.get("label_value") or 1)).astype(np.uint8)
            tag = f"mask|{f.get('mask_checksum')}|{f.get('label_value')}"
        elif f.get("bbox"):
            k0, j0, i0, k1, j1, i1 = (int(v) for v in f["bbox"])
            mask = np.zeros(shape, dtype=np.uint8)
            mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = 1
            tag = f"box|{f['finding_key']}|{f['bbox']}"
        else:
            return PlainTextResponse("this finding has no mask", status_code=404)
        if tuple(mask.shape) != shape:
            return PlainTextResponse("the mask is not the volume's shape", status_code=404)
        self.app.record(
            "review_mask_viewed",
            request,
            who[0],
            finding_key=f["finding_key"],
            correction_id=correction,
        )
        return self._nifti(request, mask, t["affine"], tag)

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
