"""The review app's reading flow: where a finding is in its queue (previous / next, "save and
next"), the queues page ("my queue" with progress; a lead assigns queues) and the readers'
agreement for the metrics page.

Handlers take the app's state (:class:`pipeline.review.app._App`) and use its guards, CSRF
check, audit and templates, so every rule of the app holds here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from pipeline.review.agreement import Agreement, agreement
from pipeline.review.queue import (
    MAX_QUEUE,
    Queue,
    assign_queue,
    decided_by,
    neighbours,
    progress,
    worklist_keys,
)
from pipeline.review.worklist import Query

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from pipeline.review.app import _App

__all__ = ["Nav", "agreements", "nav", "routes", "worklist_context"]

_MAX_SPEC = 2000


@dataclass(frozen=True)
class Nav:
    """A finding's place in the list it was opened from."""

    context: dict[str, str]  # the query parameters that name the list (``q`` or ``queue``)
    title: str
    index: int | None  # 0-based; None when the finding is not (or no longer) in the list
    total: int
    previous: str | None  # URL of the previous finding
    next: str | None  # URL of the next finding
    back: str  # URL of the list
    after_decision: str  # where "save and next" goes: the next finding, or the list


def _spec_query(spec: str) -> Query:
    return Query.parse(dict(parse_qsl(spec[:_MAX_SPEC], keep_blank_values=True)))


def worklist_context(q: Query) -> dict[str, str]:
    """The finding-page parameters that name the worklist of query ``q`` (page left out)."""
    return {"q": urlencode(q.params(page=1))}


def nav(app: _App, user: str, key: str, params: Mapping[str, str]) -> Nav | None:
    """Where finding ``key`` is in the list ``params`` name: ``queue=<id>`` (an assigned
    queue) or ``q=<worklist query string>`` (the worklist's filter, sort and sampling, as
    ``user`` sees it). None when neither is given or the queue is unknown."""
    if "queue" in params:
        queue = app.queues.get(str(params["queue"]))
        if queue is None:
            return None
        context = {"queue": queue.queue_id}
        keys: list[str] = list(queue.finding_keys)
        title = f"queue {queue.name}"
        back = "/queues"
    elif "q" in params:
        spec = str(params["q"])[:_MAX_SPEC]
        q = _spec_query(spec)
        context = {"q": urlencode(q.params(page=1))}
        keys = worklist_keys(app.catalog.findings(), app.latest_for(user), q)
        title = "worklist"
        back = "/?" + context["q"]
    else:
        return None
    pos = neighbours(keys, key)

    def url(k: str | None) -> str | None:
        return None if k is None else "/finding?" + urlencode({"key": k, **context})

    nxt = url(pos.next) if pos.index is not None else None
    return Nav(
        context=context,
        title=title,
        index=pos.index,
        total=pos.total,
        previous=url(pos.previous),
        next=url(pos.next),
        back=back,
        after_decision=nxt or back,
    )


def agreements(app: _App, user: str) -> list[tuple[Queue, Agreement]]:
    """The agreement of the readers of each two-reader queue, from the decisions ``user``
    may see (a blinded reader's pairs hold only findings both readers decided)."""
    reviews = app.visible(user)
    return [
        (q, agreement(reviews, (q.reviewers[0], q.reviewers[1]), q.finding_keys))
        for q in app.queues.all()
        if q.two_readers
    ]


# --------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------


def queues_page(
    app: _App, request: Request, who: tuple[str, str], *, http_status: int = 200, **ctx: Any
) -> Response:
    """The queues page: the user's queues with progress; for a lead, every queue and the
    form to assign one."""
    from pipeline.review.app import PERMISSIONS

    done = decided_by(app.catalog.reviews())
    mine = []
    for q in app.queues.of(who[0]):
        n, first = progress(q, done, who[0])
        start = first or q.finding_keys[0]
        mine.append(
            {
                "queue": q,
                "decided": n,
                "start": "/finding?" + urlencode({"key": start, "queue": q.queue_id}),
            }
        )
    everyone = []
    can_assign = "assign" in PERMISSIONS.get(who[1], frozenset())
    if can_assign:
        for q in reversed(app.queues.all()):
            everyone.append(
                {"queue": q, "progress": [(r, progress(q, done, r)[0]) for r in q.reviewers]}
            )
    readers = sorted(
        u for u, acc in app.rc.users.items() if "decide" in PERMISSIONS.get(acc.role, frozenset())
    )
    return app.page(
        request,
        "queues.html",
        http_status=http_status,
        mine=mine,
        everyone=everyone,
        can_assign=can_assign,
        readers=readers,
        error=ctx.pop("error", None),
        form=ctx.pop("form", {}),
        assigned=ctx.pop("assigned", None),
        max_queue=MAX_QUEUE,
    )


def queues(app: _App, request: Request) -> Response:
    """GET /queues: the queues page."""
    who = app.guard(request, "view")
    if not isinstance(who, tuple):
        return who
    assigned = app.queues.get(request.query_params.get("assigned", ""))
    return queues_page(app, request, who, assigned=assigned)


async def assign(app: _App, request: Request) -> Response:
    """POST /queues: a lead assigns a queue (CSRF, the ``assign`` permission, audited)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import RedirectResponse

    who = await app.aguard(request, "assign")
    if not isinstance(who, tuple):
        return who
    form = await request.form()
    if not app.csrf_ok(request, form):
        return await app.csrf_refused(request, who[0])
    fields = {k: str(form.get(k, "")) for k in ("name", "reader", "second_reader", "spec", "keys")}

    def refuse(message: str) -> Response:
        return queues_page(app, request, who, http_status=400, error=message, form=fields)

    def build() -> Response | Queue:
        readers = [r for r in (fields["reader"], fields["second_reader"]) if r]
        for r in readers:
            account = app.rc.users.get(r)
            if account is None or "decide" not in _perms(account.role):
                return refuse("Not assigned: each reader must be a user who may decide.")
        spec: str | None = None
        if fields["keys"].strip():
            keys = list(dict.fromkeys(fields["keys"].split()))
            unknown = [k for k in keys if app.catalog.finding(k) is None]
            if unknown:
                return refuse(f"Not assigned: {len(unknown)} finding key(s) are unknown.")
        else:
            if len(fields["spec"]) > _MAX_SPEC:
                return refuse("Not assigned: the filter is too long.")
            q = _spec_query(fields["spec"])
            spec = urlencode(q.params(page=1))
            keys = worklist_keys(app.catalog.findings(), app.latest_for(who[0]), q)
        try:
            return assign_queue(
                app.lake,
                name=fields["name"],
                reviewers=readers,
                finding_keys=keys,
                assigned_by=who[0],
                spec=spec,
            )
        except ValueError as e:
            return refuse(f"Not assigned: {e}.")

    made = await run_in_threadpool(build)
    if not isinstance(made, Queue):
        return made
    await app.arecord(
        "review_queue_assigned",
        request,
        who[0],
        queue_id=made.queue_id,
        readers=",".join(made.reviewers),
        findings=len(made.finding_keys),
        two_readers=made.two_readers,
    )
    return RedirectResponse("/queues?" + urlencode({"assigned": made.queue_id}), 303)


def _perms(role: str) -> frozenset[str]:
    from pipeline.review.app import PERMISSIONS

    return PERMISSIONS.get(role, frozenset())


def routes(app: _App) -> list[Route]:
    """The reading flow's routes."""
    from starlette.routing import Route

    async def endpoint(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        if request.method == "POST":
            return await assign(app, request)
        return await run_in_threadpool(queues, app, request)

    return [Route("/queues", endpoint, methods=["GET", "POST"])]
