"""The dashboard: server-rendered pages over the same manager and store as the API.

Every form carries a CSRF token bound to the visitor's session cookie; with a token set, every
page needs a login (unless reads are open) and every form a logged-in session. Templates are
autoescaped, so arguments, errors and names a job client sent render as text.

Pages refresh themselves every few seconds by asking again with the ``ETag`` they last got: an
unchanged page answers 304 with no body. For that a page's text must not change with time
alone, so it carries times, not ages (the script turns them into ages against the ledger's
clock, sent as ``X-Ledger-Now``), and cuts long arguments (the full value is one click away,
from the API).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from jobledger.errors import JobLedgerError, StoreError
from jobledger.history import attempts, timeline
from jobledger.manager import ActionReport
from jobledger.model import (
    HISTORY_KEPT,
    RESTARTABLE_STATES,
    UNCOMPLETED_STATES,
    Instance,
    JobRecord,
    JobState,
)
from jobledger.query import JobQuery
from jobledger.recovery import PRUNE_AFTER_TTLS
from jobledger.server.auth import SESSION_COOKIE, SESSION_MAX_AGE
from jobledger.server.context import Context, context
from jobledger.server.errors import ApiError, status_of
from jobledger.server.inputs import job_id, job_query, read_form, storable
from jobledger.server.overview import overview

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50
#: The most characters of a job's arguments a job page shows before "show all" (a list shows
#: far fewer: see the ``preview`` template filter).
ARGS_SHOWN = 4000
#: The response header that carries the ledger's clock, for the ages the script shows.
NOW_HEADER = "X-Ledger-Now"
#: Messages a redirect may ask a page to show (a fixed list: nothing user-typed is echoed).
NOTICES = {
    "restarted": "Restart published: the job is queued again.",
    "cancelled": "The job is cancelled.",
    "logged-out": "You are logged out.",
}
FORGED = "This form expired or did not come from this dashboard. Reload the page and try again."


class Page:
    """Renders a template for one visitor, giving it a session (for CSRF) if it has none."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.ctx: Context = context(request)
        self.session = self.ctx.auth.session(request)
        self._new_cookie: str | None = None
        if self.session is None:
            self.session, self._new_cookie = self.ctx.auth.new_session()

    @property
    def allowed(self) -> bool:
        return self.ctx.auth.dashboard_ok(self.session)

    async def now(self) -> float:
        """The ledger's clock: what the page's times are aged against."""
        now: float = await run_in_threadpool(self.ctx.store.now)
        return now

    def render(
        self, template: str, status: int = 200, *, now: float | None = None, **values: Any
    ) -> Response:
        """The page; with ``now``, an ``ETag`` too, and 304 without a body when the visitor
        already has this very page (``If-None-Match``)."""
        assert self.session is not None
        stamp = "" if now is None else f"{now:.3f}"
        values.update(
            request=self.request,
            csrf=self.ctx.auth.csrf_token(self.session),
            auth_enabled=self.ctx.auth.enabled,
            logged_in=self.session.authenticated,
            notice=NOTICES.get(self.request.query_params.get("notice", "")),
            ledger_now=stamp,
        )
        response: Response = self.ctx.templates.TemplateResponse(
            self.request, template, values, status_code=status
        )
        response.headers["Cache-Control"] = "no-cache"
        if now is not None:
            response.headers[NOW_HEADER] = stamp
            # the clock is the one part of the page that changes with time alone
            body = bytes(response.body).replace(f'data-now="{stamp}"'.encode(), b"")
            tag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            response.headers["ETag"] = tag
            if status == 200 and tag in _tags(self.request.headers.get("if-none-match")):
                response = Response(
                    status_code=304,
                    headers={"ETag": tag, NOW_HEADER: stamp, "Cache-Control": "no-cache"},
                )
        self.keep_session(response)
        return response

    def keep_session(self, response: Response) -> None:
        if self._new_cookie is not None:
            set_session_cookie(self.request, response, self._new_cookie)

    def login_redirect(self) -> Response:
        target = self.request.url.path
        if self.request.url.query:
            target += "?" + self.request.url.query
        response = RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
        self.keep_session(response)
        return response

    def error(self, status: int, message: str) -> Response:
        return self.render("error.html", status=status, message=message)

    async def form(self) -> FormData | Response:
        """The posted form if its CSRF token is right and the visitor may write; else a
        refusal page (403), which changes nothing."""
        try:
            form = await read_form(self.request)
        except ApiError as exc:
            return self.error(exc.status, exc.message)
        token = form.get("csrf")
        if not self.ctx.auth.csrf_ok(self.session, token if isinstance(token, str) else None):
            return self.error(
                403,
                FORGED,
            )
        if not self.ctx.auth.dashboard_write_ok(self.session):
            return self.login_redirect()
        return form


