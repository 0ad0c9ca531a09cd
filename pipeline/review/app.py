"""The review web app (Starlette): login, worklist, finding view, decisions, metrics, export.

Research zone only: pages show pseudonyms and shifted dates. The one way to identified data is
the optional viewer link, built at request time from the restricted vault for the roles the
config allows, and answered as a redirect (the original UID never enters a page).

Security:

- users and argon2 password hashes come from the config; password checks run in their own
  worker threads, at most ``review.hash_concurrency`` at once and ``review.hash_queue``
  waiting (more are refused 503 at once), so logins bound memory and never slow pages;
- failed logins are counted per user name and per client address; too many lock the name or
  address for ``review.lockout_minutes`` (429 with Retry-After, whatever the password);
- sessions are held server-side (:class:`pipeline.review.auth.SessionStore`); the signed
  cookie (``SameSite=Strict``, ``HttpOnly``, ``Secure`` under TLS) holds only a random
  session id (and, before login, the login form's CSRF token). A session ends at logout,
  after ``review.idle_minutes`` without a request and ``review.session_minutes`` after login;
- every POST carries the session's CSRF token or is refused (403);
- every response carries a strict Content-Security-Policy (no inline script or style) and
  the other security headers, ``Cache-Control: no-store`` unless static, HSTS under TLS
  (:class:`pipeline.review.middleware.SecurityHeaders`);
- query parameters are validated: bad values fall back to defaults on pages and are refused
  (400) where an image or file is asked for; never a server error;
- comments and corrected labels are checked against the finding's patient's identifiers
  before they are stored (:mod:`pipeline.review.phi`); CSV exports are escaped against
  formula injection.

Audit: every login (and failed, locked-out or refused one), logout, denial (401 redirect,
403, CSRF failure), view of a finding and of a slice image, decision, refused comment, export
and viewer link is appended to the audit log with the reviewer (when known) and the client
address, never an identifier.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlencode

from pipeline.errors import LakeError
from pipeline.review import reading
from pipeline.review.auth import Busy, HashGate, LoginThrottle, Session, SessionStore
from pipeline.review.corrections import latest_corrections, load_corrections
from pipeline.review.format import label_name, measurement_rows, quantity
from pipeline.review.measurements import Outputs, metrics_extras, series_panel
from pipeline.review.middleware import SecurityHeaders
from pipeline.review.phi import check_free_text, patient_identifiers
from pipeline.review.queue import QueueStore, visible_reviews
from pipeline.review.render import WINDOWS, VolumeCache, default_slice, metrics_plots, slice_png
from pipeline.review.store import (
    DECISIONS,
    SAMPLING_MODES,
    Catalog,
    csv_safe,
    history,
    label_set,
    latest_decisions,
    metrics_by_version,
    record_decision,
)
from pipeline.review.studies import Descriptions, explain_sampling, group_by_study
from pipeline.review.thumbs import thumbnail_png
from pipeline.review.viewer import MAX_CORRECTION_BYTES, Viewer
from pipeline.review.worklist import SORTS, STATUSES, Query, run_query

if TYPE_CHECKING:
    import jinja2
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from pipeline.config import PipelineConfig
    from pipeline.lake.crypto import VaultCipher
    from pipeline.lake.paths import LakePaths

__all__ = [
    "PERMISSIONS",
    "AuditSink",
    "create_app",
    "hash_password",
    "server_config",
    "templates",
]

#: What each role may do. Viewing identified studies also needs ``review.viewer_roles``.
#: ``correct`` (drawing a corrected mask, issue #23) is the reviewers' (and admins') work.
PERMISSIONS: dict[str, frozenset[str]] = {
    "reviewer": frozenset({"view", "decide", "correct"}),
    "lead": frozenset({"view", "decide", "export", "assign"}),
    "admin": frozenset({"view", "decide", "export", "assign", "correct"}),
}
_TEMPLATES = Path(__file__).parent / "templates"
#: files under templates/ served at /static/<name>
_STATIC = {
    "style.css": "text/css",
    "finding.js": "text/javascript",
    "keys.js": "text/javascript",
    "viewer.js": "text/javascript",  # issue #23: the viewer (pipeline.review.viewer)
    "slices.js": "text/javascript",  # its slice renderer (2-D canvas, no WebGL)
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# a hash verified when the user name is unknown, so both paths take as long
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHRzb21lc2FsdA$"
    "7LN2D5FJkMR3f7xMhWsmb3iIYbBKmKZRxmtB4dh5hAk"
)
_MAX_PASSWORD = 1024
_MAX_COMMENT = 2000
_MAX_LABEL = 200
_COOKIE = "pacsflow_review"


class AuditSink(Protocol):
    """What the app appends audit records to (:class:`pipeline.lake.AuditLog`)."""

    def append(self, event: str, **details: Any) -> Any:
        """Append one record of ``event`` with scalar ``details``."""


def _now() -> float:
    """Seconds since the epoch (one place, so tests can move the clock)."""
    return time.time()


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` for ``review.users.<name>.password_hash``."""
    from argon2 import PasswordHasher

    return PasswordHasher().hash(password)


