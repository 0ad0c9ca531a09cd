"""The review web app (Starlette): login, worklist, finding view, decisions, metrics, export.

Research zone only: pages show pseudonyms and shifted dates. The one way to identified data is
the optional viewer link, built at request time from the restricted vault for the roles the
config allows, and answered as a redirect (the original UID never enters a page).

Security: users and argon2 password hashes come from the config; sessions are signed cookies
(``SameSite=Strict``) that also expire server-side after ``review.session_minutes``; every
POST carries the session's CSRF token or is refused (403). Every view of a finding, every
decision, export and viewer link is appended to the audit log (who, when, which pseudonymous
finding).
"""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from pipeline.lake.audit import AuditLog
from pipeline.review.render import WINDOWS, VolumeCache, default_slice, metrics_plots, slice_png
from pipeline.review.store import (
    DECISIONS,
    SAMPLING_MODES,
    Catalog,
    history,
    label_set,
    metrics_by_version,
    record_decision,
)
from pipeline.review.worklist import SORTS, STATUSES, Query, run_query

if TYPE_CHECKING:
    import jinja2
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from pipeline.config import PipelineConfig
    from pipeline.lake.paths import LakePaths

__all__ = ["PERMISSIONS", "create_app", "hash_password", "templates"]

#: What each role may do. Viewing identified studies also needs ``review.viewer_roles``.
PERMISSIONS: dict[str, frozenset[str]] = {
    "reviewer": frozenset({"view", "decide"}),
    "lead": frozenset({"view", "decide", "export"}),
    "admin": frozenset({"view", "decide", "export"}),
}
_TEMPLATES = Path(__file__).parent / "templates"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# a hash verified when the user name is unknown, so both paths take as long
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHRzb21lc2FsdA$"
    "7LN2D5FJkMR3f7xMhWsmb3iIYbBKmKZRxmtB4dh5hAk"
)


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