def _tags(header: str | None) -> list[str]:
    return [t.strip() for t in (header or "").split(",") if t.strip()]


def set_session_cookie(request: Request, response: Response, value: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        value,
        max_age=SESSION_MAX_AGE,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def _filters(
    params: Mapping[str, Any], multi: dict[str, list[str]]
) -> tuple[JobQuery, dict[str, Any]]:
    """The job filter from query parameters or a form, and its values to show in the form."""
    values: dict[str, Any] = {
        "state": [s for s in multi.get("state", []) if s],
        "queue": str(params.get("queue") or "").strip(),
        "name": str(params.get("name") or "").strip(),
        "system": str(params.get("system") or "").strip(),
        "match": str(params.get("match") or ""),
        "regex": str(params.get("regex") or "") in ("1", "on", "true"),
        "older_than": str(params.get("older_than") or "").strip(),
        "recovered": str(params.get("recovered") or "") in ("1", "on", "true"),
    }
    query = job_query(
        values["state"],
        [values["queue"]] if values["queue"] else None,
        [values["name"]] if values["name"] else None,
        [values["system"]] if values["system"] else None,
        values["match"] or None,
        values["regex"],
        values["older_than"] or None,
        values["recovered"],
    )
    return query, values


def _filter_qs(values: Mapping[str, Any]) -> str:
    pairs: list[tuple[str, str]] = [("state", s) for s in values["state"]]
    for key in ("queue", "name", "system", "match", "older_than"):
        if values[key]:
            pairs.append((key, values[key]))
    for flag in ("regex", "recovered"):
        if values[flag]:
            pairs.append((flag, "1"))
    return urlencode(pairs)


@router.get("/", response_class=HTMLResponse)
async def overview_page(request: Request) -> Response:
    page = Page(request)
    if not page.allowed:
        return page.login_redirect()
    ctx = page.ctx
    recovered = ctx.metrics.recovered
    try:
        data = await run_in_threadpool(overview, ctx.store, ctx.settings.ttl, recovered)
        now = await page.now()
    except JobLedgerError as exc:
        return page.error(status_of(exc), str(exc))
    return page.render("overview.html", now=now, data=data, states=list(JobState))


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request) -> Response:
    page = Page(request)
    if not page.allowed:
        return page.login_redirect()
    params = request.query_params
    multi = {k: params.getlist(k) for k in params}
    cursor = params.get("cursor") or None
    values: dict[str, Any] = {
        "state": [],
        "queue": "",
        "name": "",
        "system": "",
        "match": "",
        "regex": False,
        "older_than": "",
        "recovered": False,
    }
    try:
        query, values = _filters(params, multi)
        if cursor:
            from jobledger.query import Cursor

            Cursor.decode(storable(cursor, "cursor"))
        result = await run_in_threadpool(
            page.ctx.store.query, query, limit=PAGE_SIZE, cursor=cursor
        )
        now = await page.now()
    except ApiError as exc:
        return page.render(
            "jobs.html",
            status=exc.status,
            jobs=[],
            next_url=None,
            values=values,
            states=list(JobState),
            problem=f"{exc.field}: {exc.message}",
            qs="",
            can_restart=False,
        )
    except JobLedgerError as exc:
        status = status_of(exc)
        if isinstance(exc, StoreError) and values.get("regex") and status == 503:
            status = 422
        return page.render(
            "jobs.html",
            status=status,
            jobs=[],
            next_url=None,
            values=values,
            states=list(JobState),
            problem=str(exc),
            qs="",
            can_restart=False,
        )
    qs = _filter_qs(values)
    next_url = None
    if result.next_cursor:
        next_url = "/jobs?" + (qs + "&" if qs else "") + urlencode({"cursor": result.next_cursor})
    return page.render(
        "jobs.html",
        now=now,
        jobs=result.items,
        next_url=next_url,
        values=values,
        states=list(JobState),
        problem=None,
        qs=qs,
        can_restart=(
            page.ctx.manager.can_publish(values["system"])
            if values["system"]
            else bool(page.ctx.manager.integrations.systems())
        ),
    )