def _verify(stored: str, password: str) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return PasswordHasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def templates() -> jinja2.Environment:
    """The Jinja2 environment of the app's and the report's templates (autoescaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = _fmt
    env.filters["short"] = lambda s, n=12: (s[:n] + "…") if s and len(s) > n + 1 else (s or "")
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.1f}%"
    env.filters["quantity"] = quantity
    env.filters["measure_name"] = label_name
    env.filters["datauri"] = data_uri
    return env


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


#: measurements a finding page shows in its own rows (not again among the others)
_OWN_ROWS = ("voxel_count", "volume_ml", "mean_hu", "mean_value")


def measurements(finding: dict[str, Any]) -> list[tuple[str, str]]:
    """A finding's other measurements as readable (name, "value unit") pairs
    (:func:`pipeline.review.format.measurement_rows`)."""
    return measurement_rows(finding.get("measurements"), skip=_OWN_ROWS)


def _safe_next(value: object, default: str = "/") -> str:
    """A redirect target within the app: a path, never another site (``//host``, ``/\\host``)
    nor one with control characters."""
    nxt = str(value or "")
    if (
        not nxt.startswith("/")
        or nxt.startswith("//")
        or "\\" in nxt
        or _CONTROL.search(nxt)
        or len(nxt) > 2000
    ):
        return default
    return nxt


def _saved_as(value: str | None) -> str | None:
    """The decision a "save and next" redirect says was saved, else None."""
    return value if value in DECISIONS else None


def _int_param(value: str | None) -> int | None:
    """A whole number of at most 9 digits (sign allowed), else None."""
    if value is None or not re.fullmatch(r"-?[0-9]{1,9}", value.strip()):
        return None
    return int(value)


def _float_param(value: str | None) -> float | None:
    """A finite number, else None."""
    try:
        x = float(value) if value is not None and len(value) <= 64 else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


class _App:
    """The app's state and handlers."""

    def __init__(
        self, cfg: PipelineConfig, lake: LakePaths, audit: AuditSink, cipher: VaultCipher | None
    ) -> None:
        self.cfg = cfg
        self.cipher = cipher
        self.rc = cfg.review
        self.lake = lake
        self.catalog = Catalog(lake)
        self.volumes = VolumeCache(lake)
        self.audit = audit
        self.env = templates()
        self.sessions = SessionStore(
            idle_s=60.0 * self.rc.idle_minutes, absolute_s=60.0 * self.rc.session_minutes
        )
        self.throttle = LoginThrottle(
            user_failures=self.rc.login_failures,
            address_failures=self.rc.address_failures,
            window_s=60.0 * self.rc.login_window_minutes,
            lockout_s=60.0 * self.rc.lockout_minutes,
        )
        self.hashing = HashGate(self.rc.hash_concurrency, self.rc.hash_queue)
        self.queues = QueueStore(lake)
        # issue #23 §2/§3: which rows are findings; descriptions of series and studies
        self.outputs = Outputs(cfg.infer.registry)
        self.descriptions = Descriptions(lake)
        self.nv = Viewer(self)  # issue #23: in-page viewer and corrections

    def findings(self) -> list[dict[str, Any]]:
        """The catalogue's findings: lesion-like rows only, not per-series measurements."""
        return self.outputs.split(self.catalog.findings())[0]

    # ---------------------------------------------------------------- blinding (reading.py)

    def visible(self, user: str) -> list[dict[str, Any]]:
        """The decisions ``user`` may see (two-reader queues blind each reader to the other
        until both decided): every page, status, metric and export uses these."""
        return visible_reviews(self.catalog.reviews(), user, self.queues.all())

    def latest_for(self, user: str) -> dict[str, dict[str, Any]]:
        """Each finding's latest decision among those ``user`` may see."""
        return latest_decisions(self.visible(user))

    # ---------------------------------------------------------------- audit

    @staticmethod
    def address(request: Request) -> str:
        """The client's address as the server saw it (proxy headers are not trusted)."""
        return request.client.host if request.client else "unknown"

    def record(
        self, event: str, request: Request, reviewer: str | None = None, **details: Any
    ) -> None:
        """Append an audit record of ``event`` with the reviewer (when known) and address."""
        if reviewer is not None:
            self.audit.append(
                event, user=reviewer, reviewer=reviewer, address=self.address(request), **details
            )
        else:
            self.audit.append(event, address=self.address(request), **details)

    async def arecord(
        self, event: str, request: Request, reviewer: str | None = None, **details: Any
    ) -> None:
        """:meth:`record` in a worker thread (for async handlers: the append fsyncs)."""
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(self.record, event, request, reviewer, **details)

    def denied(
        self,
        request: Request,
        reason: str,
        http_status: int,
        reviewer: str | None = None,
    ) -> None:
        """Audit one denial."""
        self.record(
            "review_denied",
            request,
            reviewer,
            reason=reason,
            status=http_status,
            method=request.method,
            path=request.url.path,
        )

    # ---------------------------------------------------------------- sessions and roles

    def live(self, request: Request) -> tuple[Session | None, str, str | None]:
        """The request's live session, else None, why (``no_session``, ``session_idle``,
        ``session_expired``, ``session_unknown``) and the user of an ended session. An ended
        or unknown session is cleared from the cookie."""
        sid = request.session.get("sid")
        if sid is None:
            return None, "no_session", None
        found = self.sessions.get(sid, _now())
        s = found.session
        if s is not None and s.user in self.rc.users:
            return s, "", s.user
        if s is not None:  # the account was removed from the config
            self.sessions.delete(sid)
        request.session.clear()
        return None, f"session_{found.reason or 'unknown'}", found.user

    def user(self, request: Request) -> tuple[str, str] | None:
        """``(name, role)`` of a live session, or None."""
        s = self.live(request)[0]
        return (s.user, self.rc.users[s.user].role) if s is not None else None

    def csrf(self, request: Request) -> str:
        """The CSRF token forms carry: the session's, or before login the cookie's."""
        s = self.live(request)[0]
        if s is not None:
            return s.csrf
        token = request.session.get("csrf")
        if not isinstance(token, str) or not token:
            token = secrets.token_urlsafe(32)
            request.session["csrf"] = token
        return token

    def csrf_ok(self, request: Request, form: Any) -> bool:
        """Whether the form's token is the session's (or, before login, the cookie's)."""
        sent = form.get("csrf")
        s = self.live(request)[0]
        have = s.csrf if s is not None else request.session.get("csrf")
        return (
            isinstance(sent, str)
            and isinstance(have, str)
            and bool(have)
            and secrets.compare_digest(sent.encode(), have.encode())
        )

    def can_view_identified(self, role: str) -> bool:
        return bool(self.rc.viewer_url) and role in self.rc.viewer_roles

    def page(self, request: Request, name: str, http_status: int = 200, **ctx: Any) -> Response:
        from starlette.responses import HTMLResponse

        who = self.user(request)
        html = self.env.get_template(name).render(
            user=who[0] if who else None,
            role=who[1] if who else None,
            perms=PERMISSIONS.get(who[1], frozenset()) if who else frozenset(),
            csrf=self.csrf(request),
            standalone=False,
            **ctx,
        )
        return HTMLResponse(html, status_code=http_status)

    def guard(self, request: Request, perm: str) -> tuple[str, str] | Response:
        """``(name, role)`` of a live session allowed ``perm``; else the denial's response
        (a redirect to the login page, or 403), audited."""
        from starlette.responses import PlainTextResponse, RedirectResponse

        s, why, ended_user = self.live(request)
        if s is None:
            self.denied(request, why, 303, ended_user)
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(_safe_next(nxt))}", status_code=303)
        role = self.rc.users[s.user].role
        if perm not in PERMISSIONS.get(role, frozenset()):
            self.denied(request, "role", 403, s.user)
            return PlainTextResponse(f"your role ({role}) may not do this", status_code=403)
        return s.user, role

    async def aguard(self, request: Request, perm: str) -> tuple[str, str] | Response:
        """:meth:`guard` in a worker thread (for async handlers)."""
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self.guard, request, perm)

    async def csrf_refused(self, request: Request, reviewer: str | None) -> Response:
        """The audited 403 of a POST without the right CSRF token."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import PlainTextResponse

        await run_in_threadpool(self.denied, request, "csrf", 403, reviewer)
        return PlainTextResponse("CSRF token missing or wrong", status_code=403)

    # ---------------------------------------------------------------- static files

    def static(self, request: Request) -> Response:
        """The app's stylesheet and script (no inline code, for the CSP)."""
        from starlette.responses import PlainTextResponse, Response

        name = str(request.path_params.get("name", ""))
        if name not in _STATIC:
            return PlainTextResponse("not found", status_code=404)
        return Response(
            (_TEMPLATES / name).read_bytes(),
            media_type=_STATIC[name],
            headers={"Cache-Control": "no-cache"},
        )

    # ---------------------------------------------------------------- login

    def _login_page(
        self, request: Request, nxt: str, error: str | None, http_status: int = 200, **hdr: str
    ) -> Response:
        response = self.page(
            request, "login.html", http_status=http_status, next=_safe_next(nxt), error=error
        )
        response.headers.update(hdr)
        return response

    async def _locked(self, request: Request, nxt: str, name: str, who: str) -> Response | None:
        """The audited 429 of a locked user name or address, or None when neither is."""
        left = self.throttle.locked(name, self.address(request), _now())
        if left <= 0:
            return None
        seconds = math.ceil(left)
        await self.arecord("review_login_locked", request, who, retry_after_s=seconds)
        return self._login_page(
            request,
            nxt,
            f"Too many failed logins: try again in {math.ceil(seconds / 60)} minute(s).",
            http_status=429,
            **{"Retry-After": str(seconds)},
        )

    async def login(self, request: Request) -> Response:
        """The login form, and its POST: CSRF, lockout, bounded password check, session.

        A locked user name or address is answered 429 before the password is checked, and
        again after it when the lock began meanwhile, so a locked-out guesser learns nothing
        from the answer, right password or wrong.
        """
        from starlette.responses import RedirectResponse

        nxt = _safe_next(request.query_params.get("next", "/"))
        if request.method == "GET":
            return self._login_page(request, nxt, None)
        form = await request.form()
        if not self.csrf_ok(request, form):
            return await self.csrf_refused(request, None)
        name = str(form.get("username", ""))[:256]
        password = str(form.get("password", ""))
        nxt = _safe_next(form.get("next", "/"))
        account = self.rc.users.get(name)
        who = name if account else "unknown"  # an unknown name may be a mistyped password
        if (locked := await self._locked(request, nxt, name, who)) is not None:
            return locked
        ok = False
        if len(password) <= _MAX_PASSWORD:
            try:
                ok = await self.hashing.run(
                    _verify, account.password_hash if account else _DUMMY_HASH, password
                )
            except Busy:
                await self.arecord("review_login_busy", request, who)
                return self._login_page(
                    request,
                    nxt,
                    "The server is busy with other logins: try again in a moment.",
                    http_status=503,
                    **{"Retry-After": "2"},
                )
        if (locked := await self._locked(request, nxt, name, who)) is not None:
            return locked
        if not (ok and account):
            lock_s = self.throttle.failed(name, self.address(request), _now())
            await self.arecord(
                "review_login_failed", request, who, lockout_s=math.ceil(lock_s) or None
            )
            return self._login_page(request, nxt, "Wrong user name or password.", 401)
        self.throttle.succeeded(name)
        request.session.clear()
        session = self.sessions.create(name, _now())
        request.session["sid"] = session.sid
        await self.arecord("review_login", request, name, role=account.role)
        return RedirectResponse(nxt, status_code=303)

    async def logout(self, request: Request) -> Response:
        from starlette.responses import RedirectResponse

        s = self.live(request)[0]
        if s is not None:
            form = await request.form()
            if not self.csrf_ok(request, form):
                return await self.csrf_refused(request, s.user)
            self.sessions.delete(s.sid)
            await self.arecord("review_logout", request, s.user)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ---------------------------------------------------------------- worklist

    def worklist(self, request: Request) -> Response:
        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        findings = self.findings()
        latest = self.latest_for(who[0])
        q = Query.parse(dict(request.query_params), per_page=self.rc.page_size)
        result = run_query(findings, latest, q)
        kept = run_query(
            findings, latest, dataclasses.replace(q, sample="all", page=1, per_page=10**9)
        ).rows

        def url(**changes: Any) -> str:
            return "/?" + urlencode(q.params(**changes))

        context = reading.worklist_context(q)

        def open_url(key: str) -> str:
            return "/finding?" + urlencode({"key": key, **context})

        return self.page(
            request,
            "worklist.html",
            q=q,
            result=result,
            url=url,
            total_findings=len(findings),
            groups=group_by_study(result.rows, findings, latest, self.descriptions.get()),
            sampling=explain_sampling(kept, q.sample, q.percent, q.seed, result.total),
            models=sorted({f"{f['model']}@{f['model_version']}" for f in findings}),
            labels=sorted({f["label"] for f in findings}),
            modalities=sorted({f["Modality"] for f in findings if f.get("Modality")}),
            manufacturers=sorted({f.get("Manufacturer") or "unknown" for f in findings}),
            statuses=STATUSES,
            modes=SAMPLING_MODES,
            sorts=[s for s in SORTS if s],
            open_url=open_url,
            spec=context["q"],
            saved_as=_saved_as(request.query_params.get("saved")),
        )

    # ---------------------------------------------------------------- finding view

    def finding(self, request: Request) -> Response:
        from starlette.responses import PlainTextResponse

        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        key = request.query_params.get("key", "")
        f = self.catalog.finding(key)
        if f is None:
            return PlainTextResponse("no such finding", status_code=404)
        self.record("review_finding_viewed", request, who[0], finding_key=key)
        return self.finding_page(request, who, key, f)

    def finding_page(
        self,
        request: Request,
        who: tuple[str, str],
        key: str,
        f: dict[str, Any],
        *,
        http_status: int = 200,
        error: str | None = None,
        comment: str = "",
        corrected_label: str = "",
        context: Mapping[str, str] | None = None,
    ) -> Response:
        """A finding's page; view parameters (slice, window, overlay, opacity) from the query
        string, each falling back to its default when missing or invalid."""
        params = request.query_params
        slices = max(int((f.get("shape") or [1])[0]), 1)
        k = _int_param(params.get("k"))
        k = default_slice(f) if k is None else k
        k = min(max(k, 0), slices - 1)
        window = params.get("w", "")
        is_ct = f.get("Modality") == "CT" and bool(f.get("rescaled", True))
        if window not in WINDOWS or (not is_ct and window != "auto"):
            window = "soft-tissue" if is_ct else "auto"
        overlay = params.get("overlay", "1") != "0"
        opacity = _float_param(params.get("opacity"))
        opacity = 0.45 if opacity is None else min(max(opacity, 0.0), 1.0)
        past = history(self.visible(who[0]), key)
        nav = reading.nav(self, who[0], key, params if context is None else context)

        def img(kk: int) -> str:
            return "/slice.png?" + urlencode(
                {"key": key, "k": kk, "w": window, "overlay": int(overlay), "opacity": opacity}
            )

        def link(**changes: Any) -> str:
            values: dict[str, Any] = {
                "key": key,
                "k": k,
                "w": window,
                "overlay": int(overlay),
                "opacity": opacity,
                **(nav.context if nav else {}),  # stay in the list it was opened from
            }
            values.update(changes)
            return "/finding?" + urlencode(values)

        return self.page(
            request,
            "finding.html",
            http_status=http_status,
            f=f,
            key=key,
            k=k,
            slices=slices,
            window=window,
            windows=[w for w in WINDOWS if is_ct or w == "auto"],
            overlay=overlay,
            opacity=opacity,
            img=img,
            link=link,
            measurements=measurements(f),
            series_measurements=series_panel(
                self.outputs.split(self.catalog.findings())[1], str(f["SeriesInstanceUID"])
            ),
            kind=self.outputs.kind(f),
            past=past,
            status=past[-1]["decision"] if past else "unreviewed",
            decisions=DECISIONS,
            viewer=self.can_view_identified(who[1]),
            saved=params.get("saved") == "1",
            saved_as=_saved_as(params.get("saved")),
            nav=nav,
            error=error,
            comment=comment,
            corrected_label=corrected_label,
            nv=self.nv.context(f, who[1]),
        )

    def slice_image(self, request: Request) -> Response:
        """One slice as PNG. Parameters are checked strictly (400 with the reason)."""
        from starlette.responses import PlainTextResponse, Response

        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        params = request.query_params
        key = params.get("key", "")
        f = self.catalog.finding(key)
        if f is None or not f.get("tensor_path"):
            return PlainTextResponse("no such finding or volume", status_code=404)
        slices = int((f.get("shape") or [1])[0])
        k = _int_param(params.get("k")) if "k" in params else default_slice(f)
        if k is None or not 0 <= k < slices:
            return PlainTextResponse(
                f"k must be a whole number within 0..{slices - 1}", status_code=400
            )
        window = params.get("w", "auto")
        if window not in WINDOWS:
            return PlainTextResponse(f"w must be one of {', '.join(WINDOWS)}", status_code=400)
        opacity = _float_param(params.get("opacity", "0.45"))
        if opacity is None or not 0.0 <= opacity <= 1.0:
            return PlainTextResponse("opacity must be a number within 0..1", status_code=400)
        overlay = params.get("overlay", "1")
        if overlay not in ("0", "1"):
            return PlainTextResponse("overlay must be 0 or 1", status_code=400)
        png = render_finding_png(
            self.volumes, f, k=k, window=window, overlay=overlay == "1", opacity=opacity
        )
        self.record("review_slice_viewed", request, who[0], finding_key=key, k=k, window=window)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def decide(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import PlainTextResponse, RedirectResponse

        who = await self.aguard(request, "decide")
        if not isinstance(who, tuple):
            return who
        form = await request.form()
        if not self.csrf_ok(request, form):
            return await self.csrf_refused(request, who[0])
        key = str(form.get("key", ""))
        decision = str(form.get("decision", ""))
        f = self.catalog.finding(key)
        if f is None:
            return PlainTextResponse("no such finding", status_code=404)
        if decision not in DECISIONS:
            return PlainTextResponse("decision must be accept, reject or uncertain", 400)
        corrected_label = str(form.get("corrected_label", "")).strip()
        comment = str(form.get("comment", "")).strip()
        problem = await run_in_threadpool(self.free_text_problem, f, corrected_label, comment)
        if problem is not None:
            field, reason = problem
            await self.arecord(
                "review_comment_refused",
                request,
                who[0],
                finding_key=key,
                field=field,
                reason=reason.split(":")[0],
            )
            return await run_in_threadpool(
                lambda: self.finding_page(
                    request,
                    who,
                    key,
                    f,
                    http_status=400,
                    error=f"Not saved: the {field.replace('_', ' ')} {reason}.",
                    comment=comment,
                    corrected_label=corrected_label,
                    context={k: str(form[k]) for k in ("q", "queue") if k in form},
                )
            )
        row = await run_in_threadpool(
            record_decision,
            self.lake,
            f,
            reviewer=who[0],
            decision=decision,
            corrected_label=corrected_label,
            comment=comment,
        )
        await self.arecord(
            "review_decision",
            request,
            who[0],
            finding_key=key,
            decision=decision,
            review_id=row["review_id"],
            model_version=f["model_version"],
        )
        nxt = _safe_next(form.get("next", ""), "")
        if nxt:  # "save and next": the next finding (or the list) says what was saved
            nxt += ("&" if "?" in nxt else "?") + urlencode({"saved": decision})
        else:
            nxt = "/finding?" + urlencode({"key": key, "saved": 1})
        return RedirectResponse(nxt, status_code=303)

    def free_text_problem(
        self, f: dict[str, Any], corrected_label: str, comment: str
    ) -> tuple[str, str] | None:
        """``(field, reason)`` when the corrected label or comment may not be stored: too
        long, control characters, or identifiers of the finding's patient; else None."""
        texts = {"corrected_label": corrected_label, "comment": comment}
        limits = {"corrected_label": _MAX_LABEL, "comment": _MAX_COMMENT}
        for field, text in texts.items():
            if len(text) > limits[field]:
                return field, f"is longer than {limits[field]} characters"
            if _CONTROL.search(text):
                return field, "holds control characters"
        if not any(texts.values()):
            return None
        try:
            identifiers = patient_identifiers(self.lake, str(f["SeriesInstanceUID"]), self.cipher)
        except LakeError:
            field = "comment" if comment else "corrected_label"
            return field, (
                "cannot be checked for patient identifiers: the vault is encrypted and this "
                "app holds no key; leave it empty"
            )
        for field, text in texts.items():
            ok, reason = check_free_text(text, identifiers)
            if not ok:
                return field, (
                    f"{reason}: research data must not identify a patient; describe the finding "
                    "without names, IDs or dates of birth"
                )
        return None

    # ---------------------------------------------------------------- thumbnails (issue #23 §3)

    def thumbnail(self, request: Request) -> Response:
        """A small crop around a finding on its middle slice (the worklist's thumbnails)."""
        from starlette.responses import PlainTextResponse, Response

        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        key = request.query_params.get("key", "")
        f = self.catalog.finding(key)
        if f is None or not f.get("tensor_path"):
            return PlainTextResponse("no such finding or volume", status_code=404)
        png = thumbnail_png(self.volumes, f)
        self.record("review_thumbnail_viewed", request, who[0], finding_key=key)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    # ---------------------------------------------------------------- metrics and export

    def metrics(self, request: Request) -> Response:
        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        findings = self.findings()
        latest = self.latest_for(who[0])
        versions = metrics_by_version(findings, latest)
        plots = {
            (m.model, m.model_version): {n: data_uri(p) for n, p in metrics_plots(m).items()}
            for m in versions
        }
        extras = metrics_extras(findings, latest, self.visible(who[0]))
        return self.page(
            request,
            "metrics.html",
            versions=versions,
            plots=plots,
            agreements=reading.agreements(self, who[0]),
            extras=extras,
        )

    def export(self, request: Request) -> Response:
        from starlette.responses import PlainTextResponse, Response

        who = self.guard(request, "export")
        if not isinstance(who, tuple):
            return who
        fmt = request.query_params.get("format", "csv")
        if fmt not in ("csv", "parquet"):
            return PlainTextResponse("format must be csv or parquet", status_code=400)
        corrections = latest_corrections(load_corrections(self.lake))
        table = label_set(self.catalog.findings(), self.latest_for(who[0]), corrections)
        buf = io.BytesIO()
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, buf)
            media = "application/vnd.apache.parquet"
        else:
            import pyarrow.csv as pcsv

            pcsv.write_csv(csv_safe(table), buf, pcsv.WriteOptions(quoting_style="all_valid"))
            media = "text/csv"
        self.record("review_export", request, who[0], rows=table.num_rows, format=fmt)
        return Response(
            buf.getvalue(),
            media_type=media,
            headers={
                "Content-Disposition": f'attachment; filename="label_set.{fmt}"',
                "Cache-Control": "no-store",
            },
        )

    def viewer(self, request: Request) -> Response:
        from starlette.responses import PlainTextResponse, RedirectResponse

        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        if not self.can_view_identified(who[1]) or not self.rc.viewer_url:
            self.denied(request, "viewer_role", 403, who[0])
            return PlainTextResponse("your role may not open identified studies", 403)
        key = request.query_params.get("key", "")
        f = self.catalog.finding(key)
        if f is None:
            return PlainTextResponse("no such finding", status_code=404)
        study = original_study_uid(self.lake, f["SeriesInstanceUID"], self.cipher)
        if study is None:
            return PlainTextResponse(
                "the original study is not readable here (unknown series, or an encrypted vault)",
                status_code=404,
            )
        self.record("review_viewer_opened", request, who[0], finding_key=key)
        url = self.rc.viewer_url.replace("{StudyInstanceUID}", quote(study, safe=".")).replace(
            "{SeriesInstanceUID}", ""
        )
        return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})


