"""The worker runtime: what every queue adapter's worker gets for free.

One :class:`WorkerRuntime` per installed adapter and process tree. Its main process
:meth:`~WorkerRuntime.register`\\ s the instance *before* it forks its children (so they claim as
a live instance, invariant 9, reading health from shared memory), beats for it, replays the
journal its processes share, :meth:`~WorkerRuntime.start`\\ s the recovery sweep, the relay and
the held-jobs audit once it consumes, and :meth:`~WorkerRuntime.drain`\\ s at warm shutdown.
Children inherit the instance id and run bodies through :attr:`~WorkerRuntime.guard`.

**One instance per worker, not per child.** Liveness means "this worker's main process is
alive"; a child that dies under a job is noticed by the main process, which recovers that one
job itself (:meth:`Outcomes.lost <jobledger.runtime.outcomes.Outcomes.lost>`) instead of waiting
a TTL. Per-child instances would multiply heartbeat writes by the concurrency, beat from
processes whose job code may hold the GIL, and still need the main process to notice a dead
child.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from jobledger.config import Settings
from jobledger.counters import SharedCounters
from jobledger.errors import SchemaMissing
from jobledger.heartbeat import Health, Heartbeat, new_instance
from jobledger.integrations.base import BatchPublisher, Integration, QueueProbe
from jobledger.journal import Journal, replay_orphans
from jobledger.lifecycle import Lifecycle
from jobledger.model import JobRecord, Republish
from jobledger.outbox import Outbox
from jobledger.pending import CreateWrite, PendingWrites
from jobledger.recovery import Recovery
from jobledger.runtime.guard import Guard
from jobledger.runtime.held import Held, HeldJobs
from jobledger.runtime.maintenance import maintenance_loops
from jobledger.runtime.outcomes import Outcomes
from jobledger.runtime.resources import ProcessResources
from jobledger.runtime.service import Loop, Service
from jobledger.stores import Store, store_for

log = logging.getLogger(__name__)

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


class Adapter(Integration, BatchPublisher, Protocol):
    """What the runtime needs of an adapter: its system's name and its way back
    (:class:`~jobledger.integrations.base.QueueProbe` too, optionally)."""


class WorkerRuntime:
    """The ledger's side of one adapter's workers and clients (see the module docstring).

    ``store`` serves this process only; other processes open theirs through
    ``store_factory`` (default: the settings' database URL).
    """

    def __init__(
        self,
        adapter: Adapter,
        settings: Settings,
        *,
        store: Store | None = None,
        store_factory: Callable[[], Store] | None = None,
        wrappers: Sequence[str] = (),
    ) -> None:
        self.adapter = adapter
        #: The queue's own packages (``celery``), whose leading frames a failed job's
        #: traceback leaves out, as jobledger's (:func:`~jobledger.tracebacks.task_traceback`).
        self.wrappers = tuple(wrappers)
        self.system = adapter.system
        self.settings = settings
        # made before any fork, so the heartbeat reports what the children counted and the
        # children read the health the main process's heartbeat writes
        self.counters = SharedCounters(WORKER_EVENTS)
        self.health = Health(settings.ttl)
        self.resources = ProcessResources(
            store_factory or (lambda: store_for(settings)),
            adapter.publish_many,
            store,
        )
        self.guard = Guard(self)
        self.outcomes = Outcomes(self)
        self.held = HeldJobs(lambda: None)
        #: Set by :meth:`register` (the main process, inherited by its children).
        self.instance_id: str | None = None
        self.heartbeat: Heartbeat | None = None
        self._services: list[Service] = []
        self._own_stores: list[Store] = []  # the services' own, closed at drain

    # -- this process's resources -------------------------------------------------------------
    @property
    def store(self) -> Store:
        return self.resources.store

    @property
    def pending(self) -> PendingWrites:
        return self.resources.pending

    @property
    def outbox(self) -> Outbox:
        return self.resources.outbox

    def count(self, event: str) -> None:
        self.counters.add(event)

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
        """Recovery of this system's orphans only: another system's job published on this
        queue would be lost."""
        return Recovery.from_settings(
            self.store,
            self.settings,
            publish=self._publish,
            systems={self.system},
            ledger_up_for=lambda: self.health.up_for,
            probe=self._probe,
            journaled=self._journaled,
        )

    def _journaled(self, job_ids: Collection[str]) -> set[str]:
        journal = self.resources.journal
        return journal.journaled(job_ids) if journal is not None else set()

    def _publish(self, record: JobRecord, *, reason: Republish) -> None:
        self.adapter.publish(record, reason=reason)

    def _probe(self, system: str) -> QueueProbe | None:
        adapter = self.adapter
        return adapter if system == self.system and isinstance(adapter, QueueProbe) else None

    # -- the worker's main process ------------------------------------------------------------
    def register(
        self,
        *,
        queues: Sequence[str],
        in_flight: Callable[[], int],
        held: Held,
        on_beat: Callable[[bool], object] = lambda can_claim: None,
        worker_name: str | None = None,
    ) -> None:
        """Before the children fork: open the journal, register the instance and beat for it,
        replay what earlier workers left in the journal directory, and keep replaying.
        ``held`` says which jobs the worker's processes hold now; ``on_beat`` hears after each
        beat whether the instance may claim (a worker stops or resumes consuming).
        ``worker_name`` is the queue's own name for the worker (Celery's ``a@vm``): the
        instance's name unless ``JOBLEDGER_INSTANCE_NAME`` is set
        (:meth:`~jobledger.config.Settings.name_of_instance`), plus a nonce per boot.

        :class:`~jobledger.errors.ConfigError` for an unusable journal directory and
        :class:`~jobledger.errors.SchemaMissing` for an unmigrated ledger: the worker cannot
        work at all. An unreachable ledger is an outage: it registers once it answers."""
        settings = self.settings
        name = settings.name_of_instance(worker_name)
        journal = Journal.for_instance(settings.journal_dir, name, limit=settings.journal_limit)
        self.resources.become_worker(journal)
        self.held = HeldJobs(held)
        instance = new_instance(settings, queues, name=name)
        self.instance_id = instance.id
        self.heartbeat = Heartbeat(
            self.store,
            instance,
            interval=settings.heartbeat_interval,
            ttl=settings.ttl,
            in_flight=in_flight,
            health=self.health,
            holding=self.held.holding,
            stats=self.counters.snapshot,
            on_beat=on_beat,
        )
        self.heartbeat.start()
        if isinstance(self.heartbeat.last_error, SchemaMissing):
            self.heartbeat.stop()
            raise self.heartbeat.last_error
        if self.heartbeat.last_error is not None:
            log.error(
                "jobledger instance %s cannot reach the ledger at start (%s): it consumes no "
                "jobs until the ledger answers",
                instance.id,
                self.heartbeat.last_error,
            )
        else:
            self.replay_journals()
        self._run(Loop("journal", settings.heartbeat_interval, self.replay_journals))
        log.info("jobledger instance %s registered (journal %s)", instance.id, journal.path)

    def start(self) -> None:
        """The worker consumes: start the held-jobs audit, the recovery sweep and the relay of
        this system's jobs (on a store of its own, so a batch's publishes do not hold up the
        heartbeat), each paused while the instance cannot reach the ledger."""
        if self.instance_id is None:
            return
        settings = self.settings
        self._run(Loop("audit", settings.heartbeat_interval, self.audit))
        for loop in maintenance_loops(
            self.store,
            settings,
            publish=self._publish,
            publish_many=self.resources.publish_many,
            systems={self.system},
            relay_systems={self.system},
            ledger_up_for=lambda: self.health.up_for,
            probe=self._probe,
            journaled=self._journaled,
            relay_store=self._own_store,
            enabled=lambda: self.health.can_claim,
        ):
            self._run(loop)

    def received(self, delivered: JobRecord, *, unrecorded: bool = False) -> None:
        """The main process took delivery of a tracked job (as its message describes it): it
        is put back if its child dies before claiming it, and the next beat, soon, tells the
        ledger this instance holds it. ``unrecorded``: its message says the ledger could not
        take its record at publish, so the record is journaled here, so a message then lost
        from the worker's prefetch still has a record to be recovered from."""
        self.held.received(delivered)
        if unrecorded:
            # Journaled, not written here: this may be the worker's event loop. The claim
            # replays it first, so it can never land after the job's own later writes.
            self.pending.add(CreateWrite(delivered))
        if self.heartbeat is not None:
            self.heartbeat.wake()

    def audit(self) -> None:
        """See :meth:`HeldJobs.audit <jobledger.runtime.held.HeldJobs.audit>`."""
        assert self.instance_id is not None
        self.held.audit(self.store, self.instance_id, self.recovery())

    def replay_journals(self) -> None:
        """This worker's journal while it holds writes (its children's and its
        predecessor's), then the journals in the same directory whose worker is gone."""
        journal = self.resources.journal
        assert journal is not None
        self.pending.flush()
        left = replay_orphans(journal, lambda: self.store)
        if left:
            log.warning("%d ledger writes of gone workers still wait for the ledger", left)

    def mark_draining(self) -> None:
        """Warm shutdown begins (maybe in a signal handler): say draining, write nothing."""
        if self.heartbeat is not None:
            self.heartbeat.mark_draining()

    def drain(self) -> None:
        """After the queue's warm shutdown waited for the children: stop the loops, replay the
        journal once more, drain, then deregister. Writes the ledger did not take stay in the
        journal for the next worker of this instance name, or any worker sharing its
        directory."""
        services, self._services = self._services, []
        for service in services:
            service.stop()
        stores, self._own_stores = self._own_stores, []
        for store in stores:
            store.close()
        journal = self.resources.journal
        if journal is not None:
            try:
                self.pending.flush()
            except Exception:
                log.exception("replaying the journal at shutdown failed")
            if self.pending.holds():
                log.warning(
                    "%d ledger writes stay in the journal %s: the next worker of that name, "
                    "or any worker using that directory, replays them",
                    len(journal),
                    journal.path,
                )
        if self.heartbeat is not None:
            self.heartbeat.drain(timeout=self.settings.ttl)

    def child_started(self) -> None:
        """In a freshly forked child: it runs none of its parent's jobs."""
        self.guard.forget()

    def close(self) -> None:
        """Stop replaying pending writes and close this process's stores and journal."""
        self.resources.close()

    def _own_store(self) -> Store:
        store = self.resources.own_store()
        self._own_stores.append(store)
        return store

    def _run(self, service: Service) -> None:
        self._services.append(service)
        service.start()