@router.get("/jobs/{raw_id}", response_class=HTMLResponse)
async def job_page(raw_id: str, request: Request) -> Response:
    page = Page(request)
    if not page.allowed:
        return page.login_redirect()
    return await _render_job(page, raw_id)


async def _render_job(
    page: Page, raw_id: str, status: int = 200, problem: str | None = None
) -> Response:
    try:
        record = await run_in_threadpool(page.ctx.manager.get, job_id(storable(raw_id, "job_id")))
        now = await page.now()
    except ApiError as exc:
        return page.error(exc.status, exc.message)
    except JobLedgerError as exc:
        return page.error(status_of(exc), str(exc))
    return page.render(
        "job.html",
        status=status,
        now=now,
        job=record,
        runs=attempts(record),
        timeline=timeline(record),
        arguments=_shown_arguments(record),
        history_kept=HISTORY_KEPT,
        pretty=_pretty,
        can_restart=record.state in RESTARTABLE_STATES,
        can_publish=page.ctx.manager.can_publish(record.system),
        can_cancel=record.state in UNCOMPLETED_STATES,
        problem=problem,
    )


def _pretty(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)


def _shown_arguments(record: JobRecord) -> dict[str, Any]:
    """The job's arguments as the page shows them: whole, or their head and their full size
    (the page loads the rest from the API on request)."""
    text = _pretty({"args": record.args, "kwargs": record.kwargs})
    size = len(text.encode())
    if len(text) <= ARGS_SHOWN:
        return {"text": text, "cut": False, "size": size}
    return {"text": text[:ARGS_SHOWN], "cut": True, "size": size}


@router.post("/jobs/{raw_id}/{action}", response_class=HTMLResponse)
async def job_action(raw_id: str, action: str, request: Request) -> Response:
    page = Page(request)
    form = await page.form()
    if isinstance(form, Response):
        return form
    if action not in ("restart", "cancel"):
        return page.error(404, "No such action.")
    try:
        jid = job_id(storable(raw_id, "job_id"))
        run = page.ctx.manager.restart if action == "restart" else page.ctx.manager.cancel
        report: ActionReport = await run_in_threadpool(run, [jid])
    except ApiError as exc:
        return page.error(exc.status, exc.message)
    except JobLedgerError as exc:
        return await _render_job(page, raw_id, status_of(exc), str(exc))
    if report.done:
        notice = "restarted" if action == "restart" else "cancelled"
        return RedirectResponse(f"/jobs/{jid}?notice={notice}", status_code=303)
    why = "; ".join(report.failed.values()) or "; ".join(report.skipped.values()) or "nothing done"
    return await _render_job(page, raw_id, 409, f"Not {action}ed: {why}")


@router.post("/bulk", response_class=HTMLResponse)
async def bulk(request: Request) -> Response:
    """Bulk restart or cancel: the first post shows what would happen (a dry run) and asks for
    confirmation; the confirmed post does it."""
    page = Page(request)
    form = await page.form()
    if isinstance(form, Response):
        return form
    action = str(form.get("action") or "")
    if action not in ("restart", "cancel"):
        return page.error(422, "Choose restart or cancel.")
    ids = [str(v) for v in form.getlist("ids")]
    whole = form.get("scope") == "filter"
    multi = {"state": [str(v) for v in form.getlist("state")]}
    try:
        ids = [job_id(storable(i, "ids"), "ids") for i in ids]
        query, values = _filters(form, multi)
        selection = query if whole else None
        if not ids and selection is None:
            return page.error(
                422, "Select some jobs first (or choose every job matching the filter)."
            )
        run = page.ctx.manager.restart if action == "restart" else page.ctx.manager.cancel
        confirmed = form.get("confirm") == "yes"
        report = await run_in_threadpool(lambda: run(ids, selection, dry_run=not confirmed))
    except ApiError as exc:
        return page.error(exc.status, f"{exc.field}: {exc.message}")
    except JobLedgerError as exc:
        return page.error(status_of(exc), str(exc))
    return page.render(
        "bulk.html",
        action=action,
        report=report,
        ids=ids,
        whole=whole,
        values=values,
        confirmed=confirmed,
    )