def original_study_uid(
    lake: LakePaths, series_pseudonym: str, cipher: VaultCipher | None = None
) -> str | None:
    """The original StudyInstanceUID of a pseudonymous series, read from the restricted vault
    now (never cached, never shown in a page), decrypted with ``cipher`` when encrypted. None
    when unknown, or encrypted and no cipher given."""
    import pyarrow.compute as pc

    from pipeline.lake.io import read_table

    table = read_table(
        lake,
        "vault",
        columns=["object_key", "StudyInstanceUID"],
        filter=pc.field("series_pseudonym") == series_pseudonym,
    )
    for row in table.to_pylist():
        uid = cipher.decrypt_row(row)["StudyInstanceUID"] if cipher else row["StudyInstanceUID"]
        if isinstance(uid, str) and _UID.match(uid):
            return uid
    return None


def render_finding_png(
    volumes: VolumeCache,
    f: dict[str, Any],
    *,
    k: int,
    window: str = "auto",
    overlay: bool = True,
    opacity: float = 0.45,
) -> bytes:
    """Slice ``k`` of a finding's volume as PNG, with its mask overlaid when asked."""
    path = str(f["tensor_path"])
    vol = volumes.get(path)
    preset = WINDOWS.get(window)
    win = preset if preset is not None else volumes.auto_window(path)
    mask = volumes.get(str(f["mask_path"])) if overlay and f.get("mask_path") else None
    label_value = f.get("label_value")
    if overlay and mask is None and f.get("box_mm") and f.get("bbox"):
        # a detected box (no mask): its voxels tinted, as a mask's would be
        import numpy as np

        k0, j0, i0, k1, j1, i1 = (int(v) for v in f["bbox"])
        mask = np.zeros(vol.shape[:3], dtype=np.uint8)
        mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = 1
        label_value = 1
    return slice_png(vol, k, win, mask=mask, label_value=label_value, opacity=opacity)


