"""The Dramatiq adapter's only glue to the core: one worker process's side of the ledger.

Its resources (store, pending writes, outbox), instance registration and heartbeat, the
journal, the recovery and relay loops, the claim guard split in two (:meth:`ProcessLedger.begin`
before the body, :meth:`ProcessLedger.end` after it: Dramatiq's hooks surround the body, they
do not wrap it) and the drain at shutdown. Everything here is the core's classes composed;
nothing reads a Dramatiq object, so the worker runtime (``jobledger.runtime``) replaces this
module as a whole.

**One instance per worker process.** ``dramatiq``'s main process never imports the broker
module: each worker process loads it, so each runs the middleware, and each registers, beats
and sweeps for itself. Its threads claim as its instance. A process that dies stops beating
(the CLI then stops its siblings too), and any live instance recovers its jobs after the TTL.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobledger.config import Settings
from jobledger.counters import SharedCounters
from jobledger.errors import JobLedgerError, SchemaMissing
from jobledger.heartbeat import Health, Heartbeat, new_instance
from jobledger.integrations.base import PublishBatch, QueueProbe
from jobledger.journal import Journal, replay_orphans
from jobledger.lifecycle import Claim, Lifecycle
from jobledger.model import JobRecord, JobState, Republish
from jobledger.outbox import Outbox
from jobledger.pending import PendingWrites, TransitionWrite
from jobledger.recovery import Publisher, Recovery
from jobledger.relay import Relay, RelayLoop
from jobledger.runtime.maintenance import RecoveryLoop
from jobledger.runtime.service import Loop
from jobledger.stores import Store, store_for
from jobledger.stores.base import Transition

log = logging.getLogger(__name__)

#: What a worker process counts (``jobledger_worker_events_total{event=...}``).
EVENTS = (
    "duplicates_skipped",  # a delivery of a job that runs elsewhere or succeeded
    "stale_deliveries_skipped",  # a delivery older than the job's generation
    "stray_redeliveries_skipped",  # a failed or dead job's redelivery that is no restart
    "orphan_deliveries_skipped",  # a dead owner's job: left to the recovery's new message
    "claim_deferred",  # the ledger was down at the claim: journaled, the body ran
    "claim_unrecorded",  # the claim could not be recorded nor journaled: ran unclaimed
    "publish_unrecorded",  # published while the ledger was down: created at the claim
    "finish_unrecorded",  # an outcome that could not be recorded
    "run_unguarded",  # a delivery outside a registered worker: run without a claim
    "consuming_stopped",  # the heartbeat failed past the TTL: stopped taking jobs
    "consuming_resumed",
)
_SKIPS = {
    Claim.NOT_RESTARTED: "stray_redeliveries_skipped",
    Claim.STALE: "stale_deliveries_skipped",
    Claim.ORPHANED: "orphan_deliveries_skipped",
}
_WAITING = frozenset({JobState.QUEUED, JobState.RETRYING})


@dataclass(frozen=True)
class Delivery:
    """One delivery of a tracked job, as its message describes it."""

    record: JobRecord
    generation: int | None
    republish: Republish | None = None


@dataclass
class Run:
    """A job claimed by this process and running now (one per worker thread)."""

    delivery: Delivery
    retrying: bool = False  # moved to retrying: its retry's message is being enqueued
    retry_sent: bool = False  # the broker took that message

    @property
    def job_id(self) -> str:
        return self.delivery.record.id


class End(str, enum.Enum):
    """How a run ended, as the adapter reads its queue's outcome."""

    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Skipped(Exception):
    """The claim says this delivery must not run (a duplicate, a stale or stray copy)."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(claim.value)
        self.claim = claim


class ProcessLedger:
    """The ledger's side of one process (see the module docstring). ``publish`` and
    ``publish_many`` are the adapter's way back; ``probe`` counts its broker's queues."""

    def __init__(
        self,
        system: str,
        settings: Settings,
        *,
        publish: Publisher,
        publish_many: PublishBatch,
        probe: QueueProbe | None = None,
        store: Store | None = None,
        store_factory: Callable[[], Store] | None = None,
    ) -> None:
        self.system = system
        self.settings = settings
        self.publish = publish
        self.publish_many = publish_many
        self.probe = probe
        self.counters = SharedCounters(EVENTS)
        self.health = Health(settings.ttl)
        self._factory = store_factory or (lambda: store_for(settings))
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._store = store
        self._pending: PendingWrites | None = None
        self._outbox: Outbox | None = None
        self.journal: Journal | None = None
        self.instance_id: str | None = None
        self.heartbeat: Heartbeat | None = None
        self._loops: list[Loop] = []
        self._relay_store: Store | None = None

    # -- this process's resources (a forked child opens its own) ---------------------------
    def _here(self) -> None:
        if os.getpid() != self._pid:  # forked: the parent's connections are not ours
            self._pid, self._store, self._pending, self._outbox = os.getpid(), None, None, None

    @property
    def store(self) -> Store:
        with self._lock:
            self._here()
            if self._store is None:
                self._store = self._factory()
            return self._store

    @property
    def pending(self) -> PendingWrites:
        """Writes waiting for the ledger (invariant 7): in the journal once registered (the
        journal loop replays it), else in memory with a replay thread of their own."""
        store = self.store
        with self._lock:
            if self._pending is None:
                self._pending = PendingWrites(
                    lambda: store, log=self.journal, replay_on_add=self.journal is None
                )
            return self._pending

    @property
    def outbox(self) -> Outbox:
        store = self.store
        with self._lock:
            if self._outbox is None:
                self._outbox = Outbox(store, publish=self.publish_many)
            return self._outbox

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
        """Recovery of this system's jobs only (another system's job published here is lost)."""
        return Recovery.from_settings(
            self.store,
            self.settings,
            publish=self.publish,
            systems={self.system},
            ledger_up_for=lambda: self.health.up_for,
            probe=lambda system: self.probe if system == self.system else None,
        )

    # -- the worker process's life ----------------------------------------------------------
    def register(
        self,
        *,
        queues: Sequence[str],
        in_flight: Callable[[], int],
        holding: Callable[[], Sequence[tuple[str, int]]],
        on_beat: Callable[[bool], object],
    ) -> None:
        """Open the journal, register the instance, beat for it and replay what earlier
        workers left. :class:`~jobledger.errors.ConfigError` for an unusable journal directory,
        :class:`SchemaMissing` for an unmigrated ledger; an unreachable ledger is an outage
        (``on_beat`` hears it cannot claim)."""
        settings = self.settings
        name = settings.name_of_instance()
        self.journal = Journal.for_instance(
            settings.journal_dir, name, limit=settings.journal_limit
        )
        with self._lock:
            self._pending = None  # from now on, this process's writes are journaled
        instance = new_instance(settings, queues, name=name)
        self.instance_id = instance.id
        self.heartbeat = Heartbeat(
            self.store,
            instance,
            interval=settings.heartbeat_interval,
            ttl=settings.ttl,
            in_flight=in_flight,
            health=self.health,
            holding=holding,
            stats=self.counters.snapshot,
            on_beat=on_beat,
        )
        self.heartbeat.start()
        error = self.heartbeat.last_error
        if isinstance(error, SchemaMissing):
            self.heartbeat.stop()
            raise error
        if error is not None:
            log.error(
                "jobledger instance %s cannot reach the ledger at start (%s): it consumes no "
                "jobs until the ledger answers",
                instance.id,
                error,
            )
        else:
            self.replay_journals()
        self._start(Loop("journal", settings.heartbeat_interval, self.replay_journals))
        log.info("jobledger instance %s registered (journal %s)", instance.id, self.journal.path)

    def start(self) -> None:
        """The worker consumes: start the recovery sweep and the relay of this system's staged
        jobs (on a store of its own, so a batch's publishes never hold up the heartbeat)."""
        if self.instance_id is None:
            return
        settings = self.settings
        enabled = lambda: self.health.can_claim  # noqa: E731
        recovery = RecoveryLoop(
            self.recovery(), interval=settings.recovery_interval, enabled=enabled
        )
        self._start(recovery)
        if settings.relay:
            self._relay_store = self._factory()
            relay = Relay.from_settings(
                self._relay_store, settings, publish=self.publish_many, systems={self.system}
            )
            self._start(
                RelayLoop(
                    relay,
                    interval=settings.relay_interval,
                    max_backoff=settings.relay_max_backoff,
                    enabled=enabled,
                )
            )

    def _start(self, loop: Loop) -> None:
        loop.start()
        self._loops.append(loop)

    def replay_journals(self) -> None:
        """This process's journal while it holds writes, then those of gone workers."""
        assert self.journal is not None
        self.pending.flush()
        left = replay_orphans(self.journal, lambda: self.store)
        if left:
            log.warning("%d ledger writes of gone workers still wait for the ledger", left)

    def mark_draining(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.mark_draining()

    def drain(self) -> None:
        """At shutdown: stop the loops, replay the journal once more, keep beating until no job
        runs here (invariant 4), then deregister. Writes the ledger did not take stay in the
        journal for the next worker using that directory."""
        for loop in reversed(self._loops):
            loop.stop()
        self._loops.clear()
        if self._relay_store is not None:
            self._relay_store.close()
        if self.journal is not None:
            try:
                self.pending.flush()
            except Exception:
                log.exception("replaying the journal at shutdown failed")
            if self.pending.holds():
                log.warning(
                    "%d ledger writes stay in the journal %s for the next worker",
                    len(self.journal),
                    self.journal.path,
                )
        if self.heartbeat is not None:
            self.heartbeat.drain(timeout=self.settings.ttl)

    def close(self) -> None:
        """Stop replaying and close this process's store (tests; a process done with it)."""
        with self._lock:
            pending, store, self._pending, self._store = self._pending, self._store, None, None
        if pending is not None:
            pending.stop()
        if store is not None:
            store.close()
        if self.journal is not None:
            self.journal.close()

    # -- the claim guard, in two halves ----------------------------------------------------
    def begin(self, delivery: Delivery) -> Run | None:
        """Claim the job before its body runs (invariant 2): the run, None when the body runs
        unclaimed (no registered instance here, or the claim could not even be journaled), or
        :class:`Skipped` when it must not run."""
        job_id = delivery.record.id
        if self.instance_id is None:
            self.count("run_unguarded")
            return None
        try:
            claim = self.lifecycle().claim(
                job_id,
                delivery.record,
                generation=delivery.generation,
                republish=delivery.republish,
            )
        except JobLedgerError as exc:
            self.count("claim_unrecorded")
            log.warning("job %s runs unclaimed, the ledger is unavailable: %s", job_id, exc)
            return None
        if claim is Claim.DEFERRED:
            self.count("claim_deferred")
        if not claim.should_run:
            self.count(_SKIPS.get(claim, "duplicates_skipped"))
            log.warning("job %s (%s) not run: %s", job_id, delivery.record.name, claim.value)
            raise Skipped(claim)
        return Run(delivery)

    def retrying(self, run: Run, why: str) -> None:
        """The run's retry is about to be enqueued: retrying *before* its message exists, so
        that message's claim finds the job claimable (invariant 8). Once per run."""
        if run.retrying:
            return
        g = run.delivery.generation
        self._write(lambda: setattr(run, "retrying", self._fail(run.job_id, why, True, g)))

    def _fail(self, job_id: str, why: str, will_retry: bool, g: int | None) -> bool:
        return self.lifecycle().fail(job_id, why, will_retry=will_retry, generation=g)

    def end(self, run: Run, end: End, error: str | None = None) -> None:
        """Record how the run ended, fenced by its generation (invariant 3). A run moved to
        retrying is finished by its retry's delivery, unless the broker refused that message."""
        lifecycle, job_id, g = self.lifecycle(), run.job_id, run.delivery.generation
        if run.retrying:
            if not run.retry_sent:
                why = f"its retry could not be enqueued: {error or end.value}"
                self._write(lambda: lifecycle.fail_unsent_retry(job_id, why, generation=g))
        elif end is End.SUCCEEDED:
            self._write(lambda: lifecycle.succeed(job_id, generation=g))
        elif end is End.CANCELLED:
            self._write(lambda: lifecycle.cancel(job_id, error, generation=g))
        else:
            text = error or end.value
            self._write(lambda: self._fail(job_id, text, end is End.RETRYING, g))

    def fail_waiting(self, job_id: str, generation: int | None, error: str) -> None:
        """A delivery the queue failed before any claim (Dramatiq's AgeLimit): queued or
        retrying → failed, at the delivery's generation."""
        change = Transition(
            to=JobState.FAILED, expect=_WAITING, expect_generation=generation, error=error
        )
        self._write(lambda: self.pending.submit(TransitionWrite(job_id, change)))

    def _write(self, write: Callable[[], object]) -> None:
        """A finish write; the ledger being down defers it (pending), anything else is a bug
        worth a warning, never an exception into the worker."""
        try:
            write()
        except JobLedgerError as exc:
            self.count("finish_unrecorded")
            log.warning("a job's end could not be recorded: %s", exc)
