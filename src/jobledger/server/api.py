"""The JSON API: everything the manager and the CLI do, over HTTP.

Listings page with the store's keyset cursor (``next_cursor``), filters mean what they mean in
the CLI (one :class:`~jobledger.query.JobQuery`), and restart/cancel go through the manager, so
a restart publishes through the Integration seam before the record moves (invariant 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from jobledger.errors import ConfigError, StoreError, StoreUnavailable
from jobledger.manager import ActionReport
from jobledger.model import JobState
from jobledger.query import Cursor, JobQuery
from jobledger.serialize import (
    duration_stats_to_dict,
    instance_to_dict,
    job_to_dict,
    report_to_dict,
    stats_to_dict,
)
from jobledger.server.context import Context, context
from jobledger.server.errors import ApiError
from jobledger.server.inputs import job_id, job_query, storable
from jobledger.server.seed import write_access

#: The largest page a listing returns.
MAX_PAGE = 1000


def read_access(request: Request) -> None:
    context(request).auth.require_read(request)


router = APIRouter(prefix="/api/v1", tags=["ledger"], dependencies=[Depends(read_access)])

States = Annotated[
    list[str] | None,
    Query(description="Job state (repeatable): " + ", ".join(s.value for s in JobState)),
]
Names = Annotated[list[str] | None, Query(max_length=255)]
Match = Annotated[
    str | None, Query(max_length=10000, description="Text the arguments contain (literal).")
]
Regex = Annotated[bool, Query(description="Read match as a regular expression.")]
OlderThan = Annotated[
    str | None, Query(max_length=64, description="In its state longer than e.g. 90s, 3d.")
]
Recovered = Annotated[bool, Query(description="Only jobs recovered at least once.")]
UniqueKeys = Annotated[
    list[str] | None,
    Query(max_length=255, description="Published with this unique key (repeatable)."),
]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
PageCursor = Annotated[str | None, Query(max_length=2048)]


def filters(
    state: States = None,
    queue: Names = None,
    name: Names = None,
    system: Names = None,
    match: Match = None,
    regex: Regex = False,
    older_than: OlderThan = None,
    recovered: Recovered = False,
    unique_key: UniqueKeys = None,
) -> JobQuery:
    return job_query(state, queue, name, system, match, regex, older_than, recovered, unique_key)


def checked_cursor(cursor: str | None) -> str | None:
    if cursor:
        try:
            Cursor.decode(cursor)
        except ConfigError as exc:
            raise ApiError(422, str(exc), "cursor") from None
    return cursor or None


def guard_regex(query: JobQuery, exc: StoreError) -> ApiError | StoreError:
    """A pattern Python accepts but the database's dialect refuses is the caller's fault."""
    if query.regex and not isinstance(exc, StoreUnavailable):
        return ApiError(422, f"the database refused the regular expression: {exc}", "match")
    return exc


@router.get("/jobs", summary="List jobs, newest first")
def list_jobs(
    request: Request,
    query: Annotated[JobQuery, Depends(filters)],
    limit: Limit = 50,
    cursor: PageCursor = None,
) -> dict[str, Any]:
    ctx = context(request)
    try:
        page = ctx.store.query(query, limit=limit, cursor=checked_cursor(cursor))
    except StoreError as exc:
        raise guard_regex(query, exc) from None
    return {"jobs": [job_to_dict(r) for r in page.items], "next_cursor": page.next_cursor}


@router.get("/jobs/{job_id}", summary="One job")
def get_job(job_id: str, request: Request) -> dict[str, Any]:
    return job_to_dict(context(request).manager.get(_path_id(job_id)))


@router.get("/jobs/{job_id}/arguments", summary="One job's arguments, whole")
def job_arguments(job_id: str, request: Request) -> dict[str, Any]:
    """What the dashboard loads on request for a job whose arguments it cut."""
    record = context(request).manager.get(_path_id(job_id))
    return {"args": record.args, "kwargs": record.kwargs}


@router.get("/stats", summary="Counts per state and lag per queue, and the outbox backlog")
def stats(request: Request) -> dict[str, Any]:
    return stats_to_dict(context(request).manager.stats())


@router.get("/durations", summary="Durations of finished jobs: p50/p95/max per task, or per job")
def durations(
    request: Request,
    query: Annotated[JobQuery, Depends(filters)],
    kind: Literal["queued", "started"] = "started",
    per_job: bool = False,
    limit: Limit = 50,
    cursor: PageCursor = None,
) -> dict[str, Any]:
    store = context(request).store
    try:
        if per_job:
            page = store.durations(query, kind, limit=limit, cursor=checked_cursor(cursor))
            rows = [{"id": r.id, "name": r.name, "seconds": s} for r, s in page.items]
            return {"jobs": rows, "next_cursor": page.next_cursor}
        return {"durations": [duration_stats_to_dict(s) for s in store.duration_stats(query, kind)]}
    except StoreError as exc:
        raise guard_regex(query, exc) from None


@router.get("/instances", summary="Worker instances and the age of their heartbeats")
def instances(request: Request) -> dict[str, Any]:
    return {"instances": [instance_to_dict(i) for i in context(request).manager.instances()]}


class Selection(BaseModel):
    """Which jobs a bulk restart or cancel acts on: ids, a filter, or both (their union)."""

    ids: list[str] = Field(default_factory=list, max_length=10000)
    state: list[str] | None = Field(default=None, max_length=16)
    queue: list[Annotated[str, Field(max_length=255)]] | None = Field(default=None, max_length=100)
    name: list[Annotated[str, Field(max_length=255)]] | None = Field(default=None, max_length=100)
    system: list[Annotated[str, Field(max_length=64)]] | None = Field(default=None, max_length=20)
    match: str | None = Field(default=None, max_length=10000)
    regex: bool = False
    older_than: str | None = Field(default=None, max_length=64)
    recovered: bool = False
    unique_key: list[Annotated[str, Field(max_length=255)]] | None = Field(
        default=None, max_length=100
    )
    dry_run: bool = False
    #: restart only: also queued, staged, retrying and running jobs (see ``Manager.restart``)
    force: bool = False

    def filtered(self) -> bool:
        return (
            any((self.state, self.queue, self.name, self.system, self.match, self.older_than))
            or bool(self.unique_key)
            or self.recovered
        )


def _act(ctx: Context, action: str, selection: Selection) -> dict[str, Any]:
    ids = [job_id(i, "ids") for i in selection.ids]
    query = None
    if selection.filtered():
        query = job_query(
            selection.state,
            selection.queue,
            selection.name,
            selection.system,
            selection.match,
            selection.regex,
            selection.older_than,
            selection.recovered,
            selection.unique_key,
        )
    if not ids and query is None:
        raise ApiError(
            422, f"say which jobs to {action}: ids, or a filter such as state=failed", "ids"
        )
    if selection.force and action != "restart":
        raise ApiError(422, f"{action} takes no force", "force")
    run: Callable[..., ActionReport] = (
        functools.partial(ctx.manager.restart, force=selection.force)
        if action == "restart"
        else ctx.manager.cancel
    )
    try:
        return report_to_dict(run(ids, query, dry_run=selection.dry_run))
    except StoreError as exc:
        raise guard_regex(query or JobQuery(), exc) from None


@router.post(
    "/restart", summary="Restart jobs by id and/or filter", dependencies=[Depends(write_access)]
)
def restart_many(selection: Selection, request: Request) -> dict[str, Any]:
    return _act(context(request), "restart", selection)


@router.post(
    "/cancel", summary="Cancel jobs by id and/or filter", dependencies=[Depends(write_access)]
)
def cancel_many(selection: Selection, request: Request) -> dict[str, Any]:
    return _act(context(request), "cancel", selection)


@router.post(
    "/jobs/{job_id}/restart",
    summary="Publish one job again with its own id",
    dependencies=[Depends(write_access)],
)
def restart_one(
    job_id: str, request: Request, dry_run: bool = False, force: bool = False
) -> dict[str, Any]:
    return _one(context(request), "restart", job_id, dry_run, force=force)


@router.post(
    "/jobs/{job_id}/cancel", summary="Cancel one job", dependencies=[Depends(write_access)]
)
def cancel_one(job_id: str, request: Request, dry_run: bool = False) -> dict[str, Any]:
    return _one(context(request), "cancel", job_id, dry_run)


def _one(
    ctx: Context, action: str, raw_id: str, dry_run: bool, *, force: bool = False
) -> dict[str, Any]:
    jid = _path_id(raw_id)
    record = ctx.manager.get(jid)  # 404 for an unknown id, rather than a report that skipped it
    if action == "restart":
        ctx.manager.integrations.get(record.system)  # a 4xx naming what is missing, if it is
    return _act(ctx, action, Selection(ids=[jid], dry_run=dry_run, force=force))


def _path_id(raw: str) -> str:
    return job_id(storable(raw, "job_id"))
