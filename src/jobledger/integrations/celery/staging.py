# mypy: disable-error-code="import-untyped"
"""A staged Celery task as a job record: what ``apply_async`` would send, kept for later.

Staging writes the job now and publishes it after the commit (or much later, through the
relay after a broker outage), so everything relative is made absolute at the call: a
``countdown`` becomes an ``eta`` and a relative ``expires`` a time, both in UTC, so a job staged
with ``countdown=60`` runs a minute after it was staged, not a minute after the relay sent it.
The queue is chosen by the app's router at the call, as ``apply_async`` would. Options that
could not be sent the same way later are refused rather than dropped.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from celery import Celery, Task
from celery.canvas import Signature
from celery.exceptions import QueueNotFound

from jobledger.errors import ConfigError, StagingError
from jobledger.model import JobRecord, JobState
from jobledger.stores.rows import dump_json

SYSTEM = "celery"

#: ``apply_async`` options a staged job keeps (``add_to_parent`` means nothing for a job that
#: is published later, outside the caller's task, and is ignored).
STAGED_OPTIONS = frozenset(
    {
        "countdown",
        "eta",
        "expires",
        "queue",
        "exchange",
        "routing_key",
        "priority",
        "time_limit",
        "soft_time_limit",
        "link",
        "link_error",
        "task_id",
        "add_to_parent",
    }
)
#: The task's own defaults (``@app.task(queue=..., priority=...)``) that apply as in
#: ``apply_async``.
_TASK_DEFAULTS = ("queue", "exchange", "routing_key", "priority", "expires")


def staged_record(
    app: Celery,
    task: Task | str,
    args: Sequence[Any] | None,
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
) -> JobRecord:
    """The ``staged`` record of ``task`` called with these arguments and ``apply_async``
    options; :class:`StagingError` for an unknown task, wrong arguments or an option that
    cannot be staged."""
    found = _registered(app, task)
    args, kwargs = list(args or ()), dict(kwargs or {})
    unknown = sorted(k for k, v in options.items() if k not in STAGED_OPTIONS and v is not None)
    if unknown:
        raise StagingError(
            f"apply_async option(s) {', '.join(unknown)} cannot be staged; a staged task "
            f"takes {', '.join(sorted(STAGED_OPTIONS))}"
        )
    try:
        dump_json([args, kwargs])
    except ConfigError as exc:
        raise StagingError(f"task {found.name}: {exc}") from None
    check_arguments = getattr(found, "__header__", None)  # function tasks have it, classes not
    if found.typing and check_arguments is not None:
        try:
            check_arguments(*args, **kwargs)
        except TypeError as exc:
            raise StagingError(f"task {found.name} called with wrong arguments: {exc}") from None
    merged: dict[str, Any] = {
        k: getattr(found, k) for k in _TASK_DEFAULTS if getattr(found, k, None) is not None
    }
    merged.update({k: v for k, v in options.items() if v is not None})
    now = datetime.now(timezone.utc)
    kept: dict[str, Any] = {}
    for name in ("priority", "time_limit", "soft_time_limit", "exchange", "routing_key"):
        if merged.get(name) is not None:
            kept[name] = merged[name]
    eta = _moment(merged.get("eta"), "eta", now)
    if merged.get("countdown") is not None:
        eta = now + timedelta(seconds=_seconds(merged["countdown"], "countdown"))
    expires = _moment(merged.get("expires"), "expires", now)
    if eta is not None:
        kept["eta"] = eta.isoformat()
    if expires is not None:
        kept["expires"] = expires.isoformat()
    for name in ("link", "link_error"):
        if merged.get(name):
            kept[name] = [dict(s) for s in _as_list(merged[name])]
    job_id = str(merged.get("task_id") or uuid.uuid4())
    return JobRecord(
        id=job_id,
        name=found.name,
        system=SYSTEM,
        queue=_queue(app, found, args, kwargs, merged),
        args=args,
        kwargs=kwargs,
        options=kept,
        state=JobState.STAGED,
    )


def signature_parts(
    signature: Signature,
) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
    """Name, args, kwargs and options of a single task's signature."""
    if type(signature) is not Signature and not isinstance(signature, Mapping):
        raise StagingError(f"only a task's signature can be staged, not {signature!r}")
    if signature.get("subtask_type"):
        raise StagingError(
            f"a {signature['subtask_type']} cannot be staged: stage its tasks one by one"
        )
    return (
        str(signature["task"]),
        list(signature.get("args") or ()),
        dict(signature.get("kwargs") or {}),
        dict(signature.get("options") or {}),
    )


def _registered(app: Celery, task: Task | str) -> Task:
    name = task if isinstance(task, str) else getattr(task, "name", None)
    found = app.tasks.get(name) if isinstance(name, str) else None
    if found is None:
        raise StagingError(
            f"task {name!r} is not registered in Celery app {app.main!r}: import the module "
            "that defines it (or check the name)"
        )
    return found


def _queue(
    app: Celery, task: Task, args: list[Any], kwargs: dict[str, Any], options: dict[str, Any]
) -> str:
    route_options = {k: options[k] for k in ("queue", "exchange", "routing_key") if k in options}
    try:
        routed = app.amqp.router.route(route_options, task.name, args, kwargs)
    except QueueNotFound as exc:
        raise StagingError(f"task {task.name}: {exc}") from None
    queue = routed.get("queue")
    return str(getattr(queue, "name", None) or queue or app.conf.task_default_queue)


def _moment(value: Any, name: str, now: datetime) -> datetime | None:
    """An absolute UTC time from a datetime, an ISO string or (``expires``) seconds from now."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return (
            value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
        )
    if isinstance(value, str):
        try:
            return _moment(datetime.fromisoformat(value), name, now)
        except ValueError:
            raise StagingError(f"{name}={value!r} is not an ISO 8601 time") from None
    if name == "expires":
        return now + timedelta(seconds=_seconds(value, name))
    raise StagingError(f"{name} must be a datetime or an ISO 8601 time, not {value!r}")


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise StagingError(f"{name} must be zero or more seconds, not {value!r}")
    return float(value)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
