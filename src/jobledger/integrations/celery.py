# mypy: disable-error-code="import-untyped"
"""The Celery integration: every tracked task gets a ledger record, a claim guard and recovery.

``install(app)`` connects it. A task is tracked when declared ``@app.task(tracked=True)``, or
with ``track_all=True`` unless declared ``tracked=False`` (Celery's own ``celery.*`` tasks never
are). From then on:

- **publish** (client side, ``before_task_publish``): a ``queued`` record with name, args,
  kwargs, queue and the options needed to publish it again, and an enqueue timestamp header.
  A ledger that is down costs a warning and a counter, never the publish (invariant 7); the
  worker creates the missing record at claim.
- **run** (pool process): the task class's ``__call__`` claims the job first (invariant 2). A
  duplicate delivery raises :class:`~celery.exceptions.Ignore`: acknowledged, body not run,
  no result stored over the real one. A failed or dead job runs again only from a restart's
  message (:data:`RESTART_HEADER`); any other delivery of it (a broker's stray redelivery) is
  skipped the same way. Success, failure, retry, ``Task.replace``, revoke, a lost pool process
  (``WorkerLostError``) and a hard time limit (``TimeLimitExceeded``) are recorded.
  ``__call__`` is used and not ``task_prerun`` because a signal receiver cannot stop the body:
  Celery logs and swallows its exceptions.
- **worker** (main process): the heartbeat thread and the recovery loop.

**One instance per worker, not per pool child.** The main process registers the instance
before the pool forks, beats for it and drains it at warm shutdown; children inherit its id and
claim as that instance. So liveness means "this worker's main process is alive"; a child that
dies under a job is noticed at once by the main process (``WorkerLostError``), which recovers
that one job itself instead of waiting a TTL. Per-child instances would multiply heartbeat
writes by the concurrency, beat from processes whose job code may hold the GIL, and still need
the main process to notice a dead child. Children learn whether the instance can claim
(invariant 9) from shared memory the main process's heartbeat writes, not from a ledger read.

Celery settings that pair with it: ``task_acks_late=True``: with early acks Celery acks a
message when a pool process accepts it, a moment *before* the claim, so a kill in between loses
the message while the ledger still says ``queued`` (visible as lag, but not an orphan the sweep
would recover); late acks keep the message until the job's outcome is recorded, and the claim
guard skips the redelivered copy of a job that ran. Leave ``task_reject_on_worker_lost`` off
(the ledger puts a lost job back itself, with the poison-pill cap the broker's requeue lacks).
A long Redis ``visibility_timeout`` is safe for running jobs (a redelivered running job is
skipped by the claim guard), but it is also how long Redis keeps the messages a killed worker
had *prefetched* and not started; keep ``worker_prefetch_multiplier`` low.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, NoReturn, cast

from amqp.exceptions import IrrecoverableChannelError, NotFound
from celery import Celery, Task, signals
from celery.app.trace import task_has_custom
from celery.canvas import Signature
from celery.exceptions import (
    Ignore,
    QueueNotFound,
    Reject,
    Retry,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery.result import AsyncResult
from kombu.exceptions import ContentDisallowed, EncodeError

from jobledger.config import Settings
from jobledger.counters import SharedCounters
from jobledger.errors import (
    ConfigError,
    JobLedgerError,
    MessageRefused,
    PublishError,
    SchemaMissing,
    StagingError,
)
from jobledger.heartbeat import Health, Heartbeat, new_instance
from jobledger.integrations.base import Published, registry
from jobledger.integrations.celery_staging import (
    STAGED_OPTIONS,
    SYSTEM,
    signature_parts,
    staged_record,
)
from jobledger.journal import Journal, replay_orphans
from jobledger.lifecycle import Claim, Lifecycle
from jobledger.loop import Loop
from jobledger.model import ORPHAN_OPTION, JobRecord, JobState, OrphanPolicy, Republish
from jobledger.outbox import Outbox
from jobledger.pending import CreateWrite, PendingWrites, TransitionWrite
from jobledger.query import JobQuery
from jobledger.recovery import Recovery, RecoveryLoop
from jobledger.relay import Relay, RelayLoop
from jobledger.stores import Store, store_for
from jobledger.stores.base import ANY, KEEP, StagedBatch, Transition
from jobledger.tracebacks import task_traceback

log = logging.getLogger(__name__)

#: Message header with the client's enqueue time (epoch seconds); Celery messages carry none.
ENQUEUED_HEADER = "jobledger_enqueued_at"
#: Message header saying the publisher tracked the job.
TRACKED_HEADER = "jobledger_tracked"
#: Message header of a restart's publish: only such a delivery may start a failed or dead job
#: (for workers from before generations; a current worker reads the generation).
RESTART_HEADER = "jobledger_restart"
#: Message header with the job's fencing generation at this publish (invariant 2).
GENERATION_HEADER = "jobledger_generation"
#: Message header saying why jobledger published the job again (a :class:`Republish` value).
REPUBLISH_HEADER = "jobledger_republish"
#: Set on a message whose record the ledger could not take at publish (it was down): the
#: worker that receives it writes the record.
UNRECORDED_HEADER = "jobledger_unrecorded"
#: The publish options a record keeps, all that :meth:`CeleryIntegration.publish` passes on
#: (``send_task`` keywords; ``link``/``link_error``/``chain``/``chord`` are the message's embed).
REPUBLISH_OPTIONS = (
    "exchange",
    "routing_key",
    "priority",
    "eta",
    "expires",
    "retries",
    "time_limit",
    "soft_time_limit",
    "link",
    "link_error",
    "chain",
    "chord",
)
#: Where ``send_task`` keywords are found in a message's embed (``body[2]``).
_EMBED_OPTIONS = {"callbacks": "link", "errbacks": "link_error", "chain": "chain", "chord": "chord"}
_RESTARTED = frozenset({JobState.FAILED, JobState.DEAD})
_WRAPPED = "_jobledger_wrapped"

_STARTED = frozenset({JobState.STARTED})
#: What Celery raises for a message it refuses itself, every time: no such queue, arguments its
#: serializer cannot encode. Only these fail the job; anything else (a broker down, full, read
#: only, refusing access) is an outage the relay waits out, since failing a whole backlog for
#: it would be wrong.
_REFUSALS = (QueueNotFound, EncodeError, ContentDisallowed)
#: Publishes of jobs that are in the ledger already (relay, recovery, restart) try the broker
#: once more after a connection error, then leave the job to the next relay pass or sweep.
_REPUBLISH_RETRY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 0.5,
}


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
        # made before any fork, so the heartbeat reports what the pool processes counted
        self.counters = SharedCounters(WORKER_EVENTS)
        self._factory = store_factory or (lambda: store_for(settings))
        self._stores: dict[int, Store] = {} if store is None else {os.getpid(): store}
        self._stores_lock = threading.Lock()
        self._pending: dict[int, PendingWrites] = {}
        self.journal: Journal | None = None  # a worker's, opened before the pool forks
        self.journal_loop: Loop | None = None
        self.audit_loop: Loop | None = None
        self.consumption: _Consumption | None = None
        # Created before any fork so pool children read what the main process's thread writes.
        self.health = Health(settings.ttl)
        self.instance_id: str | None = None
        self.heartbeat: Heartbeat | None = None
        self.recovery_loop: RecoveryLoop | None = None
        self.relay_loop: RelayLoop | None = None
        self._outboxes: dict[int, Outbox] = {}
        self._republishing = threading.local()  # set while publishing a staged job
        self._recorded = threading.local()  # ids recorded by the apply_async under way
        # jobs this process claimed and runs now: their task name, replacement nesting and
        # the generation of the run
        self._claimed: dict[str, tuple[str, int, int | None]] = {}
        # main process: tracked jobs received from the broker, as records to put back if the
        # pool process they were handed to dies before its claim lands
        self._received: dict[str, JobRecord] = {}
        self._missing: set[str] = set()  # of those, the ones Celery did not hold at last look
        self._unheld: dict[str, int] = {}  # started here, held by no process at last audit
        self._retrying: set[str] = set()  # of those, the ones already moved to retrying
        self._receivers: list[tuple[Any, Callable[..., Any]]] = []

    # -- the ledger, one store per process (a forked child must not share its parent's pool) --
    @property
    def store(self) -> Store:
        pid = os.getpid()
        with self._stores_lock:
            found = self._stores.get(pid)
            if found is None:
                found = self._stores[pid] = self._factory()
            return found

    @property
    def pending(self) -> PendingWrites:
        """This process's ledger writes waiting for the ledger (invariant 7): in a worker, in
        the journal all its processes share, replayed by the main process's journal loop; in
        any other process, in memory."""
        pid = os.getpid()
        with self._stores_lock:
            found = self._pending.get(pid)
            if found is None:
                found = self._pending[pid] = PendingWrites(
                    lambda: self.store, log=self.journal, replay_on_add=self.journal is None
                )
            return found

    @property
    def outbox(self) -> Outbox:
        """This process's outbox: stages tasks and publishes them right after the commit."""
        pid = os.getpid()
        with self._stores_lock:
            found = self._outboxes.get(pid)
        if found is None:
            found = Outbox(self.store, publish=self.publish_many)
            with self._stores_lock:
                found = self._outboxes.setdefault(pid, found)
        return found

    def lifecycle(self) -> Lifecycle:
        assert self.instance_id is not None
        return Lifecycle(
            self.store,
            self.instance_id,
            self.settings.ttl,
            delete_on_success=self.settings.keep_succeeded == 0,
            pending=self.pending,
            max_recoveries=self.settings.max_recoveries,
            recovery_window=self.settings.recovery_window,
        )

    def recovery(self) -> Recovery:
        """Recovery of this system's orphans only: another system's job published as a Celery
        task would be lost."""
        return Recovery.from_settings(
            self.store,
            self.settings,
            publish=self.publish,
            systems={SYSTEM},
            ledger_up_for=lambda: self.health.up_for,
            probe=lambda system: self if system == SYSTEM else None,
        )

    def broker_queue(self, record: JobRecord) -> str | None:
        """Where the job's message waits (:class:`QueueProbe`): its queue, unless it was
        routed through a named exchange, whose bindings this process does not know."""
        return None if record.options.get("exchange") else record.queue

    def ready_messages(self, queue: str) -> int | None:
        """Messages the broker holds ready in ``queue`` (:class:`QueueProbe`): kombu's own
        count on its virtual transports (Redis, including priority lists), a passive
        declare on AMQP; 0 for a queue the broker does not have; None if it cannot tell."""
        try:
            with self.app.connection_for_read() as connection:
                channel = connection.default_channel
                size = getattr(channel, "_size", None)  # kombu's virtual transports
                if size is not None:
                    return int(size(queue))
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except NotFound:
            return 0
        except Exception as exc:
            log.debug("cannot count the messages in queue %s: %s", queue, exc)
            return None

    def _count(self, name: str) -> None:
        self.counters.add(name)

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

    def wrap_tasks(self, tasks: Iterable[Task] | None = None) -> None:
        """Give every tracked task the claim guard (idempotent; called at finalize and boot)."""
        for task in list(self.app.tasks.values()) if tasks is None else tasks:
            if self.is_tracked(task.name):
                self.orphan_policy(task.name)  # a misspelt policy fails at boot, not at a crash
                self._wrap(task)

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

    def _with_policy(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with the task's orphan policy, recorded so that any recoverer applies
        it without the task's code (the default needs no entry)."""
        policy = self.orphan_policy(name)
        if policy is not OrphanPolicy.REQUEUE:
            options[ORPHAN_OPTION] = policy.value
        return options

    def _wrap(self, task: Task) -> None:
        cls = type(task)
        if cls.__dict__.get(_WRAPPED):
            return
        custom: Callable[..., Any] | None = (
            cls.__call__ if task_has_custom(task, "__call__") else None
        )
        integration = self

        def __call__(self: Task, *args: Any, **kwargs: Any) -> Any:
            def body() -> Any:
                return custom(self, *args, **kwargs) if custom else self.run(*args, **kwargs)

            request = self.request
            if request.called_directly or request.is_eager:
                return (
                    custom(self, *args, **kwargs)
                    if custom
                    else Task.__call__(self, *args, **kwargs)
                )
            return integration.run_guarded(self, body)

        replace_with = cls.on_replace

        def on_replace(self: Task, sig: Signature) -> Any:
            integration.on_replace(self, sig)
            return replace_with(self, sig)

        cls.__call__ = __call__
        cls.on_replace = on_replace
        setattr(cls, _WRAPPED, True)

    def on_replace(self, task: Task, sig: Signature) -> None:
        """``Task.replace``: the job's id passes to the replacement (the signature itself, or
        a chain's last step, published later by the step before it, from another process).
        The job moves to retrying now, before anything is published, and the step that
        carries its id is tagged with the run's generation, so that its delivery is the job's
        current message and not a stale one."""
        job_id = str(task.request.id)
        running = self._claimed.get(job_id)
        if running is None:
            return
        if job_id not in self._retrying:
            self._moved_to_retrying(job_id, f"replaced by {sig!r} (Task.replace)")
        steps = getattr(sig, "tasks", None) or [sig]
        for step in steps:
            if step.options.get("task_id") == job_id:
                headers = {**(step.options.get("headers") or {}), TRACKED_HEADER: True}
                headers[GENERATION_HEADER] = running[2]
                step.set(headers=headers)

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
        if options.get("task_id") in self._claimed:
            return False
        from jobledger.contrib.django import in_atomic_block

        return in_atomic_block()

    # -- staging (the outbox) -------------------------------------------------------------
    def stage(
        self,
        task: Task | str,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        using: object | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Stage ``task`` (a task of this app, or its name) in the transaction of ``using``
        (a SQLAlchemy Session or Connection, a Django alias; default: the one bound with
        :func:`jobledger.outbox.staging_in` or the open Django atomic block, else the ledger's
        own connection, committed at once). Returns the job's result handle at once; the job
        is published right after the commit (or by the relay), with its countdown or eta kept.
        ``options`` are ``apply_async``'s. :class:`~jobledger.errors.StagingError` for an
        unknown task, a bad option or no usable transaction; nothing is written then."""
        record = staged_record(self.app, task, args, kwargs, options)
        if not self.is_tracked(record.name):
            raise StagingError(
                f"task {record.name} is not tracked, so no worker would claim or finish its "
                "staged job: declare it @app.task(tracked=True) (or install with track_all=True)"
            )
        record = replace(record, options=self._with_policy(record.name, dict(record.options)))
        self.outbox.stage(record, using)
        return self.app.AsyncResult(record.id)

    def stage_signature(self, signature: Signature, *, using: object | None = None) -> AsyncResult:
        """Stage a signature (``task.s(...)``, ``task.signature(..., countdown=60)``)."""
        name, args, kwargs, options = signature_parts(signature)
        return self.stage(name, args, kwargs, using=using, **options)

    # -- publishing ---------------------------------------------------------------------
    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        """Send the job again with its id, name, args, kwargs, queue and options, and its
        generation and ``reason`` in headers. A failed or dead job's message also says it is a
        restart, for workers from before generations."""
        self._send(record, reason=reason)

    def publish_many(self, records: Sequence[JobRecord]) -> Published:
        """Publish in order through one broker connection; stop at the first refusal.

        An AMQP broker answers a bad message (to an exchange that does not exist) by closing
        the channel, later, and drops what follows on it without a word; so each batch ends
        with a round trip on its channel. If the channel was closed, nothing of the batch
        counts as sent, and it goes again one message at a time: a message whose exchange does
        not exist is refused alone (the others may arrive twice; the claim guard runs them
        once); any other closing reason (access refused) stops the batch as an outage."""
        try:
            return self._publish_batch(records)
        except _ChannelClosed as exc:
            log.warning(
                "the broker closed the channel during a batch (%s): sending it again one job "
                "at a time",
                exc.__cause__,
            )
        done = Published()
        for record in records:
            try:
                part = self._publish_batch([record])
            except _ChannelClosed as exc:
                if not isinstance(exc.__cause__, NotFound):  # access refused...: not this job's
                    done.error = PublishError(f"the broker closed the channel: {exc.__cause__}")
                    break
                done.refused[record.id] = f"the broker closed the channel: {exc.__cause__}"
                continue
            if done.add(part):
                break
        return done

    def _publish_batch(self, records: Sequence[JobRecord]) -> Published:
        done = Published()
        try:
            with self.app.producer_or_acquire() as producer:
                for record in records:
                    try:
                        self._send(record, producer)
                    except MessageRefused as exc:
                        done.refused[record.id] = str(exc)
                        continue
                    done.ids.append(record.id)
                _round_trip(producer)
        except _ChannelClosed:
            raise
        except PublishError as exc:
            if isinstance(exc.__cause__, IrrecoverableChannelError):  # closed over an earlier one
                raise _ChannelClosed() from exc.__cause__
            done.error = exc
        except Exception as exc:  # acquiring the connection failed
            done.error = PublishError(f"celery could not reach the broker: {exc}")
        return done

    def _send(
        self, record: JobRecord, producer: Any = None, *, reason: Republish | None = None
    ) -> None:
        options = {
            k: record.options[k] for k in REPUBLISH_OPTIONS if record.options.get(k) is not None
        }
        headers: dict[str, Any] = {TRACKED_HEADER: True, GENERATION_HEADER: record.generation}
        if reason is not None:
            headers[REPUBLISH_HEADER] = reason.value
        if record.state in _RESTARTED:
            headers[RESTART_HEADER] = True
        # Only a staged job's publish skips the record at publish: a recovery's or restart's
        # keeps it, whose timing the own-redelivery grace of claims was tuned against (skipping
        # it there made the poison-pill e2e test lose its last message in 3 runs of 6).
        self._republishing.active = producer is not None
        try:
            self.app.send_task(
                record.name,
                args=record.args,
                kwargs=record.kwargs,
                task_id=record.id,
                queue=record.queue,
                headers=headers,
                producer=producer,
                retry_policy=_REPUBLISH_RETRY,
                **options,
            )
        except Exception as exc:
            refusal = MessageRefused if isinstance(exc, _REFUSALS) else PublishError
            raise refusal(f"celery did not take job {record.id} ({record.name}): {exc}") from exc
        finally:
            self._republishing.active = False

    def on_before_publish(
        self,
        sender: str | None = None,
        body: Any = None,
        exchange: Any = None,
        routing_key: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
        declare: list[Any] | None = None,
        **_: Any,
    ) -> None:
        if headers is None or "id" not in headers:
            return  # protocol 1 or not a task message: nothing we can track
        name = str(headers.get("task") or sender)
        if not self.is_tracked(name, headers):
            return
        job_id = str(headers["id"])
        headers[TRACKED_HEADER] = True
        headers.setdefault(ENQUEUED_HEADER, time.time())
        if getattr(self._republishing, "active", False):
            return  # a staged job the relay or fast path publishes: the ledger has it
        running = self._claimed.get(job_id)
        if running is not None:
            headers[GENERATION_HEADER] = running[2]  # a retry continues the run's generation
            if job_id not in self._retrying:
                # a retry or Task.replace: retrying *before* the message exists
                self._moved_to_retrying(job_id, self._replacement(job_id, name, headers))
        else:
            headers.setdefault(GENERATION_HEADER, 0)  # a first publish (or one we made)
        args, kwargs = (
            (body[0], body[1]) if isinstance(body, (tuple, list)) and len(body) >= 2 else ([], {})
        )
        queue = _queue_name(declare, routing_key)
        try:
            options = self._with_policy(
                name, _republish_options(body, exchange, routing_key, headers, properties or {})
            )
            record = JobRecord(
                id=job_id,
                name=name,
                system=SYSTEM,
                queue=queue,
                args=list(args),
                kwargs=dict(kwargs),
                options=options,
            )
        except JobLedgerError as exc:
            self._unrecorded(job_id, name, headers, exc, None)
            return
        try:
            if self.store.create(record):  # False: it exists (a retry, a recovery, a restart)
                recorded = getattr(self._recorded, "ids", None)
                if recorded is not None:
                    recorded.append(job_id)
        except JobLedgerError as exc:
            self._unrecorded(job_id, name, headers, exc, record)

    def _unrecorded(
        self,
        job_id: str,
        name: str,
        headers: dict[str, Any],
        exc: JobLedgerError,
        record: JobRecord | None,
    ) -> None:
        """The ledger could not take the record at publish: the message says so, so the
        worker that receives it writes the record, and this process writes it too once the
        ledger is back. Either keeps a job the broker then loses recoverable, where before it
        existed only as its message."""
        headers[UNRECORDED_HEADER] = True
        self._count("publish_unrecorded")
        log.warning("job %s (%s) published but not recorded yet: %s", job_id, name, exc)
        if record is not None:
            self.pending.add(CreateWrite(record))

    @contextlib.contextmanager
    def publishing(self) -> Iterator[None]:
        """Around ``apply_async``: if the publish raises after the record was written, the
        caller was told the job was not queued, so the record says so too (cancelled, with
        the error) instead of waiting as ``queued`` for a message that may never exist, and
        that the lost-message sweep would otherwise publish behind the caller's back."""
        outer = getattr(self._recorded, "ids", None)
        ids: list[str] = []
        self._recorded.ids = ids
        try:
            yield
        except Exception as exc:
            for job_id in ids:
                self._unpublished(job_id, exc)
            raise
        finally:
            self._recorded.ids = outer

    def _unpublished(self, job_id: str, exc: Exception) -> None:
        change = Transition(
            to=JobState.CANCELLED,
            expect=frozenset({JobState.QUEUED}),
            expect_owner=None,
            expect_generation=0,
            error=f"not queued: its publish failed and the caller was told ({exc!r})",
        )
        self.pending.submit(TransitionWrite(job_id, change))

    def _replacement(self, job_id: str, name: str, headers: Mapping[str, Any]) -> str | None:
        """The reason if this publish of a running job is ``Task.replace`` (another task, or a
        deeper replacement nesting, under the same id), not a retry."""
        running, nesting, _ = self._claimed[job_id]
        if name == running and int(headers.get("replaced_task_nesting") or 0) <= nesting:
            return None
        return f"replaced by task {name} (Task.replace), which runs under the same job id"

    def _moved_to_retrying(self, job_id: str, replaced: str | None = None) -> None:
        error = sys.exc_info()[1]
        text = replaced or (f"retry: {error!r}" if error is not None else "retry requested")
        generation = self._claimed[job_id][2]
        try:
            if self.lifecycle().fail(job_id, text, will_retry=True, generation=generation):
                self._retrying.add(job_id)
        except JobLedgerError as exc:
            self._count("finish_unrecorded")
            log.warning("job %s retry not recorded: %s", job_id, exc)

    # -- running (in the pool process) ----------------------------------------------------
    def run_guarded(self, task: Task, body: Callable[[], Any]) -> Any:
        request = task.request
        job_id = str(request.id)
        if self.instance_id is None:
            self._count("run_unguarded")
            return body()  # not a worker started with our hooks: nothing to claim as
        record = self._record_from_request(task)
        generation = _generation_of(getattr(request, GENERATION_HEADER, None))
        lifecycle = self.lifecycle()
        try:
            claim = lifecycle.claim(
                job_id,
                record,
                restart=bool(getattr(request, RESTART_HEADER, False)),
                generation=generation,
                republish=_republish_of(getattr(request, REPUBLISH_HEADER, None)),
            )
        except JobLedgerError as exc:
            self._count("claim_unrecorded")
            log.warning("job %s runs unclaimed, the ledger is unavailable: %s", job_id, exc)
            return body()  # at least once beats not at all
        if claim is Claim.DEFERRED:
            self._count("claim_deferred")
        if not claim.should_run:
            self._count(_SKIP_COUNTERS.get(claim, "duplicates_skipped"))
            log.warning("job %s (%s) not run: %s", job_id, task.name, claim.value)
            raise Ignore()
        nesting = int(request.get("replaced_task_nesting") or 0)
        self._claimed[job_id] = (task.name, nesting, generation)
        g = generation
        try:
            result = body()
        except Retry:
            if job_id not in self._retrying:
                self._finish(lambda: lifecycle.fail(job_id, "retry", will_retry=True, generation=g))
            raise
        except Ignore:
            if job_id not in self._retrying:  # else replaced: the replacement finishes the job
                self._finish(lambda: lifecycle.succeed(job_id, generation=g))
            raise
        except Reject as rejection:
            if rejection.requeue:
                self._finish(lambda: lifecycle.release(job_id, generation=g))
            elif job_id in self._retrying:  # Task.retry could not publish its message
                why = f"its retry could not be sent: {rejection!r}"
                self._finish(lambda: lifecycle.fail_unsent_retry(job_id, why, generation=g))
            else:
                why = f"rejected: {rejection!r}"
                self._finish(lambda: lifecycle.fail(job_id, why, will_retry=False, generation=g))
            raise
        except Exception as exc:
            error = task_traceback(exc, wrappers=("celery",))
            if job_id in self._retrying:  # moved to retrying, then the retry's publish failed
                self._finish(lambda: lifecycle.fail_unsent_retry(job_id, error, generation=g))
            else:
                self._finish(lambda: lifecycle.fail(job_id, error, will_retry=False, generation=g))
            raise
        finally:
            self._claimed.pop(job_id, None)
            self._retrying.discard(job_id)
        self._finish(lambda: lifecycle.succeed(job_id, generation=g))
        return result

    def _finish(self, write: Callable[[], object]) -> None:
        """A finish write: kept and replayed by :attr:`pending` if the ledger is down."""
        try:
            write()
        except JobLedgerError as exc:  # not a ledger outage (those are deferred): a bug
            self._count("finish_unrecorded")
            log.warning("a job's end could not be recorded: %s", exc)

    def _record_from_request(self, task: Task) -> JobRecord:
        request = task.request
        delivery = request.delivery_info or {}
        headers = {
            name: getattr(request, name, None)
            for name in (ENQUEUED_HEADER, GENERATION_HEADER, "eta", "expires", "retries")
        }
        headers["timelimit"] = request.timelimit
        embed = {key: getattr(request, key, None) for key in _EMBED_OPTIONS}
        return self._delivered_record(
            job_id=str(request.id),
            name=task.name,
            queue=delivery.get("routing_key") or task.queue,
            args=request.args,
            kwargs=request.kwargs,
            headers=headers,
            options=_republish_options(
                (request.args, request.kwargs, embed),
                delivery.get("exchange"),
                delivery.get("routing_key"),
                headers,
                {"priority": delivery.get("priority")},
            ),
        )

    def _delivered_record(
        self,
        *,
        job_id: str,
        name: str,
        queue: str | None,
        args: Any,
        kwargs: Any,
        headers: Mapping[str, Any],
        options: dict[str, Any],
    ) -> JobRecord:
        """The record a delivery describes (its generation, the options to publish it again
        and its task's orphan policy included), for a claim that finds no record (the ledger
        was down at publish) and for putting the job back."""
        enqueued = headers.get(ENQUEUED_HEADER)
        queued_at = datetime.fromtimestamp(float(enqueued), tz=timezone.utc) if enqueued else None
        return JobRecord(
            id=job_id,
            name=name,
            system=SYSTEM,
            queue=str(queue or self.app.conf.task_default_queue),
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            queued_at=queued_at,
            first_queued_at=queued_at,
            generation=_generation_of(headers.get(GENERATION_HEADER)) or 0,
            options=self._with_policy(name, options),
        )

    # -- main-process hooks -------------------------------------------------------------------
    def on_task_failure(
        self,
        sender: Task | None = None,
        task_id: str | None = None,
        exception: BaseException | None = None,
        **_: Any,
    ) -> None:
        """Failures the pool process could not record, reported in the main process: a pool
        process died under a job (recover that job now: publish, then queued), or Celery killed
        it at the hard time limit (the job failed; Celery does not retry it).

        This runs in the worker's event loop, so the ledger read and the publish happen in a
        thread of their own: a slow ledger or broker must not stall the loop (invariant 7).
        """
        if task_id is None or self.instance_id is None:
            return
        why = f"{type(exception).__name__}: {exception}"
        if isinstance(exception, WorkerLostError):
            # what was handed to the process, read now: Celery forgets it soon after
            delivered = self._received.pop(task_id, None)
            target: Callable[..., None] = self._recover_lost
            args: tuple[Any, ...] = (task_id, why, delivered)
        elif isinstance(exception, TimeLimitExceeded):
            target, args = self._fail_timed_out, (task_id, why)
        else:
            return  # raised in the pool process, which recorded it itself
        threading.Thread(
            target=target, args=args, name=f"jobledger-failed-{task_id}", daemon=True
        ).start()

    def _fail_timed_out(self, task_id: str, exception: str) -> None:
        """started → failed for the job whose pool process Celery killed at its hard time limit
        (the killed process recorded nothing); a job retrying meanwhile is left to its retry."""
        assert self.instance_id is not None
        change = Transition(
            to=JobState.FAILED,
            expect=_STARTED,
            expect_owner=self.instance_id,
            error=f"hard time limit exceeded, the pool process was killed ({exception})",
        )
        try:
            if self.store.transition(task_id, change):
                log.error("job %s failed: hard time limit exceeded", task_id)
        except JobLedgerError as exc:
            self._count("finish_unrecorded")
            log.warning("job %s hit its hard time limit, not recorded: %s", task_id, exc)

    def _recover_lost(self, task_id: str, exception: str, delivered: JobRecord | None) -> None:
        """Put back the job of a pool process that died under it (the main process knows
        what it handed that process): a job the process had claimed (started by this
        instance: recovered, as its task's orphan policy says), and one whose claim never
        landed (still queued or retrying at the delivery's generation: its body never ran, so
        it is requeued). What the dead process still owed the ledger (a journaled claim or
        finish) is replayed first, so the record judged is the one it left."""
        why = f"its pool process died: {exception}"
        try:
            settled = self.pending.flush(task_id)
            record = self.store.get(task_id) if settled else None
        except JobLedgerError:
            settled, record = False, None
        if not settled:
            if delivered is not None:
                self._put_back_unreachable(delivered, why)
            else:
                log.warning("job %s lost its process; the sweep will recover it", task_id)
            return
        if record is None or (delivered is not None and record.generation != delivered.generation):
            return  # republished meanwhile: that newer message is the job's
        try:
            if record.state is JobState.STARTED and record.owner == self.instance_id:
                self.recovery().recover(record, why=why)
            elif record.state in (JobState.QUEUED, JobState.RETRYING) and delivered is not None:
                self.recovery().requeue(record, why=why)
        except JobLedgerError as exc:
            log.warning("job %s lost its process; the sweep will recover it: %s", task_id, exc)

    def _put_back_unreachable(self, delivered: JobRecord, why: str) -> None:
        """The ledger is down, so whether the dead process's claim landed (and its body ran)
        is unknown. A job its task lets run again is published now as the next generation,
        from what its delivery said, as a recovery (it supersedes the run if the claim did
        land); one its task forbids to run twice is failed or discarded. Either way the
        ledger's move waits in the journal, after the dead process's own writes."""
        policy = OrphanPolicy.parse(delivered.options.get(ORPHAN_OPTION, OrphanPolicy.REQUEUE))
        if policy is OrphanPolicy.REQUEUE:
            after = replace(delivered, generation=delivered.generation + 1)
            try:
                self.publish(after, reason=Republish.RECOVERY)
            except PublishError as exc:
                log.error("job %s lost its process and cannot be put back now: %s", after.id, exc)
                return
            to, error, generation = JobState.QUEUED, None, after.generation
        else:
            to = JobState.FAILED if policy is OrphanPolicy.FAIL else JobState.CANCELLED
            error = (
                f"orphaned: {why} while the ledger was unreachable; it may have run, and its "
                f"task asks not to run it twice (on_orphan={policy.value})"
            )
            generation = None
        for source, owner in (
            (_STARTED, self.instance_id),
            (frozenset({JobState.QUEUED, JobState.RETRYING}), ANY),
        ):
            move = Transition(
                to=to,
                expect=source,
                expect_owner=owner,
                expect_generation=delivered.generation,
                generation=generation,
                reason="recovery" if to is JobState.QUEUED else None,
                error=KEEP if error is None else error,
            )
            self.pending.submit(TransitionWrite(delivered.id, move))
        log.warning("job %s: %s; ledger unreachable, %s journaled", delivered.id, why, to.value)

    def on_task_received(self, request: Any = None, **_: Any) -> None:
        """Main process: remember a tracked delivery (to put it back if its pool process
        dies before claiming it) and beat soon, so the ledger learns this instance holds it."""
        headers = getattr(request, "request_dict", None) or {}
        if not headers.get(TRACKED_HEADER) and not self.is_tracked(str(request.name)):
            return
        delivery = request.delivery_info or {}
        properties = getattr(getattr(request, "message", None), "properties", None) or {}
        self._received[str(request.id)] = self._delivered_record(
            job_id=str(request.id),
            name=str(request.name),
            queue=delivery.get("routing_key"),
            args=request.args,
            kwargs=request.kwargs,
            headers=headers,
            options=_republish_options(
                request._payload,
                delivery.get("exchange"),
                delivery.get("routing_key"),
                headers,
                properties,
            ),
        )
        if headers.get(UNRECORDED_HEADER):
            # Journaled, not written here: this is the worker's event loop. The claim replays
            # it first, so it can never land after the job's own later writes.
            self.pending.add(CreateWrite(self._received[str(request.id)]))
        if self.heartbeat is not None:
            self.heartbeat.wake()

    def _holding(self) -> list[tuple[str, int]]:
        """The tracked jobs this worker has received and not finished, with each delivery's
        generation (written with every beat; the sweep puts them back if it dies).

        A received job is forgotten once Celery no longer holds it, judged at two beats in a
        row: Celery reserves a request only after ``task_received`` fired, so one look could
        fall in between and forget a job just received."""
        live = _held_by_celery()
        if live is None:
            live = set(self._received)
        received = list(self._received.items())  # one atomic copy: the loop adds meanwhile
        missing = {job_id for job_id, _ in received if job_id not in live}
        for job_id in missing & self._missing:
            self._received.pop(job_id, None)  # finished: nothing to put back
        self._missing = missing
        return [(job_id, r.generation) for job_id, r in received]

    def _audit(self) -> None:
        """Recover the jobs the ledger says this worker runs that none of its processes
        holds, at two looks in a row (same generation): a pool process that died without
        Celery reporting it (billiard loses the report of a process killed before it
        acknowledged its job) would otherwise leave its job started by a live instance, where
        no sweep looks, for as long as the worker lives."""
        assert self.instance_id is not None
        live = _held_by_celery()
        if live is None:
            return
        query = JobQuery(states=_STARTED, owners=frozenset({self.instance_id}))
        started = self.store.query(query, limit=1000).items
        unheld = {r.id: r.generation for r in started if r.id not in live}
        for record in started:
            if record.id in unheld and self._unheld.get(record.id) == record.generation:
                self.recovery().recover(
                    record, why="no process of its worker holds it (its pool process died)"
                )
        self._unheld = unheld

    def on_task_revoked(
        self, request: Any = None, terminated: bool = False, expired: bool = False, **_: Any
    ) -> None:
        job_id = getattr(request, "id", None)
        if job_id is None or not self.is_tracked(str(getattr(request, "name", "") or "")):
            return
        reason = "expired" if expired else ("revoked and terminated" if terminated else "revoked")
        try:
            pending = Transition(
                to=JobState.CANCELLED,
                expect=frozenset({JobState.QUEUED, JobState.RETRYING, JobState.STAGED}),
                error=reason,
            )
            if not self.store.transition(job_id, pending) and self.instance_id is not None:
                running = Transition(
                    to=JobState.CANCELLED,
                    expect=_STARTED,
                    expect_owner=self.instance_id,
                    error=reason,
                )
                self.store.transition(job_id, running)
        except JobLedgerError as exc:
            self._count("finish_unrecorded")
            log.warning("job %s %s, not recorded: %s", job_id, reason, exc)

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        """Before the pool forks: open the journal, register the instance (so children claim
        as a live one), and replay what earlier workers left in the journal directory.

        An unmigrated ledger or an unusable journal directory ends the worker here with one
        line; an unreachable ledger is an outage: the worker starts and consumes nothing until
        the ledger answers (:class:`_Consumption`)."""
        from celery.worker import state as worker_state

        name = self.settings.name_of_instance(getattr(sender, "hostname", None))  # a@vm
        self.wrap_tasks()
        _install_fork_hooks()
        with self._stores_lock:
            pid = os.getpid()
            store = self._stores.get(pid) or self._factory()
            if store.serialize_across_fork:  # SQLite only: no lock on the other stores' calls
                store = cast(Store, _ForkGuardedStore(store))
            self._stores[pid] = store
            self._pending.pop(pid, None)  # from now on, this process's writes are journaled
        try:
            self.journal = Journal.for_instance(
                self.settings.journal_dir,
                name,
                limit=self.settings.journal_limit,
            )
        except ConfigError as exc:
            _exit_at_start(str(exc))
        queues: list[str] = []
        with contextlib.suppress(Exception):  # varies by version and options; only informative
            queues = sorted(self.app.amqp.queues.consume_from or self.app.amqp.queues)
        instance = new_instance(self.settings, queues, name=name)
        self.instance_id = instance.id
        self.consumption = _Consumption(self)
        self.heartbeat = Heartbeat(
            self.store,
            instance,
            interval=self.settings.heartbeat_interval,
            ttl=self.settings.ttl,
            in_flight=lambda: len(worker_state.active_requests),
            health=self.health,
            holding=self._holding,
            stats=self.counters.snapshot,
            on_beat=self.consumption.want,
        )
        self.heartbeat.start()
        if isinstance(self.heartbeat.last_error, SchemaMissing):
            self.heartbeat.halt()
            _exit_at_start(str(self.heartbeat.last_error))
        if self.heartbeat.last_error is not None:
            log.error(
                "jobledger instance %s cannot reach the ledger at start (%s): it consumes no "
                "jobs until the ledger answers",
                instance.id,
                self.heartbeat.last_error,
            )
        else:
            self._replay_journals()
        self.journal_loop = Loop("journal", self.settings.heartbeat_interval, self._replay_journals)
        self.journal_loop.start()
        self.audit_loop = Loop("audit", self.settings.heartbeat_interval, self._audit)
        self.recovery_loop = RecoveryLoop(
            self.recovery(),
            interval=self.settings.recovery_interval,
            enabled=lambda: self.health.can_claim,
        )
        log.info("jobledger instance %s registered (journal %s)", instance.id, self.journal.path)

    def _replay_journals(self) -> None:
        """The main process's replay: this worker's journal while it holds writes (its pool
        processes' and its predecessor's), then the journals in the same directory whose
        worker is gone."""
        assert self.journal is not None
        self.pending.flush()
        left = replay_orphans(self.journal, lambda: self.store)
        if left:
            log.warning("%d ledger writes of gone workers still wait for the ledger", left)

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        """The consumer runs (``sender``, in its event loop's thread): stop it at once if the
        ledger is out of reach, then start the loops."""
        if self.consumption is not None and sender is not None:
            self.consumption.attach(sender)
        if self.recovery_loop is not None:
            self.recovery_loop.start()
        if self.audit_loop is not None:
            self.audit_loop.start()
        if self.settings.relay and self.instance_id is not None:
            self.relay_loop = self._relay_loop()
            self.relay_loop.start()

    def _relay_loop(self) -> RelayLoop:
        """The worker's relay: Celery jobs only, on a store of its own so a batch's publishes
        do not hold up the heartbeat; on SQLite a batch holds the fork lock (see
        :class:`_ForkGuardedStore`)."""
        store = self._factory()
        if getattr(store, "dialect", None) == "sqlite":
            store = cast(Store, _ForkGuardedStore(store))
        relay = Relay.from_settings(
            store, self.settings, publish=self.publish_many, systems={SYSTEM}
        )
        return RelayLoop(
            relay,
            interval=self.settings.relay_interval,
            max_backoff=self.settings.relay_max_backoff,
            enabled=lambda: self.health.can_claim,
        )

    def on_worker_shutting_down(self, **_: Any) -> None:
        """Warm shutdown begins (in a signal handler): say draining, write nothing here."""
        if self.heartbeat is not None:
            self.heartbeat.mark_draining()
        if self.consumption is not None:
            self.consumption.detach()

    def on_worker_shutdown(self, **_: Any) -> None:
        """After Celery's warm shutdown waited for the pool: replay the journal once more,
        drain, then deregister. Writes the ledger did not take stay in the journal for the
        next start of this instance name, or any worker sharing the journal directory."""
        for loop in (self.recovery_loop, self.audit_loop, self.relay_loop, self.journal_loop):
            if loop is not None:
                loop.stop()
        if self.relay_loop is not None:
            self.relay_loop.relay.store.close()
        if self.journal is not None:
            try:
                self.pending.flush()
            except Exception:
                log.exception("replaying the journal at shutdown failed")
            if self.pending.holds():
                log.warning(
                    "%d ledger writes stay in the journal %s: the next worker of that name, "
                    "or any worker using that directory, replays them",
                    len(self.journal),
                    self.journal.path,
                )
        if self.heartbeat is not None:
            self.heartbeat.drain(timeout=self.settings.ttl)

    def on_worker_process_init(self, **_: Any) -> None:
        self._claimed.clear()
        self._retrying.clear()

    def connect(self) -> None:
        """Connect the signal receivers (weakly held by Celery, so bound to this object)."""
        pairs: list[tuple[Any, Callable[..., Any]]] = [
            (signals.before_task_publish, self.on_before_publish),
            (signals.task_failure, self.on_task_failure),
            (signals.task_revoked, self.on_task_revoked),
            (signals.task_received, self.on_task_received),
            (signals.worker_init, self.on_worker_init),
            (signals.worker_ready, self.on_worker_ready),
            (signals.worker_shutting_down, self.on_worker_shutting_down),
            (signals.worker_shutdown, self.on_worker_shutdown),
            (signals.worker_process_init, self.on_worker_process_init),
        ]
        self._receivers = pairs
        for signal, receiver in pairs:
            signal.connect(receiver, weak=False)
        self.app.on_after_finalize.connect(self._on_finalize, weak=False)
        _by_app[self.app] = self  # task.stage() finds the integration of its task's app

    def _on_finalize(self, sender: Any = None, **_: Any) -> None:
        self.wrap_tasks()

    def disconnect(self) -> None:
        """Undo :meth:`connect` and leave the registry (tests; a process with two apps)."""
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self.app.on_after_finalize.disconnect(self._on_finalize)
        registry.unregister(self.system, self)
        if _by_app.get(self.app) is self:
            del _by_app[self.app]

    def close(self) -> None:
        """Disconnect, stop replaying pending writes and close this process's stores."""
        self.disconnect()
        with self._stores_lock:
            pendings, self._pending = list(self._pending.values()), {}
            stores, self._stores = list(self._stores.values()), {}
        for pending in pendings:
            pending.stop()
        for store in stores:
            store.close()
        if self.journal is not None:
            self.journal.close()


def _exit_at_start(line: str) -> NoReturn:
    """End a worker that cannot work at all with one line (a signal receiver's exception
    would only be logged by Celery, and the worker would start anyway)."""
    print(f"jobledger: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class _Consumption:
    """Invariant 9 for a Celery worker: it stops consuming its queues while its heartbeat has
    failed for longer than the TTL, and consumes again once a beat succeeds. Messages wait in
    the broker meanwhile instead of being handed back and forth; deliveries already in the
    worker run, their claims journaled (invariant 7).

    Celery's remote control does it (``cancel_consumer`` / ``add_consumer``, sent to this
    worker only): the command travels through the broker and is carried out by the worker's
    own event loop, the only thread that may touch the consumer, with every pool. A thread of
    its own sends them, so a slow broker never holds up a heartbeat, and checks every interval
    that the consumer did as told, sending again if a command was lost (a Redis broadcast is
    not kept for a worker that is reconnecting).
    """

    def __init__(self, integration: CeleryIntegration) -> None:
        self.integration = integration
        self.interval = integration.settings.heartbeat_interval
        self.consumer: Any = None
        self.queues: list[str] = []
        self._wanted = True
        self._said = True  # what the log last said: consuming or not
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, consumer: Any) -> None:
        """The consumer started (in its event loop's thread, so it may be stopped directly)."""
        if not self.integration.app.conf.worker_enable_remote_control:
            log.warning(
                "Celery's remote control is off (worker_enable_remote_control): this worker "
                "cannot stop consuming while the ledger is unreachable; jobs delivered then run "
                "with their claims journaled"
            )
            return
        self.consumer = consumer
        self.queues = [q.name for q in consumer.task_consumer.queues]
        self._wanted = self.integration.health.can_claim
        if not self._wanted:
            self._announce(False)
            for queue in self.queues:
                consumer.cancel_task_queue(queue)
        self._thread = threading.Thread(target=self._run, name="jobledger-consumption", daemon=True)
        self._thread.start()

    def want(self, can_claim: bool) -> None:
        """After each beat (the heartbeat's thread): consume if it ``can_claim``."""
        self._wanted = can_claim
        if can_claim != self._said:
            self._wake.set()

    def detach(self) -> None:
        """Shutdown: leave the consumer to Celery."""
        self._stopped.set()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                self._follow()
            except Exception as exc:  # the broker is down, say: the next round tries again
                log.warning("jobledger could not switch the worker's consumer: %r", exc)

    def _follow(self) -> None:
        wanted = self._wanted
        if wanted != self._said:
            self._announce(wanted)
        if self._consuming() == wanted:
            return
        control = self.integration.app.control
        command = control.add_consumer if wanted else control.cancel_consumer
        for queue in self.queues:
            command(queue, destination=[self.consumer.hostname])

    def _consuming(self) -> bool:
        task_consumer = self.consumer.task_consumer
        return any(task_consumer.consuming_from(queue) for queue in self.queues)

    def _announce(self, consuming: bool) -> None:
        self._said = consuming
        instance = self.integration.instance_id
        if consuming:
            self.integration._count("consuming_resumed")
            log.warning("instance %s reaches the ledger again: consuming %s", instance, self.queues)
        else:
            self.integration._count("consuming_stopped")
            log.error(
                "instance %s cannot reach the ledger (no beat for over its TTL): it stops "
                "consuming %s until it does; messages wait in the broker",
                instance,
                self.queues,
            )


#: What a worker counts (``jobledger_worker_events_total{event=...}`` on ``/metrics``).
WORKER_EVENTS = (
    "duplicates_skipped",  # a delivery of a job that runs elsewhere or succeeded
    "stale_deliveries_skipped",  # a delivery older than the job's generation
    "stray_redeliveries_skipped",  # a failed or dead job's redelivery that is no restart
    "orphan_deliveries_skipped",  # a dead owner's job: left to the recovery's new message
    "claim_deferred",  # the ledger was down at the claim: journaled, the body ran
    "claim_unrecorded",  # the claim could not be recorded nor journaled: ran unclaimed
    "publish_unrecorded",  # published while the ledger was down: created at the claim
    "finish_unrecorded",  # an outcome that could not be recorded
    "run_unguarded",  # a delivery outside a jobledger worker: run without a claim
    "consuming_stopped",  # the heartbeat failed past the TTL: stopped taking jobs
    "consuming_resumed",
)


def _held_by_celery() -> set[str] | None:
    """Ids of the requests this worker's Celery holds now (reserved, running, waiting for
    their eta), or None if the event loop kept changing them while this thread read."""
    from celery.worker import state as worker_state

    for _ in range(3):
        try:
            return {
                str(r.id)
                for requests in (
                    worker_state.reserved_requests,
                    worker_state.active_requests,
                    getattr(worker_state, "scheduled_requests", ()),  # eta/countdown
                )
                for r in requests
            }
        except RuntimeError:  # a set changed size while we iterated it
            continue
    return None


#: The counter a skipped delivery raises, by the claim's outcome (else ``duplicates_skipped``).
_SKIP_COUNTERS = {
    Claim.NOT_RESTARTED: "stray_redeliveries_skipped",
    Claim.STALE: "stale_deliveries_skipped",
    Claim.ORPHANED: "orphan_deliveries_skipped",
}


def _generation_of(value: object) -> int | None:
    """A message's generation header as an int (None: published before generations)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(str(value))
    except (TypeError, ValueError):
        log.warning("ignored a malformed %s header: %r", GENERATION_HEADER, value)
        return None


def _republish_of(value: object) -> Republish | None:
    try:
        return None if value is None else Republish(value)
    except ValueError:
        log.warning("ignored a malformed %s header: %r", REPUBLISH_HEADER, value)
        return None


class _ChannelClosed(Exception):
    """The AMQP broker closed a batch's channel over one of its messages."""


def _round_trip(producer: Any) -> None:
    """On AMQP, wait for the broker to answer on the producer's channel: a channel it closed
    over a message of ours raises here (and the pool revives the channel for the next use)."""
    if getattr(producer.connection.transport, "driver_type", None) != "amqp":
        return
    try:
        producer.channel.exchange_declare("amq.direct", "direct", passive=True)
    except IrrecoverableChannelError as exc:
        raise _ChannelClosed() from exc


class _ForkGuardedStore:
    """The worker main process's store, never in use while the process forks a pool child.

    SQLite keeps its file locks' bookkeeping per process: a child forked while another thread
    of the parent holds a lock (a heartbeat, a sweep) inherits the bookkeeping but not the
    thread, and its own writes then wait for a lock nobody will release. Each call holds
    :data:`_FORK_LOCK`, which ``os.register_at_fork`` takes around every fork.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    @contextlib.contextmanager
    def staged_batch(self, **options: Any) -> Iterator[StagedBatch]:
        """The lease and its end (the batch's two transactions) hold the lock; the publishes
        between them do not, so a slow broker never holds up the heartbeat."""
        context = self._store.staged_batch(**options)
        with _FORK_LOCK:
            batch = context.__enter__()
        try:
            yield batch
        except BaseException:
            with _FORK_LOCK:
                if not context.__exit__(*sys.exc_info()):
                    raise
        else:
            with _FORK_LOCK:
                context.__exit__(None, None, None)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target):
            return target

        def guarded(*args: Any, **kwargs: Any) -> Any:
            with _FORK_LOCK:
                return target(*args, **kwargs)

        return guarded


_FORK_LOCK = threading.RLock()
_fork_hooks_installed = False


def _install_fork_hooks() -> None:
    global _fork_hooks_installed
    if _fork_hooks_installed:
        return
    _fork_hooks_installed = True
    os.register_at_fork(
        before=_FORK_LOCK.acquire,
        after_in_parent=_FORK_LOCK.release,
        after_in_child=_release_in_child,
    )


def _release_in_child() -> None:
    global _FORK_LOCK
    try:
        _FORK_LOCK.release()
    except RuntimeError:  # not held by this thread after all: start the child with a fresh one
        _FORK_LOCK = threading.RLock()


#: The integration installed on each app, for the methods every task gets (below).
_by_app: weakref.WeakKeyDictionary[Celery, CeleryIntegration] = weakref.WeakKeyDictionary()
_methods_added = False


def _integration_of(task: Task) -> CeleryIntegration:
    found = _by_app.get(task._get_app())
    if found is None:
        raise StagingError(
            f"task {task.name}: jobledger is not installed on its Celery app; call "
            "jobledger.integrations.celery.install(app) where the app is made"
        )
    return found


def _stage(self: Task, *args: Any, **kwargs: Any) -> AsyncResult:
    """``task.stage(*args, **kwargs)``: ``delay``, but the job commits with the open
    transaction (see :meth:`CeleryIntegration.stage`)."""
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


def _add_task_methods() -> None:
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
        integration = _by_app.get(self._get_app())
        if integration is None:
            return original(self, args, kwargs, *more, **options)
        if not more and integration.stages_apply_async(self, options):
            return integration.stage(self, args, kwargs, **options)
        with integration.publishing():
            return original(self, args, kwargs, *more, **options)

    Task.stage = _stage
    Task.apply_staged = _apply_staged
    Task.apply_async = apply_async


def _republish_options(
    body: Any,
    exchange: Any,
    routing_key: str | None,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``send_task`` keywords that publish this message again as it was (invariant 10):
    route, priority, eta (kept absolute, so a restart does not run a delayed job at once),
    expiry, retries so far, time limits and the embed (callbacks, errbacks, chain, chord)."""
    options: dict[str, Any] = {}
    exchange_name = getattr(exchange, "name", exchange)
    if exchange_name:  # a non-default exchange: keep the route; else the queue says it all
        options.update(exchange=exchange_name, routing_key=routing_key)
    hard, soft = [*(headers.get("timelimit") or ()), None, None][:2]
    found = {
        "priority": properties.get("priority"),
        "eta": headers.get("eta"),
        "expires": headers.get("expires"),
        "retries": headers.get("retries"),
        "time_limit": hard,
        "soft_time_limit": soft,
    }
    embed = body[2] if isinstance(body, (tuple, list)) and len(body) >= 3 else None
    if isinstance(embed, Mapping):
        found.update({option: embed.get(key) for key, option in _EMBED_OPTIONS.items()})
    options.update({k: v for k, v in found.items() if v})
    return options


def _queue_name(declare: list[Any] | None, routing_key: str | None) -> str:
    for entity in declare or ():
        name = getattr(entity, "name", None)
        if name:
            return str(name)
    return routing_key or "celery"


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
    _add_task_methods()
    return integration


def install_for_broker(broker: str, settings: Settings | None = None) -> CeleryIntegration:
    """The integration on a bare Celery app of ``broker``: enough to publish jobs by task name
    (recovery, restart, ``jobledger recover --broker``) in a process without the task code."""
    app = Celery("jobledger", broker=broker, set_as_current=False)
    return install(app, settings=settings)