def create_app(
    cfg: PipelineConfig,
    lake: LakePaths,
    *,
    audit: AuditSink,
    secret: str | None = None,
    tls: bool = False,
    cipher: VaultCipher | None = None,
) -> Starlette:
    """The review app over ``lake``.

    Parameters
    ----------
    cfg:
        The configuration (``cfg.review`` holds users, timeouts and limits).
    lake:
        The lake whose findings are reviewed.
    audit:
        The audit log every login, denial, view, decision and export is appended to.
    secret:
        Signs the session cookie (random when None).
    tls:
        Whether the app is served over HTTPS: the cookie is then ``Secure`` (and named
        ``__Host-...``) and responses carry HSTS.
    cipher:
        Decrypts an encrypted vault (from the lake's key) for the identifier check of free
        text and the viewer link; None: both refuse on an encrypted vault.

    Returns
    -------
    Starlette
        The ASGI app (its state at ``app.state.review``).
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware
    from starlette.routing import Route

    state = _App(cfg, lake, audit, cipher)
    routes = [
        Route("/", state.worklist),
        Route("/login", state.login, methods=["GET", "POST"]),
        Route("/logout", state.logout, methods=["POST"]),
        Route("/finding", state.finding),
        Route("/slice.png", state.slice_image),
        Route("/decide", state.decide, methods=["POST"]),
        Route("/metrics", state.metrics),
        Route("/export", state.export),
        Route("/viewer", state.viewer),
        Route("/static/{name}", state.static),
        # issue #23 §4: queues, "my queue", two readers (pipeline.review.reading)
        *reading.routes(state),
        # issue #23 §3: the worklist's thumbnails
        Route("/thumb.png", state.thumbnail),
        *state.nv.routes(),  # issue #23: /static/niivue/*, /volume.nii, /mask.nii, /correction
    ]
    middleware = [
        Middleware(SecurityHeaders, tls=tls, limits={"/correction": MAX_CORRECTION_BYTES}),
        Middleware(
            SessionMiddleware,
            secret_key=secret or secrets.token_urlsafe(48),
            session_cookie=("__Host-" if tls else "") + _COOKIE,
            max_age=60 * cfg.review.session_minutes,
            same_site="strict",
            https_only=tls,
        ),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.review = state
    return app


def server_config(
    app: Starlette,
    *,
    host: str,
    port: int,
    certfile: Path | None = None,
    keyfile: Path | None = None,
) -> uvicorn.Config:
    """The uvicorn configuration the app is served with (by the CLI and the tests): HTTPS
    when ``certfile`` and ``keyfile`` are given; proxy headers not trusted (the client
    address that throttling counts is the peer's); no server banner; a stop waits at most 5 s
    for open connections."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
        log_level="warning",
        ws="none",
        lifespan="off",
    )
