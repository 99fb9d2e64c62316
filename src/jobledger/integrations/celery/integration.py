# mypy: disable-error-code="import-untyped"
"""The ledger's side of one Celery app: which tasks are tracked, the signal receivers, the
way back (publish) and staging; everything queue-agnostic is its
:class:`~jobledger.runtime.worker.WorkerRuntime`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from celery import Celery, Task, signals
from celery.canvas import Signature
from celery.result import AsyncResult

from jobledger.config import Settings
from jobledger.counters import SharedCounters
from jobledger.errors import ConfigError, StagingError, StoreError
from jobledger.integrations.base import Published, registry
from jobledger.integrations.celery import tasks
from jobledger.integrations.celery.messages import TRACKED_HEADER, delivered_record
from jobledger.integrations.celery.publish import CeleryPublisher
from jobledger.integrations.celery.recording import PublishRecorder
from jobledger.integrations.celery.staging import (
    STAGED_OPTIONS,
    SYSTEM,
    signature_parts,
    staged_record,
)
from jobledger.integrations.celery.worker import WorkerHooks
from jobledger.model import ORPHAN_OPTION, JobRecord, OrphanPolicy, Republish
from jobledger.outbox import Outbox
from jobledger.pending import PendingWrites
from jobledger.runtime.worker import WorkerRuntime
from jobledger.stores import Store

log = logging.getLogger(__name__)


class CeleryIntegration:
    """The ledger's side of one Celery app. Build it with :func:`install`."""

    system = SYSTEM

    def __init__(
        self,
        app: Celery,
        settings: Settings,
        *,
        store: Store | None = None,
        store_factory: Callable[[], Store] | None = None,
        track_all: bool = False,
    ) -> None:
        self.app = app
        self.settings = settings
        self.track_all = track_all
        self.publisher = CeleryPublisher(app)
        self.runtime = WorkerRuntime(
            self, settings, store=store, store_factory=store_factory, wrappers=("celery",)
        )
        self.recorder = PublishRecorder(self)
        self.hooks = WorkerHooks(self)
        self._receivers: list[tuple[Any, Callable[..., Any]]] = []

    @property
    def store(self) -> Store:
        """This process's ledger store."""
        return self.runtime.store

    @property
    def counters(self) -> SharedCounters:
        """What this worker counted, all its processes together (``WORKER_EVENTS``)."""
        return self.runtime.counters

    @property
    def pending(self) -> PendingWrites:
        """This process's ledger writes waiting for the ledger (journaled in a worker)."""
        return self.runtime.pending

    @property
    def outbox(self) -> Outbox:
        """This process's outbox: stages tasks and publishes them right after the commit."""
        return self.runtime.outbox

    # -- the way back -------------------------------------------------------------------------
    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        """See :meth:`CeleryPublisher.publish`."""
        self.publisher.publish(record, reason=reason)

    def publish_many(self, records: Sequence[JobRecord]) -> Published:
        """See :meth:`CeleryPublisher.publish_many`."""
        return self.publisher.publish_many(records)

    def broker_queue(self, record: JobRecord) -> str | None:
        return self.publisher.broker_queue(record)

    def ready_messages(self, queue: str) -> int | None:
        return self.publisher.ready_messages(queue)

    # -- which tasks ----------------------------------------------------------------------
    def is_tracked(self, name: str, headers: Mapping[str, Any] | None = None) -> bool:
        """The task's own ``tracked`` option wins; else ``track_all``, or the publisher's say."""
        task = self.app.tasks.get(name)
        declared = getattr(task, "tracked", None) if task is not None else None
        if declared is not None:
            return bool(declared)
        if headers is not None and headers.get(TRACKED_HEADER):
            return True
        return self.track_all and not name.startswith("celery.")

    def wrap_tasks(self, tasks_: Iterable[Task] | None = None) -> None:
        """Give every tracked task the claim guard (idempotent; called at finalize and boot)."""
        for task in list(self.app.tasks.values()) if tasks_ is None else tasks_:
            if self.is_tracked(task.name):
                self.orphan_policy(task.name)  # a misspelt policy fails at boot, not at a crash
                tasks.wrap(self, task)

    def orphan_policy(self, name: str) -> OrphanPolicy:
        """What a job of task ``name`` becomes if its worker dies while it runs: the task's
        ``on_orphan`` option, else ``JOBLEDGER_ON_ORPHAN``. :class:`ConfigError` if the task
        names an unknown policy."""
        declared = getattr(self.app.tasks.get(name), "on_orphan", None)
        if declared is None:
            return self.settings.on_orphan
        try:
            return OrphanPolicy.parse(declared)
        except ConfigError as exc:
            raise ConfigError(f"task {name}: {exc}") from None

    def with_policy(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with the task's orphan policy, recorded so that any recoverer applies
        it without the task's code (the default needs no entry)."""
        policy = self.orphan_policy(name)
        if policy is not OrphanPolicy.REQUEUE:
            options[ORPHAN_OPTION] = policy.value
        return options

    def delivered(
        self, *, name: str, queue: str | None, options: dict[str, Any], **message: Any
    ) -> JobRecord:
        """The record a delivery describes, its task's orphan policy included (see
        :func:`~jobledger.integrations.celery.messages.delivered_record`)."""
        return delivered_record(
            name=name,
            queue=str(queue or self.app.conf.task_default_queue),
            options=self.with_policy(name, options),
            **message,
        )

    # -- staging (the outbox) -------------------------------------------------------------
    def stages_apply_async(self, task: Task, options: Mapping[str, Any]) -> bool:
        """True if this ``apply_async`` should stage (``JOBLEDGER_STAGE_IN_ATOMIC``): the task
        is tracked and does not opt out (``staged=False``), the call has only options a staged
        job keeps (a chain's or a group's member does not), Celery is not eager, it is no retry
        or ``Task.replace`` of a running job, and a Django atomic block is open on the default
        database. Otherwise it publishes as it did before jobledger."""
        if not self.settings.stage_in_atomic or not self.is_tracked(task.name):
            return False
        beyond = sorted(k for k, v in options.items() if k not in STAGED_OPTIONS and v is not None)
        if beyond:  # a chain's or group's member, custom headers...: published as before
            log.debug("%s.apply_async(%s) published, not staged", task.name, ", ".join(beyond))
            return False
        if getattr(task, "staged", None) is False or self.app.conf.task_always_eager:
            return False
        job_id = options.get("task_id")
        if job_id is not None and self.runtime.guard.running(str(job_id)) is not None:
            return False
        from jobledger.contrib.django import in_atomic_block

        return in_atomic_block()

    def stage(
        self,
        task: Task | str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        using: object | None = None,
        unique_key: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Stage ``task`` (a task of this app, or its name) in the transaction of ``using``
        (a SQLAlchemy Session or Connection, a Django alias; default: the one bound with
        :func:`jobledger.staging_in` or the open Django atomic block, else the ledger's
        own connection, committed at once). Returns the job's result handle at once; the job
        is published right after the commit (or by the relay), with its countdown or eta kept.
        ``options`` are ``apply_async``'s. With ``unique_key``, while an unfinished job holds
        the key nothing is staged and that job's handle is returned.
        :class:`~jobledger.errors.StagingError` for an unknown task, a bad option or no usable
        transaction; nothing is written then."""
        record = self._staged(task, args, kwargs, options, unique_key)
        return self.app.AsyncResult(self.outbox.stage(record, using))

    def publish_unique(
        self,
        task: Task | str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        unique_key: str,
        **options: Any,
    ) -> AsyncResult:
        """``apply_async(..., unique_key=...)``: the record, holding the key, is written
        before the message exists (the ledger's compare decides, so of concurrent publishes
        one goes out), then published at once (:meth:`Outbox.publish_now`). While an
        unfinished job holds the key, nothing is published and that job's handle is
        returned. A ledger that is down cannot say who holds the key: the task is published
        as without a key (unrecorded, its record written later without the key), since
        running a job twice beats dropping it. Options are those a staged task takes."""
        record = self._staged(task, args, kwargs, options, unique_key)
        try:
            return self.app.AsyncResult(self.outbox.publish_now(record))
        except StoreError as exc:  # the publish hook counts it unrecorded
            log.warning(
                "job %s (%s): the ledger is unavailable, so unique key %r is not checked; "
                "published without it: %s",
                record.id,
                record.name,
                unique_key,
                exc,
            )
        found = self.app.tasks[record.name] if isinstance(task, str) else task
        return found.apply_async(args, kwargs, **{**options, "task_id": record.id})

    def _staged(
        self,
        task: Task | str,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        unique_key: str | None,
    ) -> JobRecord:
        """The staged record of a call, its orphan policy and unique key included."""
        record = staged_record(self.app, task, args, kwargs, options)
        if not self.is_tracked(record.name):
            raise StagingError(
                f"task {record.name} is not tracked, so no worker would claim or finish its "
                "staged job: declare it @app.task(tracked=True) (or install with track_all=True)"
            )
        policy = self.with_policy(record.name, dict(record.options))
        return replace(record, options=policy, unique_key=unique_key)

    def stage_signature(self, signature: Signature, *, using: object | None = None) -> AsyncResult:
        """Stage a signature (``task.s(...)``, ``task.signature(..., countdown=60)``)."""
        name, args, kwargs, options = signature_parts(signature)
        return self.stage(name, args, kwargs, using=using, **options)

    # -- connecting -----------------------------------------------------------------------
    def connect(self) -> None:
        """Connect the signal receivers (weakly held by Celery, so bound to this object)."""
        hooks = self.hooks
        pairs: list[tuple[Any, Callable[..., Any]]] = [
            (signals.before_task_publish, self.recorder.on_before_publish),
            (signals.task_failure, hooks.on_task_failure),
            (signals.task_revoked, hooks.on_task_revoked),
            (signals.task_received, hooks.on_task_received),
            (signals.worker_init, hooks.on_worker_init),
            (signals.worker_ready, hooks.on_worker_ready),
            (signals.worker_shutting_down, hooks.on_worker_shutting_down),
            (signals.worker_shutdown, hooks.on_worker_shutdown),
            (signals.worker_process_init, hooks.on_worker_process_init),
        ]
        self._receivers = pairs
        for signal, receiver in pairs:
            signal.connect(receiver, weak=False)
        self.app.on_after_finalize.connect(self._on_finalize, weak=False)
        tasks.by_app[self.app] = self  # task.stage() finds the integration of its task's app

    def _on_finalize(self, sender: Any = None, **_: Any) -> None:
        self.wrap_tasks()

    def disconnect(self) -> None:
        """Undo :meth:`connect` and leave the registry (tests; a process with two apps)."""
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self.app.on_after_finalize.disconnect(self._on_finalize)
        registry.unregister(self.system, self)
        if tasks.by_app.get(self.app) is self:
            del tasks.by_app[self.app]

    def close(self) -> None:
        """Disconnect, stop replaying pending writes and close this process's stores."""
        self.disconnect()
        self.runtime.close()


def install(
    app: Celery,
    store: Store | None = None,
    settings: Settings | None = None,
    *,
    track_all: bool = False,
    store_factory: Callable[[], Store] | None = None,
) -> CeleryIntegration:
    """Track ``app``'s tasks in the ledger and register the integration for restarts and
    recovery. ``store`` serves this process only; forked pool children open their own through
    ``store_factory`` (default: the settings' database URL)."""
    settings = settings or Settings.from_env()
    if settings.stage_in_atomic:
        try:
            import jobledger.contrib.django  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"JOBLEDGER_STAGE_IN_ATOMIC needs Django ({exc}): pip install 'jobledger[django]'"
            ) from None
    integration = CeleryIntegration(
        app, settings, store=store, store_factory=store_factory, track_all=track_all
    )
    integration.connect()
    if app.finalized:
        integration.wrap_tasks()
    registry.register(integration)
    tasks.add_task_methods()
    return integration


def install_for_broker(broker: str, settings: Settings | None = None) -> CeleryIntegration:
    """The integration on a bare Celery app of ``broker``: enough to publish jobs by task name
    (recovery, restart, ``jobledger recover --broker``) in a process without the task code."""
    app = Celery("jobledger", broker=broker, set_as_current=False)
    return install(app, settings=settings)
