# mypy: disable-error-code="import-untyped"
"""Tracked Celery tasks: the claim guard around each body, and ``stage``/``apply_staged`` on
every task.

The task class's ``__call__`` runs the body through the runtime's claim guard (invariant 2).
``__call__`` is used and not ``task_prerun`` because a signal receiver cannot stop the body:
Celery logs and swallows its exceptions. A delivery the guard skips raises
:class:`~celery.exceptions.Ignore`: acknowledged, body not run, no result stored over the
real one. How Celery's own exceptions end a job is :func:`judge`'s.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.app.trace import task_has_custom
from celery.canvas import Signature
from celery.exceptions import Ignore, Reject, Retry
from celery.result import AsyncResult

from jobledger.errors import DeliverySkipped, StagingError
from jobledger.integrations.celery.messages import (
    EMBED_OPTIONS,
    ENQUEUED_HEADER,
    GENERATION_HEADER,
    REPUBLISH_HEADER,
    RESTART_HEADER,
    TRACKED_HEADER,
    generation_of,
    republish_of,
    republish_options,
)
from jobledger.runtime.guard import Delivery, End, Run

if TYPE_CHECKING:
    from jobledger.integrations.celery.integration import CeleryIntegration

_WRAPPED = "_jobledger_wrapped"

#: The integration installed on each app, for the methods every task gets (below).
by_app: weakref.WeakKeyDictionary[Celery, CeleryIntegration] = weakref.WeakKeyDictionary()
_methods_added = False


def wrap(integration: CeleryIntegration, task: Task) -> None:
    """Give ``task``'s class the claim guard and the ``Task.replace`` hook (once)."""
    cls = type(task)
    if cls.__dict__.get(_WRAPPED):
        return
    custom: Callable[..., Any] | None = cls.__call__ if task_has_custom(task, "__call__") else None

    def __call__(self: Task, *args: Any, **kwargs: Any) -> Any:
        def body() -> Any:
            return custom(self, *args, **kwargs) if custom else self.run(*args, **kwargs)

        request = self.request
        if request.called_directly or request.is_eager:
            return custom(self, *args, **kwargs) if custom else Task.__call__(self, *args, **kwargs)
        return run_guarded(integration, self, body)

    replace_with = cls.on_replace

    def on_replace(self: Task, sig: Signature) -> Any:
        replacing(integration, self, sig)
        return replace_with(self, sig)

    cls.__call__ = __call__
    cls.on_replace = on_replace
    setattr(cls, _WRAPPED, True)


def run_guarded(integration: CeleryIntegration, task: Task, body: Callable[[], Any]) -> Any:
    """Run ``body``, the current delivery of ``task``, through the claim guard."""
    request = task.request
    delivery = Delivery(
        record=_record_from_request(integration, task),
        generation=generation_of(getattr(request, GENERATION_HEADER, None)),
        republish=republish_of(getattr(request, REPUBLISH_HEADER, None)),
        restart=bool(getattr(request, RESTART_HEADER, False)),
        context=int(request.get("replaced_task_nesting") or 0),
    )
    try:
        return integration.runtime.guard.run(delivery, body, judge)
    except DeliverySkipped:
        raise Ignore() from None


def judge(exc: Exception, run: Run) -> tuple[End, str | None] | None:
    """How Celery's own exceptions end a job: a retry is retrying, ``Ignore`` a success (or,
    after ``Task.replace``, the replacement's), a requeueing reject puts it back unrun, any
    other reject fails it."""
    if isinstance(exc, Retry):
        return End.RETRYING, "retry"
    if isinstance(exc, Ignore):
        return End.SUCCEEDED, None
    if isinstance(exc, Reject):
        if exc.requeue:
            return End.RELEASED, None
        if run.retrying:  # Task.retry could not publish its message
            return End.FAILED, f"its retry could not be sent: {exc!r}"
        return End.FAILED, f"rejected: {exc!r}"
    return None