def measurements(finding: dict[str, Any]) -> list[tuple[str, str]]:
    """A finding's measurements as (name, "value unit") pairs."""
    out: list[tuple[str, str]] = []
    try:
        raw = json.loads(finding.get("measurements") or "{}")
    except ValueError:
        raw = {}
    for name, m in raw.items():
        if isinstance(m, dict):
            value = m.get("value")
            if value is None:
                out.append((name, "—"))
                continue
            text = f"{value:.2f}" if isinstance(value, float) else str(value)
            out.append((name, f"{text} {m.get('unit', '')}".strip()))
        elif isinstance(m, list):
            out.append(
                (name, " × ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in m))
            )
        else:
            out.append((name, str(m)))
    return out


class _App:
    """The app's state and handlers."""

    def __init__(self, cfg: PipelineConfig, lake: LakePaths) -> None:
        self.cfg = cfg
        self.rc = cfg.review
        self.lake = lake
        self.catalog = Catalog(lake)
        self.volumes = VolumeCache(lake)
        self.audit = AuditLog(lake)
        self.env = templates()

    # ---------------------------------------------------------------- sessions and roles

    def user(self, request: Request) -> tuple[str, str] | None:
        """``(name, role)`` of a live session, or None (expired sessions are cleared)."""
        s = request.session
        name = s.get("user")
        if not name:
            return None
        account = self.rc.users.get(name)
        if account is None or float(s.get("exp", 0)) < _now():
            s.clear()
            return None
        return name, account.role

    def csrf(self, request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = secrets.token_urlsafe(32)
            request.session["csrf"] = token
        return str(token)

    def csrf_ok(self, request: Request, form: Any) -> bool:
        sent = form.get("csrf")
        have = request.session.get("csrf")
        return (
            isinstance(sent, str)
            and isinstance(have, str)
            and bool(have)
            and secrets.compare_digest(sent, have)
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
        from starlette.responses import PlainTextResponse, RedirectResponse

        who = self.user(request)
        if who is None:
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(nxt)}", status_code=303)
        if perm not in PERMISSIONS.get(who[1], frozenset()):
            return PlainTextResponse(f"your role ({who[1]}) may not do this", status_code=403)
        return who

    # ---------------------------------------------------------------- login

    async def login(self, request: Request) -> Response:
        from starlette.responses import PlainTextResponse, RedirectResponse

        nxt = request.query_params.get("next", "/")
        if request.method == "GET":
            return self.page(request, "login.html", next=nxt, error=None)
        form = await request.form()
        if not self.csrf_ok(request, form):
            return PlainTextResponse("CSRF token missing or wrong", status_code=403)
        name = str(form.get("username", ""))
        password = str(form.get("password", ""))
        nxt = str(form.get("next", "/"))
        account = self.rc.users.get(name)
        from starlette.concurrency import run_in_threadpool

        ok = await run_in_threadpool(
            _verify, account.password_hash if account else _DUMMY_HASH, password
        )
        if not (ok and account):
            self.audit.append("review_login_failed", reviewer=name if account else "unknown")
            return self.page(
                request,
                "login.html",
                http_status=401,
                next=nxt,
                error="Wrong user name or password.",
            )
        request.session.clear()
        request.session.update(
            user=name,
            exp=_now() + 60 * self.rc.session_minutes,
            csrf=secrets.token_urlsafe(32),
        )
        self.audit.append("review_login", reviewer=name, role=account.role)
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"
        return RedirectResponse(nxt, status_code=303)

    async def logout(self, request: Request) -> Response:
        from starlette.responses import PlainTextResponse, RedirectResponse

        form = await request.form()
        if not self.csrf_ok(request, form):
            return PlainTextResponse("CSRF token missing or wrong", status_code=403)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # ---------------------------------------------------------------- worklist

    def worklist(self, request: Request) -> Response:
        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        findings = self.catalog.findings()
        latest = self.catalog.latest()
        q = Query.parse(dict(request.query_params), per_page=self.rc.page_size)
        result = run_query(findings, latest, q)

        def url(**changes: Any) -> str:
            return "/?" + urlencode(q.params(**changes))

        return self.page(
            request,
            "worklist.html",
            q=q,
            result=result,
            url=url,
            total_findings=len(findings),
            models=sorted({f"{f['model']}@{f['model_version']}" for f in findings}),
            labels=sorted({f["label"] for f in findings}),
            modalities=sorted({f["Modality"] for f in findings if f.get("Modality")}),
            manufacturers=sorted({f.get("Manufacturer") or "unknown" for f in findings}),
            statuses=STATUSES,
            modes=SAMPLING_MODES,
            sorts=[s for s in SORTS if s],
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
        shape = f.get("shape") or [1, 0, 0]
        try:
            k = int(request.query_params.get("k", ""))
        except ValueError:
            k = default_slice(f)
        k = min(max(k, 0), int(shape[0]) - 1)
        window = request.query_params.get("w", "")
        is_ct = f.get("Modality") == "CT" and bool(f.get("rescaled", True))
        if window not in WINDOWS or (not is_ct and window != "auto"):
            window = "soft-tissue" if is_ct else "auto"
        overlay = request.query_params.get("overlay", "1") != "0"
        try:
            opacity = min(max(float(request.query_params.get("opacity", "0.45")), 0.0), 1.0)
        except ValueError:
            opacity = 0.45
        self.audit.append("review_finding_viewed", reviewer=who[0], finding_key=key)
        reviews = self.catalog.reviews()
        past = history(reviews, key)

        def img(kk: int) -> str:
            return "/slice.png?" + urlencode(
                {"key": key, "k": kk, "w": window, "overlay": int(overlay), "opacity": opacity}
            )

        def link(**changes: Any) -> str:
            params: dict[str, Any] = {
                "key": key,
                "k": k,
                "w": window,
                "overlay": int(overlay),
                "opacity": opacity,
            }
            params.update(changes)
            return "/finding?" + urlencode(params)

        return self.page(
            request,
            "finding.html",
            f=f,
            key=key,
            k=k,
            slices=int(shape[0]),
            window=window,
            windows=[w for w in WINDOWS if is_ct or w == "auto"],
            overlay=overlay,
            opacity=opacity,
            img=img,
            link=link,
            measurements=measurements(f),
            past=past,
            status=past[-1]["decision"] if past else "unreviewed",
            decisions=DECISIONS,
            viewer=self.can_view_identified(who[1]),
            saved=request.query_params.get("saved") == "1",
        )

    def slice_image(self, request: Request) -> Response:
        from starlette.responses import PlainTextResponse, Response

        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        f = self.catalog.finding(request.query_params.get("key", ""))
        if f is None or not f.get("tensor_path"):
            return PlainTextResponse("no such finding or volume", status_code=404)
        try:
            k = int(request.query_params.get("k", default_slice(f)))
            opacity = float(request.query_params.get("opacity", "0.45"))
        except ValueError:
            return PlainTextResponse("bad k or opacity", status_code=400)
        png = render_finding_png(
            self.volumes,
            f,
            k=k,
            window=request.query_params.get("w", "auto"),
            overlay=request.query_params.get("overlay", "1") != "0",
            opacity=opacity,
        )
        return Response(png, media_type="image/png", headers={"Cache-Control": "private"})

    async def decide(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import PlainTextResponse, RedirectResponse

        who = self.guard(request, "decide")
        if not isinstance(who, tuple):
            return who
        form = await request.form()
        if not self.csrf_ok(request, form):
            return PlainTextResponse("CSRF token missing or wrong", status_code=403)
        key = str(form.get("key", ""))
        decision = str(form.get("decision", ""))
        f = self.catalog.finding(key)
        if f is None:
            return PlainTextResponse("no such finding", status_code=404)
        if decision not in DECISIONS:
            return PlainTextResponse("decision must be accept, reject or uncertain", 400)
        row = await run_in_threadpool(
            record_decision,
            self.lake,
            f,
            reviewer=who[0],
            decision=decision,
            corrected_label=str(form.get("corrected_label", "")),
            comment=str(form.get("comment", "")),
        )
        await run_in_threadpool(
            self.audit.append,
            "review_decision",
            reviewer=who[0],
            finding_key=key,
            decision=decision,
            review_id=row["review_id"],
            model_version=f["model_version"],
        )
        nxt = str(form.get("next", ""))
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/finding?" + urlencode({"key": key, "saved": 1})
        return RedirectResponse(nxt, status_code=303)

    # ---------------------------------------------------------------- metrics and export

    def metrics(self, request: Request) -> Response:
        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        findings = self.catalog.findings()
        versions = metrics_by_version(findings, self.catalog.latest())
        plots = {
            (m.model, m.model_version): {n: data_uri(p) for n, p in metrics_plots(m).items()}
            for m in versions
        }
        return self.page(request, "metrics.html", versions=versions, plots=plots)

    def export(self, request: Request) -> Response:
        from starlette.responses import Response

        who = self.guard(request, "export")
        if not isinstance(who, tuple):
            return who
        fmt = "parquet" if request.query_params.get("format") == "parquet" else "csv"
        table = label_set(self.catalog.findings(), self.catalog.latest())
        buf = io.BytesIO()
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, buf)
            media = "application/vnd.apache.parquet"
        else:
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, buf)
            media = "text/csv"
        self.audit.append("review_export", reviewer=who[0], rows=table.num_rows, format=fmt)
        return Response(
            buf.getvalue(),
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="label_set.{fmt}"'},
        )

    def viewer(self, request: Request) -> Response:
        from starlette.responses import PlainTextResponse, RedirectResponse

        who = self.guard(request, "view")
        if not isinstance(who, tuple):
            return who
        if not self.can_view_identified(who[1]) or not self.rc.viewer_url:
            return PlainTextResponse("your role may not open identified studies", 403)
        key = request.query_params.get("key", "")
        f = self.catalog.finding(key)
        if f is None:
            return PlainTextResponse("no such finding", status_code=404)
        study = original_study_uid(self.lake, f["SeriesInstanceUID"])
        if study is None:
            return PlainTextResponse(
                "the original study is not readable here (unknown series, or an encrypted vault)",
                status_code=404,
            )
        self.audit.append("review_viewer_opened", reviewer=who[0], finding_key=key)
        url = self.rc.viewer_url.replace("{StudyInstanceUID}", quote(study, safe=".")).replace(
            "{SeriesInstanceUID}", ""
        )
        return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})


def original_study_uid(lake: LakePaths, series_pseudonym: str) -> str | None:
    """The original StudyInstanceUID of a pseudonymous series, read from the restricted vault
    now (never cached, never shown in a page). None when unknown or encrypted."""
    import pyarrow.compute as pc

    from pipeline.lake.io import read_table

    table = read_table(
        lake,
        "vault",
        columns=["StudyInstanceUID"],
        filter=pc.field("series_pseudonym") == series_pseudonym,
    )
    for uid in table.column("StudyInstanceUID").to_pylist():
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
    return slice_png(vol, k, win, mask=mask, label_value=f.get("label_value"), opacity=opacity)


def create_app(cfg: PipelineConfig, lake: LakePaths, *, secret: str | None = None) -> Starlette:
    """The review app over ``lake``. ``secret`` signs session cookies (random when None:
    logins then end when the process does)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware
    from starlette.routing import Route

    state = _App(cfg, lake)
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
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            secret_key=secret or secrets.token_urlsafe(48),
            session_cookie="pacsflow_review",
            max_age=60 * cfg.review.session_minutes,
            same_site="strict",
            https_only=False,
        )
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.review = state
    return app
