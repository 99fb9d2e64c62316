# mypy: disable-error-code="import-untyped"
"""celery-once's locks cleared for the jobs that recovery or a restart publishes again.

celery-once (``QueueOnce`` tasks) takes a lock in Redis at ``apply_async`` and clears it when
the run returns; a worker killed under the job never clears it, so every publish of the same
call is refused (``AlreadyQueued``) until the lock's timeout, an hour by default. With
:func:`install`, each republish of such a job by this process's recovery sweep, requeue or
restart first deletes its lock (a :meth:`~jobledger.integrations.base.Registry.on_republish`
hook)::

    from jobledger.contrib import celery_once
    celery_once.install(app)  # beside jobledger's own install, where the tasks are imported

The lock's name is built the way celery-once 3.0 builds it (``qo_<task>_<arg>-<value>...``,
from the arguments bound to the task's parameters, narrowed to its ``once={"keys": [...]}``),
so the task must be registered in this process; the lock is deleted from the Redis that
``app.conf.ONCE`` names (its Redis backend; other backends are left alone, with a warning).
celery-once itself is not imported. From the moment the lock is gone until the recovered run
ends, a new ``apply_async`` of the same call is not refused: jobledger's own ``unique_key``
has no such gap (the key stays with the recovered job).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task
from redis import Redis

from jobledger.integrations.base import RepublishHook, registry
from jobledger.model import JobRecord, Republish

log = logging.getLogger(__name__)

#: The backend of ``app.conf.ONCE`` whose locks this adapter can clear.
REDIS_BACKEND = "celery_once.backends.Redis"


def lock_name(task: Task, args: list[Any], kwargs: Mapping[str, Any]) -> str:
    """The name of celery-once's lock for ``task`` called with ``args`` and ``kwargs``
    (``QueueOnce.get_key`` and ``helpers.queue_once_key`` of celery-once 3.0)."""
    bound = dict(inspect.signature(task.run).bind(*args, **kwargs).arguments)
    if isinstance(bound.get("self"), Task):
        del bound["self"]
    keys = (getattr(task, "once", None) or {}).get("keys")
    if keys is not None:
        bound = {key: bound[key] for key in keys}
    parts = ["qo", task.name]
    parts += [f"{key}-{_text(value)}" for key, value in sorted(bound.items(), key=_first)]
    return "_".join(parts)


def _text(value: Any) -> str:
    """A value as celery-once puts it in a lock's name (its ``force_string``, then ``str``)."""
    return str(_forced(value))


def _first(item: tuple[Any, Any]) -> Any:
    return item[0]


def _forced(value: Any) -> Any:
    if isinstance(value, dict):
        items = [(_forced(k), _forced(v)) for k, v in sorted(value.items(), key=_first)]
        return "{" + ", ".join(str({k: v}).strip("{}") for k, v in items) + "}"
    if isinstance(value, list):
        return [_forced(v) for v in value]
    return value


class LockClearer:
    """The republish hook of one Celery app (see the module docstring)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._redis: Redis | None = None

    def __call__(self, record: JobRecord, reason: Republish) -> None:
        if record.system != "celery":
            return
        task = self.app.tasks.get(record.name)
        if task is None or getattr(task, "once", None) is None:
            return  # not registered here, or no QueueOnce task: no lock of celery-once's
        try:
            name = lock_name(task, record.args, record.kwargs)
        except (TypeError, KeyError) as exc:  # arguments its signature no longer takes
            log.warning("job %s: no celery-once lock name for its arguments: %s", record.id, exc)
            return
        client = self._client()
        if client is not None and client.delete(name):
            log.info("job %s: cleared celery-once lock %s before its %s", record.id, name,
                     reason.value)  # fmt: skip

    def _client(self) -> Redis | None:
        if self._redis is None:
            once = self.app.conf.get("ONCE") or {}
            if once.get("backend") != REDIS_BACKEND:
                log.warning("celery-once locks are cleared only with its Redis backend, not %r",
                            once.get("backend"))  # fmt: skip
                return None
            self._redis = Redis.from_url(once["settings"]["url"])
        return self._redis


def install(app: Celery) -> RepublishHook:
    """Clear celery-once's lock of each job of ``app`` that this process republishes."""
    return registry.on_republish(LockClearer(app))
