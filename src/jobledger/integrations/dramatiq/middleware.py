"""The Dramatiq middleware: its hooks mapped onto the worker runtime (the adapter contract is
in :mod:`jobledger.integrations.base`).

``install(broker)`` puts :class:`LedgerMiddleware` *first* in the broker's list. Dramatiq runs
``before_*`` hooks in list order and ``after_*`` hooks in reverse, so the claim happens before
any other middleware starts a time limit or a shutdown notification (neither can interrupt
it), and the finish sees what ``Retries`` decided (a retry enqueued, or the message failed).

- ``before_enqueue`` (client, and ``Retries`` in a worker): a ``queued`` record, the job id
  being the message id; the markers (tracked, generation) go into ``message.options``. A
  ledger that is down costs a warning, the message says so (``jobledger_unrecorded``: the
  worker that receives it journals the record) and this process writes it once the ledger is
  back. A message that carries a generation already was published by jobledger or recorded
  before (a republish, a relay's publish, a delayed message moved to its queue): nothing
  written. The running job's own retry moves it to ``retrying`` first (invariant 8).
- a message handed to the worker threads (or delayed in memory) is *received*: the heartbeat
  lists it until no thread holds it (:mod:`.worker`).
- ``before_process_message``: the claim (the runtime's :class:`~jobledger.runtime.guard.Guard`,
  in two halves); a duplicate, stale or stray delivery raises ``SkipMessage`` (acknowledged,
  not run).
- ``after_process_message``: succeeded; failed when the message failed (retries exhausted, an
  exception in ``throws``: Dramatiq dead-letters it), without a retry, or when the broker
  refused its retry's message; a retried run is finished by its retry's delivery.
  ``TimeLimitExceeded`` and ``Shutdown`` are named in the error. ``after_skip_message``: a
  claimed message another middleware skipped (``AgeLimit``) is failed or cancelled.
- ``before_worker_boot`` registers the worker process as an instance (see :mod:`.worker`);
  ``after_worker_boot`` starts the recovery, relay and audit loops;
  ``before_worker_shutdown`` says draining; ``after_worker_shutdown`` drains.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NoReturn

from dramatiq import Actor, Broker, Message, Middleware, Worker
from dramatiq.middleware import Retries, Shutdown, SkipMessage, TimeLimitExceeded

from jobledger.config import Settings
from jobledger.errors import (
    ConfigError,
    DeliverySkipped,
    JobLedgerError,
    StagingError,
    StoreError,
)
from jobledger.integrations.base import registry
from jobledger.integrations.dramatiq.messages import (
    GENERATION_OPTION,
    SYSTEM,
    TRACKED_OPTION,
    UNRECORDED_OPTION,
    generation_of,
    message_of,
    record_of,
    republish_of,
)
from jobledger.integrations.dramatiq.publish import DramatiqPublisher
from jobledger.integrations.dramatiq.staging import (
    add_unique_option,
    staged_message,
    staged_record,
)
from jobledger.integrations.dramatiq.worker import Consumption, ReceivingQueue, held_by
from jobledger.model import ORPHAN_OPTION, JobRecord, OrphanPolicy
from jobledger.pending import CreateWrite
from jobledger.runtime.guard import Delivery, End, Run
from jobledger.runtime.worker import WorkerRuntime
from jobledger.stores import Store
from jobledger.tracebacks import task_traceback

log = logging.getLogger(__name__)

#: The actor options this middleware adds (``@dramatiq.actor(tracked=True, on_orphan="fail")``).
ACTOR_OPTIONS = frozenset({"tracked", "on_orphan"})


class LedgerMiddleware(Middleware):
    """The ledger's side of one Dramatiq broker. Build it with :func:`install`."""

    def __init__(
        self,
        broker: Broker,
        settings: Settings,
        *,
        store: Store | None = None,
        store_factory: Callable[[], Store] | None = None,
        track_all: bool = False,
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.track_all = track_all
        self.publisher = DramatiqPublisher(broker)
        self.runtime = WorkerRuntime(
            self.publisher,
            settings,
            store=store,
            store_factory=store_factory,
            wrappers=("dramatiq",),
        )
        self.consumption = Consumption(self.runtime)
        self.worker: Worker | None = None
        self._runs: dict[int, Run] = {}  # by worker thread: each runs one message at a time

    @property
    def actor_options(self) -> set[str]:
        return set(ACTOR_OPTIONS)

    # -- which actors -------------------------------------------------------------------------
    def is_tracked(self, actor_name: str, options: Mapping[str, Any]) -> bool:
        """The actor's own ``tracked`` option wins; else the publisher's say, or ``track_all``."""
        actor = self.broker.actors.get(actor_name)
        declared = actor.options.get("tracked") if actor is not None else None
        if declared is not None:
            return bool(declared)
        return bool(options.get(TRACKED_OPTION)) or self.track_all

    def orphan_options(self, actor_name: str) -> dict[str, Any]:
        """The actor's orphan policy as a record option (none for the default), so any
        recoverer applies it without the actor's code. :class:`ConfigError` if misspelt."""
        actor = self.broker.actors.get(actor_name)
        declared = actor.options.get("on_orphan") if actor is not None else None
        try:
            policy = self.settings.on_orphan if declared is None else OrphanPolicy.parse(declared)
        except ConfigError as exc:
            raise ConfigError(f"actor {actor_name}: {exc}") from None
        return {} if policy is OrphanPolicy.REQUEUE else {ORPHAN_OPTION: policy.value}

    def after_declare_actor(self, broker: Broker, actor: Actor[Any, Any]) -> None:
        """A misspelt ``on_orphan`` is logged at once (Dramatiq logs a hook's error and goes
        on), and stops the worker at boot; not left for a crash to find."""
        self.orphan_options(actor.actor_name)

    # -- publishing ---------------------------------------------------------------------------
    def before_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        if not self.is_tracked(message.actor_name, message.options):
            return
        options = message.options
        options[TRACKED_OPTION] = True
        run = self._running(message)
        if run is not None:  # Retries enqueues its retry: retrying before the message exists
            options[GENERATION_OPTION] = run.generation or 0
            options.pop(UNRECORDED_OPTION, None)  # the claim wrote (or journaled) the record
            self.runtime.guard.retrying(run.delivery.job_id, _retry_reason(options))
            return
        if GENERATION_OPTION in options:
            return  # jobledger published it, or recorded it at its first enqueue
        options[GENERATION_OPTION] = 0
        record = record_of(message, self.orphan_options(message.actor_name), stamped=False)
        try:
            self.runtime.store.create(record)  # False: it exists (the caller reused an id)
        except JobLedgerError as exc:
            # the worker that receives the message journals the record (a message then lost
            # with that worker leaves a record to recover from), and so does this process
            options[UNRECORDED_OPTION] = True
            self.runtime.pending.add(CreateWrite(record))
            self.runtime.count("publish_unrecorded")
            log.warning("job %s (%s) enqueued, recorded later: %s", message.message_id,
                        message.actor_name, exc)  # fmt: skip

    def after_enqueue(self, broker: Broker, message: Message[Any], delay: int | None) -> None:
        run = self._running(message)
        if run is not None:
            run.retry_sent = True

    def stage(
        self,
        actor: Actor[Any, Any] | str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        delay: int | None = None,
        using: object | None = None,
        unique_key: str | None = None,
        **options: Any,
    ) -> Message[Any]:
        """Stage a message in the transaction of ``using`` (a SQLAlchemy Session or
        Connection, a Django alias; default: the one bound with
        :func:`jobledger.staging.staging_in` or the open Django atomic block, else the
        ledger's own connection, committed at once), as ``send_with_options`` would send it.
        It is enqueued right after the commit, or by the relay. With ``unique_key``, while an
        unfinished job holds the key nothing is staged and that job's message is returned.
        :class:`StagingError` for an untracked actor, bad arguments or no usable transaction;
        nothing is written then."""
        message, record = self._staged(actor, args, kwargs, delay, options, unique_key)
        return self._as_sent(message, self.runtime.outbox.stage(record, using))

    def send_unique(
        self,
        actor: Actor[Any, Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        delay: int | None,
        unique_key: str,
        options: Mapping[str, Any],
    ) -> Message[Any]:
        """``actor.send_with_options(..., unique_key=...)``: the record, holding the key, is
        written before the message exists, then enqueued at once
        (:meth:`~jobledger.outbox.Outbox.publish_now`). While an unfinished job holds the key
        nothing is enqueued, and that job's message (as the ledger records it) is returned. A
        ledger that is down cannot say who holds the key: the message is enqueued as without
        one (at least once beats never), its record written later without the key."""
        message, record = self._staged(actor, args, kwargs, delay, options, unique_key)
        try:
            job_id = self.runtime.outbox.publish_now(record)
        except StoreError as exc:
            log.warning("job %s (%s): unique key %r not checked, the ledger is unavailable: %s",
                        record.id, record.name, unique_key, exc)  # fmt: skip
            return self.broker.enqueue(message, delay=delay)
        return self._as_sent(message, job_id)

    def _staged(
        self,
        actor: Actor[Any, Any] | str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        delay: int | None,
        options: Mapping[str, Any],
        unique_key: str | None,
    ) -> tuple[Message[Any], JobRecord]:
        """The message ``send_with_options`` would send, and its staged record."""
        message = staged_message(self.broker, actor, args, kwargs, options)
        if not self.is_tracked(message.actor_name, {}):
            raise StagingError(
                f"actor {message.actor_name} is not tracked, so no worker would claim or finish "
                "its staged job: declare it @dramatiq.actor(tracked=True) (or install with "
                "track_all=True)"
            )
        record = staged_record(message, delay, self.orphan_options(message.actor_name))
        return message, replace(record, unique_key=unique_key)

    def _as_sent(self, message: Message[Any], job_id: str) -> Message[Any]:
        """``message``, or the message of job ``job_id`` that holds its unique key."""
        if job_id == message.message_id:
            return message
        holder = self.runtime.store.get(job_id)
        return message.copy(message_id=job_id) if holder is None else message_of(holder, None)[0]

    # -- running ------------------------------------------------------------------------------
    def received(self, message: Any) -> None:
        """A message handed to the worker threads, or delayed in memory: if tracked, the
        runtime puts it back should this process die holding it, and journals its record if
        its publisher could not write it."""
        if self.is_tracked(message.actor_name, message.options):
            self.runtime.received(
                record_of(message, self.orphan_options(message.actor_name)),
                unrecorded=bool(message.options.get(UNRECORDED_OPTION)),
            )

    def before_delay_message(self, broker: Broker, message: Any) -> None:
        self.received(message)

    def before_process_message(self, broker: Broker, message: Any) -> None:
        if not self.is_tracked(message.actor_name, message.options):
            return
        delivery = Delivery(
            record_of(message, self.orphan_options(message.actor_name)),
            generation_of(message.options),
            republish_of(message.options),
        )
        try:
            run = self.runtime.guard.begin(delivery)
        except DeliverySkipped as skipped:
            raise SkipMessage(str(skipped)) from None
        if run is not None:
            self._runs[threading.get_ident()] = run

    def after_process_message(
        self,
        broker: Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        run = self._running(message)
        if run is None:
            return
        if exception is None:
            self._end(run, End.SUCCEEDED)
        elif run.retrying and run.retry_sent:
            self._end(run, End.RETRYING)  # finished by its retry's delivery
        elif run.retrying:  # Retries' enqueue raised (Dramatiq logged it)
            self._end(run, End.FAILED, f"its retry could not be enqueued: {exception!r}")
        else:
            self._end(run, End.FAILED, self._failure(exception))

    def after_skip_message(self, broker: Broker, message: Any) -> None:
        """A message skipped after our claim, by a middleware after ours (AgeLimit): it never
        runs, so the job fails (a message the middleware failed) or is cancelled."""
        run = self._running(message)
        if run is not None:
            end = End.FAILED if message.failed else End.CANCELLED
            self._end(run, end, "skipped by a middleware (AgeLimit: older than max_age?)")

    def _running(self, message: Any) -> Run | None:
        """This thread's run, if it is ``message``'s job's."""
        run = self._runs.get(threading.get_ident())
        return run if run is not None and run.delivery.job_id == message.message_id else None

    def _end(self, run: Run, end: End, error: str | None = None) -> None:
        """Record the end, then stop holding the run (so the held-jobs audit never sees it
        started and held by no thread)."""
        try:
            self.runtime.guard.end(run, end, error)
        finally:
            del self._runs[threading.get_ident()]

    def _failure(self, exception: BaseException) -> str:
        text = task_traceback(exception, wrappers=self.runtime.wrappers)
        if isinstance(exception, TimeLimitExceeded):
            return f"time limit exceeded (Dramatiq's TimeLimit interrupted it)\n{text}"
        if isinstance(exception, Shutdown):
            return f"interrupted by its worker's shutdown (ShutdownNotifications)\n{text}"
        return text

    # -- the worker process -------------------------------------------------------------------
    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        """Register this worker process before it consumes; a worker that cannot work at all
        (unmigrated ledger, unusable journal directory, misplaced middleware) ends here."""
        self.worker = worker
        # before any consumer or worker thread exists, so each one gets it
        worker.work_queue = ReceivingQueue(self.received)
        try:
            self._check_order()
            for name in broker.get_declared_actors():
                self.orphan_options(name)
            self.runtime.register(
                queues=sorted(worker.consumer_whitelist or broker.get_declared_queues()),
                in_flight=lambda: len(self._runs),
                held=self._held,
                on_beat=self.consumption.want,
            )
        except JobLedgerError as exc:
            _exit_at_start(str(exc))

    def _held(self) -> set[str]:
        return held_by(self.worker, [run.delivery.job_id for run in list(self._runs.values())])

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self.consumption.attach(worker)
        self.runtime.start()

    def before_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self.runtime.mark_draining()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self.runtime.drain()

    def _check_order(self) -> None:
        middleware = self.broker.middleware
        retries = [i for i, m in enumerate(middleware) if isinstance(m, Retries)]
        if retries and retries[0] < middleware.index(self):
            raise ConfigError(
                "LedgerMiddleware must come before Retries in the broker's middleware (it "
                "reads Retries' decision after it): add it with jobledger's install(broker)"
            )

    def close(self) -> None:
        """Leave the registry and close this process's ledger resources (tests)."""
        registry.unregister(SYSTEM, self.publisher)
        self.runtime.close()


def _retry_reason(options: Mapping[str, Any]) -> str:
    lines = str(options.get("traceback") or "").strip().splitlines()
    retries = options.get("retries")
    return f"retry {retries}: {lines[-1] if lines else 'requested'}"


def _exit_at_start(line: str) -> NoReturn:
    """End a worker process that cannot work at all with one line (Dramatiq logs and ignores
    a hook's exception, and the worker would start anyway)."""
    print(f"jobledger: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def install(
    broker: Broker,
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    store_factory: Callable[[], Store] | None = None,
    track_all: bool = False,
) -> LedgerMiddleware:
    """Track ``broker``'s actors in the ledger and register the integration for restarts and
    recovery. Call it before the actors are declared (their ``tracked`` and ``on_orphan``
    options exist only then). ``store`` serves this process; a forked process opens its own
    through ``store_factory`` (default: the settings' database URL)."""
    middleware = LedgerMiddleware(
        broker,
        settings or Settings.from_env(),
        store=store,
        store_factory=store_factory,
        track_all=track_all,
    )
    first = broker.middleware[0] if broker.middleware else None
    broker.add_middleware(middleware, before=type(first) if first is not None else None)
    registry.register(middleware.publisher)
    add_unique_option()
    return middleware
