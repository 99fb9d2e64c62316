"""The seed supervisor's endpoints, unchanged, so its client middleware works as it is:
``POST /api/v1/jobs``, ``.../{job_id}/started`` and ``.../{job_id}/complete`` with form or JSON
bodies (``arguments`` a JSON string). Added: ``.../failed``, instance heartbeats, and a batch
endpoint that takes many events in one request.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from jobledger.errors import JobLedgerError
from jobledger.model import JobState
from jobledger.serialize import instance_to_dict
from jobledger.server import events
from jobledger.server.context import Context, context
from jobledger.server.errors import ApiError, error_body, status_of
from jobledger.server.events import BatchEvent, Heartbeat, JobEvent, NewJob, Outcome
from jobledger.server.inputs import read_body, validated

#: The most events one batch request may carry.
MAX_BATCH = 1000

router = APIRouter(prefix="/api/v1", tags=["seed endpoints"])


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body read by hand: the same fields as JSON or as a form."""
    schema = model.model_json_schema()
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "application/x-www-form-urlencoded": {"schema": schema},
            },
        }
    }


def write_access(request: Request) -> None:
    context(request).auth.require_write(request)


def _reply(ctx: Context, kind: str, outcome: Outcome) -> JSONResponse:
    if not outcome.applied:
        ctx.metrics.duplicates_skipped.labels(kind).inc()
    return JSONResponse(outcome.to_dict(), status_code=201 if outcome.created else 200)


@router.post(
    "/jobs",
    summary="Report a job enqueued (seed endpoint)",
    openapi_extra=_body_doc(NewJob),
    dependencies=[Depends(write_access)],
    responses={201: {"description": "recorded"}, 200: {"description": "already known"}},
)
async def job_queued(request: Request) -> JSONResponse:
    ctx = context(request)
    body = validated(NewJob, await read_body(request))
    outcome = await run_in_threadpool(events.queued, ctx.store, body.job_id, body)
    return _reply(ctx, "queued", outcome)


@router.post(
    "/jobs/{job_id}/started",
    summary="Report a job started (seed endpoint)",
    openapi_extra=_body_doc(JobEvent),
    dependencies=[Depends(write_access)],
)
async def job_started(job_id: str, request: Request) -> JSONResponse:
    ctx = context(request)
    body = validated(JobEvent, await read_body(request))
    outcome = await run_in_threadpool(events.started, ctx.store, job_id, body, ctx.settings.ttl)
    return _reply(ctx, "started", outcome)


@router.post(
    "/jobs/{job_id}/complete",
    summary="Report a job completed (seed endpoint)",
    openapi_extra=_body_doc(JobEvent),
    dependencies=[Depends(write_access)],
)
async def job_complete(job_id: str, request: Request) -> JSONResponse:
    ctx = context(request)
    body = validated(JobEvent, await read_body(request))
    outcome = await run_in_threadpool(events.finished, ctx.store, job_id, body, JobState.SUCCEEDED)
    return _reply(ctx, "complete", outcome)


@router.post(
    "/jobs/{job_id}/failed",
    summary="Report a job failed (with its error; will_retry for the client's own retry)",
    openapi_extra=_body_doc(JobEvent),
    dependencies=[Depends(write_access)],
)
async def job_failed(job_id: str, request: Request) -> JSONResponse:
    ctx = context(request)
    body = validated(JobEvent, await read_body(request))
    to = JobState.RETRYING if body.will_retry else JobState.FAILED
    outcome = await run_in_threadpool(events.finished, ctx.store, job_id, body, to)
    return _reply(ctx, "failed", outcome)


@router.post(
    "/instances/{name}/heartbeat",
    summary="An HTTP client's instance is alive (enables orphan detection for its jobs)",
    openapi_extra=_body_doc(Heartbeat),
    dependencies=[Depends(write_access)],
)
async def instance_heartbeat(name: str, request: Request) -> JSONResponse:
    ctx = context(request)
    body = validated(Heartbeat, await read_body(request))
    instance = await run_in_threadpool(events.heartbeat, ctx.store, name, body)
    return JSONResponse(instance_to_dict(instance))


class Batch(BaseModel):
    """``POST /api/v1/events``: many events, applied in order, each on its own."""

    events: list[dict[str, Any]] = Field(max_length=MAX_BATCH)


def _apply(ctx: Context, raw: dict[str, Any]) -> dict[str, Any]:
    try:
        event = BatchEvent.model_validate(raw)
        if event.event == "queued":
            outcome = events.queued(ctx.store, event.job_id, event)
        elif event.event == "started":
            outcome = events.started(ctx.store, event.job_id, event, ctx.settings.ttl)
        else:
            to = {
                "complete": JobState.SUCCEEDED,
                "failed": JobState.RETRYING if event.will_retry else JobState.FAILED,
            }[event.event]
            outcome = events.finished(ctx.store, event.job_id, event, to)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        return {"status": 422, **error_body(str(first["msg"]), field)}
    except ApiError as exc:
        return {"status": exc.status, **error_body(exc.message, exc.field)}
    except JobLedgerError as exc:
        if status_of(exc) == 503:
            raise  # the ledger is down: the whole batch is answered 503, the client resends
        return {"status": status_of(exc), **error_body(str(exc))}
    if not outcome.applied:
        ctx.metrics.duplicates_skipped.labels(event.event).inc()
    return {"status": 201 if outcome.created else 200, **outcome.to_dict()}


@router.post(
    "/events",
    summary="Many job events in one request (JSON only)",
    dependencies=[Depends(write_access)],
)
async def batch(body: Batch, request: Request) -> dict[str, Any]:
    """Each event is ``{"event": "queued"|"started"|"complete"|"failed", "job_id": ..., ...}``
    with the fields of the single endpoints; the answer has one result per event, in order."""
    ctx = context(request)

    def run() -> list[dict[str, Any]]:
        return [_apply(ctx, raw) for raw in body.events]

    results = await run_in_threadpool(run)
    failed = sum(1 for r in results if r["status"] >= 400)
    return {"results": results, "applied": len(results) - failed, "failed": failed}