@router.get("/instances", response_class=HTMLResponse)
async def instances_page(request: Request) -> Response:
    page = Page(request)
    if not page.allowed:
        return page.login_redirect()
    try:
        found = await run_in_threadpool(page.ctx.manager.instances)
        now = await page.now()
    except JobLedgerError as exc:
        return page.error(status_of(exc), str(exc))
    ttl = page.ctx.settings.ttl
    return page.render(
        "instances.html", now=now, instances=found, forget_after=PRUNE_AFTER_TTLS * ttl
    )


@router.get("/instances/{instance_id}", response_class=HTMLResponse)
async def instance_page(instance_id: str, request: Request) -> Response:
    """One worker: what it holds now (received, running or not yet), its last beat, its
    counters."""
    page = Page(request)
    if not page.allowed:
        return page.login_redirect()
    try:
        found = await run_in_threadpool(page.ctx.manager.instances)
        instance = next((i for i in found if i.id == instance_id), None)
        if instance is None:
            return page.error(404, "No such instance: it shut down, or was forgotten.")
        jobs = await run_in_threadpool(_held_jobs, page, instance)
        now = await page.now()
    except JobLedgerError as exc:
        return page.error(status_of(exc), str(exc))
    return page.render("instance.html", now=now, instance=instance, jobs=jobs)


def _held_jobs(page: Page, instance: Instance) -> list[tuple[str, int | None, JobRecord | None]]:
    """(job id, generation it received, its record) for each job the instance said it holds,
    and each started job the ledger says it owns (a job received but not yet reported)."""
    store = page.ctx.store
    held = dict(instance.holding)
    owned = JobQuery(owners=frozenset({instance.id}), states=frozenset({JobState.STARTED}))
    records = {r.id: r for r in store.iter_jobs(owned)}
    if held:
        records.update((r.id, r) for r in store.iter_jobs(JobQuery(ids=frozenset(held))))
    ids = sorted(set(held) | set(records))
    return [(i, held.get(i), records.get(i)) for i in ids]


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> Response:
    page = Page(request)
    return page.render(
        "login.html", next=_safe_next(request.query_params.get("next")), failed=False
    )


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    page = Page(request)
    try:
        form = await read_form(request)
    except ApiError as exc:
        return page.error(exc.status, exc.message)
    token = form.get("csrf")
    if not page.ctx.auth.csrf_ok(page.session, token if isinstance(token, str) else None):
        return page.error(
            403,
            FORGED,
        )
    secret = form.get("token")
    target = _safe_next(str(form.get("next") or "/"))
    if not page.ctx.auth.enabled:
        return RedirectResponse(target, status_code=303)
    if not isinstance(secret, str) or not page.ctx.auth.token_ok(secret):
        return page.render("login.html", status=401, next=target, failed=True)
    _, cookie = page.ctx.auth.new_session(authenticated=True)
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(request, response, cookie)
    return response


@router.post("/logout", response_class=HTMLResponse)
async def logout(request: Request) -> Response:
    page = Page(request)
    form = await page.form()
    if isinstance(form, Response):
        return form
    _, cookie = page.ctx.auth.new_session(authenticated=False)
    response = RedirectResponse("/login?notice=logged-out", status_code=303)
    set_session_cookie(request, response, cookie)
    return response


def _safe_next(target: str | None) -> str:
    """Only a local path: a login must not bounce a visitor to another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