def replacing(integration: CeleryIntegration, task: Task, sig: Signature) -> None:
    """``Task.replace``: the job's id passes to the replacement (the signature itself, or
    a chain's last step, published later by the step before it, from another process).
    The job moves to retrying now, before anything is published, and the step that
    carries its id is tagged with the run's generation, so that its delivery is the job's
    current message and not a stale one."""
    job_id = str(task.request.id)
    guard = integration.runtime.guard
    run = guard.running(job_id)
    if run is None:
        return
    guard.retrying(job_id, f"replaced by {sig!r} (Task.replace)")
    for step in getattr(sig, "tasks", None) or [sig]:
        if step.options.get("task_id") == job_id:
            headers = {**(step.options.get("headers") or {}), TRACKED_HEADER: True}
            headers[GENERATION_HEADER] = run.generation
            step.set(headers=headers)


def _record_from_request(integration: CeleryIntegration, task: Task) -> Any:
    request = task.request
    delivery = request.delivery_info or {}
    headers = {
        name: getattr(request, name, None)
        for name in (ENQUEUED_HEADER, GENERATION_HEADER, "eta", "expires", "retries")
    }
    headers["timelimit"] = request.timelimit
    embed = {key: getattr(request, key, None) for key in EMBED_OPTIONS}
    return integration.delivered(
        job_id=str(request.id),
        name=task.name,
        queue=delivery.get("routing_key") or task.queue,
        args=request.args,
        kwargs=request.kwargs,
        headers=headers,
        options=republish_options(
            (request.args, request.kwargs, embed),
            delivery.get("exchange"),
            delivery.get("routing_key"),
            headers,
            {"priority": delivery.get("priority")},
        ),
    )


# -- stage and apply_staged on every task ------------------------------------------------------
def _integration_of(task: Task) -> CeleryIntegration:
    found = by_app.get(task._get_app())
    if found is None:
        raise StagingError(
            f"task {task.name}: jobledger is not installed on its Celery app; call "
            "jobledger.integrations.celery.install(app) where the app is made"
        )
    return found


def _stage(self: Task, *args: Any, **kwargs: Any) -> AsyncResult:
    """``task.stage(*args, **kwargs)``: ``delay``, but the job commits with the open
    transaction (see :meth:`CeleryIntegration.stage`). Give a unique key with
    ``apply_staged(..., unique_key=...)``: here every keyword is the task's."""
    return _integration_of(self).stage(self, args, kwargs)


def _apply_staged(
    self: Task,
    args: Sequence[Any] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    using: object | None = None,
    **options: Any,
) -> AsyncResult:
    """``task.apply_staged(args, kwargs, using=..., **options)``: ``apply_async``, staged in
    ``using``'s transaction (or the open one)."""
    return _integration_of(self).stage(self, args, kwargs, using=using, **options)


def add_task_methods() -> None:
    """Give every Celery task ``stage`` and ``apply_staged``, and let ``apply_async`` stage
    inside a Django atomic block where ``JOBLEDGER_STAGE_IN_ATOMIC`` says so.

    On Celery's base class, not on each task's: a web process uses its tasks without ever
    finalizing the app, and a task made later must have them too. Tasks of an app without
    jobledger behave as before (``stage`` says how to install it).
    """
    global _methods_added
    if _methods_added:
        return
    _methods_added = True
    original = Task.apply_async

    def apply_async(
        self: Task,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *more: Any,  # task_id, producer, ... given by position: published as they are
        **options: Any,
    ) -> Any:
        integration = by_app.get(self._get_app())
        unique_key = options.pop("unique_key", None)
        if unique_key is not None:
            if integration is None:
                integration = _integration_of(self)  # says how to install jobledger
            if more:
                raise StagingError(
                    f"{self.name}.apply_async(unique_key=...) takes its options by keyword"
                )
            if self.app.conf.task_always_eager:  # runs here and now: nothing to hold
                return original(self, args, kwargs, **options)
            if integration.stages_apply_async(self, options):
                return integration.stage(self, args, kwargs, unique_key=unique_key, **options)
            return integration.publish_unique(self, args, kwargs, unique_key, **options)
        if integration is None:
            return original(self, args, kwargs, *more, **options)
        if not more and integration.stages_apply_async(self, options):
            return integration.stage(self, args, kwargs, **options)
        with integration.recorder.publishing():
            return original(self, args, kwargs, *more, **options)

    Task.stage = _stage
    Task.apply_staged = _apply_staged
    Task.apply_async = apply_async
