"""The orphan sweep: jobs of dead instances go back on their queue (invariants 1, 6 and 10).

One sweep holds the store's token-checked lock, so concurrent recoverers (every live worker and
the supervisor run the sweep) do not publish the same orphan twice; each job still moves by its
own compare-and-set, so a lock that expires mid-sweep costs at most a duplicate message, which
the claim guard absorbs. Each orphan is published again *first* and moved started → queued
after, so a crash between the two leaves a duplicate, never a loss. A job recovered too often
within the window is a poison pill and goes to ``dead`` instead, with the reason in its error.

Nothing here imports a queue system: publishing goes through the integration registry.
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

from jobledger.config import Settings
from jobledger.errors import JobLedgerError
from jobledger.integrations.base import QueueProbe, registry
from jobledger.model import (
    ORPHAN_OPTION,
    Instance,
    JobRecord,
    JobState,
    OrphanPolicy,
    QueueStats,
    Republish,
    to_epoch,
)
from jobledger.poison import RecoveryCap, with_recovery
from jobledger.query import JobQuery
from jobledger.stores.base import Store, Transition

log = logging.getLogger(__name__)

#: The name of the recovery lock in the store.
LOCK_NAME = "jobledger.recovery"

_STARTED = frozenset({JobState.STARTED})
#: The states of a job an instance received and had not started (its claim never landed).
_PREFETCHED = frozenset({JobState.QUEUED, JobState.RETRYING})


class Publisher(Protocol):
    """Publishes a job again: the record carries the new generation, the reason goes in the
    message (see :meth:`jobledger.integrations.base.Integration.publish`)."""

    def __call__(self, record: JobRecord, *, reason: Republish) -> None: ...


#: The :class:`~jobledger.integrations.base.QueueProbe` of a queue system, or None.
ProbeLookup = Callable[[str], QueueProbe | None]


class Outcome(str, enum.Enum):
    """What :meth:`Recovery.recover` did with one orphan."""

    REQUEUED = "requeued"  # published again, now queued
    DEAD = "dead"  # over the recovery cap: a poison pill
    FAILED = "failed"  # its task's orphan policy is "fail": failed with the reason
    DISCARDED = "discarded"  # its task's orphan policy is "discard": cancelled with the reason
    RACE_LOST = "race_lost"  # the job moved meanwhile (finished, taken over, recovered)
    PUBLISH_FAILED = "publish_failed"  # the broker did not take it; still started, next sweep


def _waiting(stats: QueueStats) -> int:
    return sum(stats.counts.get(state, 0) for state in _PREFETCHED)


#: The outcomes that moved a job (what ``jobledger_recoveries_total`` counts).
MOVED = frozenset({Outcome.REQUEUED, Outcome.DEAD, Outcome.FAILED, Outcome.DISCARDED})


#: An instance silent for this many TTLs, holding no started job, is forgotten by the sweep.
PRUNE_AFTER_TTLS = 10


@dataclass
class SweepReport:
    """What one sweep did; ``locked_out`` means another recoverer held the lock.
    ``pruned`` lists the long-dead instances it forgot."""

    locked_out: bool = False
    #: The sweep judged nothing: the ledger has not been up for a full TTL as seen from here.
    waiting: bool = False
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)

    def ids(self, outcome: Outcome) -> list[str]:
        return sorted(job_id for job_id, o in self.outcomes.items() if o is outcome)


class Recovery:
    """Finds orphans (started jobs whose owner missed its heartbeat TTL) and recovers them.

    ``publish`` defaults to the integration registry; ``lock_ttl`` bounds how long a crashed
    sweeper blocks the others. ``max_recoveries`` and ``recovery_window`` are the poison-pill cap.
    Instances that crashed never deregister, so the sweep forgets those silent for
    ``PRUNE_AFTER_TTLS`` TTLs once they hold no started job (their rows would pile up forever).
    ``systems`` limits the sweep to orphans of those queue systems (None: every system, and
    ``publish`` decides): a worker recovers its own system's jobs only, since publishing another
    system's job (an ``http`` job of the supervisor's seed endpoints) onto its queue loses it.

    Besides started orphans, the sweep puts back the jobs a dead instance had *received but
    not started* (prefetched: still ``queued`` at the generation it received), read from the
    ``holding`` list of its last heartbeat; their messages sit unacknowledged in the broker,
    and a surviving copy is skipped as stale once the new generation is published.

    With ``probe`` the sweep also finds queued jobs whose message the broker lost
    (a broker restarted without persistence): a job is lost when, at two sweeps in a row, it
    sat unmoved in a queue for which the broker held no message at all, and no live instance
    held it. It is published again with the next generation, so if its message was only late
    after all, the older copy is skipped. (A broker that lost some of a queue's messages but
    not all is not noticed: a person restarts those with ``--state queued --older-than``.)

    ``journaled`` says which of some jobs have a ledger write waiting in a worker's journal
    this process can read (its directory's): those ran while the ledger was unreachable and
    their outcome is on its way, so no path of the sweep puts them back (a dead worker's
    journal is replayed by the next worker to look; see
    :meth:`~jobledger.journal.Journal.journaled`).

    ``ledger_up_for`` says how long this process has seen the ledger answer without a break:
    liveness is judged only over time the ledger was up, so until it reaches the TTL no
    instance is declared dead (after an outage every heartbeat is old, because nobody could
    write one, not because anybody died).
    """

    def __init__(
        self,
        store: Store,
        *,
        ttl: float,
        max_recoveries: int,
        recovery_window: float,
        lock_ttl: float = 30.0,
        publish: Publisher = registry.publish,
        batch: int = 500,
        systems: Collection[str] | None = None,
        ledger_up_for: Callable[[], float] | None = None,
        on_orphan: OrphanPolicy = OrphanPolicy.REQUEUE,
        probe: ProbeLookup | None = None,
        journaled: Callable[[Collection[str]], set[str]] | None = None,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.cap = RecoveryCap(max_recoveries, recovery_window)
        self.lock_ttl = lock_ttl
        self.publish = publish
        self.batch = batch
        self.systems = None if systems is None else frozenset(systems)
        self.ledger_up_for = ledger_up_for
        self.on_orphan = on_orphan
        self.probe = probe
        self.journaled = journaled
        # queued jobs seen in an empty queue at the last sweep: id -> (generation, updated_at)
        self._suspects: dict[str, tuple[int, float | None]] = {}
        self.token = secrets.token_hex(8)

    @classmethod
    def from_settings(
        cls,
        store: Store,
        settings: Settings,
        *,
        publish: Publisher = registry.publish,
        systems: Collection[str] | None = None,
        ledger_up_for: Callable[[], float] | None = None,
        probe: ProbeLookup | None = None,
        journaled: Callable[[Collection[str]], set[str]] | None = None,
    ) -> Recovery:
        return cls(
            store,
            ttl=settings.ttl,
            max_recoveries=settings.max_recoveries,
            recovery_window=settings.recovery_window,
            # Two sweep intervals: the sweep renews it before each job, and every move is a
            # compare-and-set, so the lock saves duplicate work, not correctness. A longer floor
            # (it was 30 s) let a sweeper SIGKILLed mid-sweep hold up every other one that long.
            lock_ttl=2 * settings.recovery_interval,
            publish=publish,
            systems=systems,
            ledger_up_for=ledger_up_for,
            on_orphan=settings.on_orphan,
            probe=probe,
            journaled=journaled,
        )

    def sweep_once(self) -> SweepReport:
        """One sweep under the lock (what ``jobledger recover`` runs). Ledger errors propagate."""
        report = SweepReport()
        if self.ledger_up_for is not None and self.ledger_up_for() < self.ttl:
            report.waiting = True  # a death judged now could be the ledger's own outage
            return report
        if not self.store.acquire_lock(LOCK_NAME, self.token, self.lock_ttl):
            report.locked_out = True
            return report
        try:
            instances = self.store.instances(self.ttl)
            if (
                self._sweep_orphans(report)
                and self._requeue_held(report, instances)
                and self._requeue_lost(report, instances)
            ):
                report.pruned = self._prune_dead_instances(instances)
        finally:
            self.store.release_lock(LOCK_NAME, self.token)
        return report

    def _sweep_orphans(self, report: SweepReport) -> bool:
        """Recover started jobs of dead owners; False if the lock was lost midway."""
        orphans = self.store.orphans(self.ttl, limit=self.batch)
        journaled = self._journaled(o.id for o in orphans)
        for orphan in orphans:
            if not self.covers(orphan) or orphan.id in journaled:
                continue  # another system's job, or its outcome still in a journal
            if not self._renew():
                return False
            report.outcomes[orphan.id] = self.recover(orphan)
        return True

    def _requeue_held(self, report: SweepReport, instances: list[Instance]) -> bool:
        """Put back the jobs dead instances had received and not started; False if the lock
        was lost midway."""
        dead = [i for i in instances if not i.alive]
        journaled = self._journaled(job_id for i in dead for job_id, _ in i.holding)
        for instance in dead:
            for job_id, generation in instance.holding:
                if job_id in journaled:
                    continue  # it ran after all: its outcome waits in a journal
                record = self._still_held(job_id, generation)
                if record is None or not self.covers(record):
                    continue  # started (an orphan, above), finished, or put back already
                if not self._renew():
                    return False
                report.outcomes[job_id] = self.requeue(
                    record, why=f"its instance {instance.id} died holding it unstarted"
                )
        return True

    def _still_held(self, job_id: str, generation: int) -> JobRecord | None:
        """The job if it still waits, unstarted, at the generation an instance received."""
        record = self.store.get(job_id)
        if record is None or record.state not in _PREFETCHED or record.generation != generation:
            return None
        return record

    def _requeue_lost(self, report: SweepReport, instances: list[Instance]) -> bool:
        """Put back queued jobs whose message the broker lost (see the class docstring);
        False if the lock was lost midway."""
        if self.probe is None:
            return True
        held = {job_id for i in instances if i.alive for job_id, _ in i.holding}
        depth: dict[tuple[str, str], int | None] = {}  # this sweep's counts, per broker queue
        suspects: dict[str, tuple[int, float | None]] = {}
        waiting = [q.queue for q in self.store.queue_stats() if _waiting(q) > 0]
        for queue in waiting:
            query = JobQuery(
                states=_PREFETCHED,
                queues=frozenset({queue}),
                systems=self.systems or frozenset(),
            )
            records = self.store.query(query, limit=self.batch).items
            journaled = self._journaled(r.id for r in records)
            for record in records:
                if record.id in held or record.id in journaled:
                    continue  # a live instance has it, or it ran and its outcome is on its way
                if report.outcomes.get(record.id) is not None:
                    continue
                if self._ready(record, depth) != 0:
                    continue  # the broker holds messages there (or cannot tell): not lost
                seen = (record.generation, to_epoch(record.updated_at))
                suspects[record.id] = seen
                if self._suspects.get(record.id) != seen:
                    continue  # first sighting: a publish may be landing right now
                if not self._renew():
                    return False
                report.outcomes[record.id] = self.requeue(
                    record, why=f"its queue {queue} was empty in the broker at two sweeps"
                )
                suspects.pop(record.id)
        self._suspects = suspects
        return True

    def _journaled(self, job_ids: Iterable[str]) -> set[str]:
        """Of ``job_ids``, those with a ledger write waiting in a journal this process can
        read: never put back, their outcome is on its way (see ``journaled`` in the class
        docstring)."""
        if self.journaled is None:
            return set()
        return self.journaled(set(job_ids))

    def _ready(self, record: JobRecord, depth: dict[tuple[str, str], int | None]) -> int | None:
        """Messages ready where ``record``'s message waits (counted once per broker queue in
        a sweep); None: its integration cannot tell, so the job is never judged lost."""
        probe = self.probe(record.system) if self.probe is not None else None
        queue = probe.broker_queue(record) if probe is not None else None
        if probe is None or queue is None:
            return None
        key = (record.system, queue)
        if key not in depth:
            depth[key] = probe.ready_messages(queue)
        return depth[key]

    def _renew(self) -> bool:
        """Renew the lock before each job: if it was lost, another sweeper owns the rest."""
        if self.store.acquire_lock(LOCK_NAME, self.token, self.lock_ttl):
            return True
        log.warning("recovery lock lost mid-sweep: leaving the rest to its holder")
        return False

    def covers(self, record: JobRecord) -> bool:
        """True if this sweep recovers jobs of ``record``'s queue system."""
        return self.systems is None or record.system in self.systems

    def _prune_dead_instances(self, instances: list[Instance]) -> list[str]:
        """Deregister instances long dead that no started job names as its owner and whose
        held jobs were all put back (their row is what says those jobs need it). (A job's
        owner row going is harmless anyway: an owner that is missing is a dead one.)"""
        long_dead = [
            i.id
            for i in instances
            if not i.alive
            and (i.heartbeat_age or 0) > PRUNE_AFTER_TTLS * self.ttl
            and not any(self._still_held(job_id, g) for job_id, g in i.holding)
        ]
        if not long_dead:
            return []
        holding = self.store.orphans(self.ttl, limit=self.batch)
        if len(holding) >= self.batch:
            return []  # more orphans than one read shows: prune on a quieter sweep
        owners = {o.owner for o in holding}
        pruned = [i for i in long_dead if i not in owners and self.store.deregister(i)]
        for instance_id in pruned:
            log.info("forgot instance %s: silent for over %d TTLs", instance_id, PRUNE_AFTER_TTLS)
        return pruned

    def recover(self, orphan: JobRecord, *, why: str = "its owner stopped beating") -> Outcome:
        """Publish one orphan again then move it to queued, or to dead over the cap.

        ``orphan`` is the record as read: its ``owner`` and ``generation`` are what the
        compare-and-set expects, and the message carries the generation after it. Also used
        by an integration for a job whose worker process died under it. A job whose task
        chose another :class:`~jobledger.model.OrphanPolicy` is failed or cancelled instead,
        with the reason, and never published.
        """
        policy = self.policy_of(orphan)
        if policy is not OrphanPolicy.REQUEUE:
            return self._settle(orphan, policy, why)
        if self.cap.reached(orphan, self.store.now):
            if self.cap.bury(self.store, orphan, why):
                return Outcome.DEAD
            return self._race_lost(orphan)
        return self._republish(orphan, Republish.RECOVERY, why)

    def policy_of(self, record: JobRecord) -> OrphanPolicy:
        """The job's own orphan policy (recorded at publish), else this recoverer's default;
        an unreadable one counts as the default, with a warning."""
        named = record.options.get(ORPHAN_OPTION)
        if named is None:
            return self.on_orphan
        try:
            return OrphanPolicy.parse(named)
        except JobLedgerError as exc:
            log.warning("job %s: %s; using %s", record.id, exc, self.on_orphan.value)
            return self.on_orphan

    def _settle(self, orphan: JobRecord, policy: OrphanPolicy, why: str) -> Outcome:
        """started → failed or cancelled: the task asked not to be run again after its worker
        died mid-run, so a person decides (a restart runs it again)."""
        error = (
            f"orphaned: its worker {orphan.owner} died while it ran ({why}); not run again, "
            f"as its task asks (on_orphan={policy.value}). Restart it by hand if it is safe."
        )
        to, outcome = (
            (JobState.FAILED, Outcome.FAILED)
            if policy is OrphanPolicy.FAIL
            else (JobState.CANCELLED, Outcome.DISCARDED)
        )
        change = Transition(
            to=to,
            expect=_STARTED,
            expect_owner=orphan.owner,
            expect_generation=orphan.generation,
            error=error,
        )
        if not self.store.transition(orphan.id, change):
            return self._race_lost(orphan)
        log.error("job %s (%s) is %s: %s", orphan.id, orphan.name, to.value, error)
        return outcome

    def requeue(
        self, record: JobRecord, *, why: str, reason: Republish = Republish.REQUEUE
    ) -> Outcome:
        """Publish a queued job whose message is gone (held by a dead instance or process)
        again with the next generation, then move it queued → queued there. ``reason``
        RECOVERY where the lost holder may have claimed it meanwhile (its message must then
        supersede that run)."""
        return self._republish(record, reason, why)

    def _republish(self, record: JobRecord, reason: Republish, why: str) -> Outcome:
        after = replace(record, generation=record.generation + 1)
        registry.republishing(after, reason)
        try:
            self.publish(after, reason=reason)  # invariant 1: publish first
        except JobLedgerError as exc:
            log.error("could not publish job %s (%s) again: %s", record.id, record.name, exc)
            return Outcome.PUBLISH_FAILED
        counted = reason.counted_as
        change = Transition(
            to=JobState.QUEUED,
            expect=frozenset({record.state}),
            expect_owner=record.owner,
            expect_generation=record.generation,
            generation=after.generation,
            reason=counted,
            recent_recoveries=(
                with_recovery(record, self.store.now()) if counted == "recovery" else None
            ),
        )
        if self.store.transition(record.id, change):
            log.warning(
                "job %s (%s) recovered from %s (%s): published again as generation %d, queued",
                record.id,
                record.name,
                record.owner or "its queue",
                why,
                after.generation,
            )
            return Outcome.REQUEUED
        return self._race_lost(record)

    def _race_lost(self, orphan: JobRecord) -> Outcome:
        current = self.store.get(orphan.id)
        log.warning(
            "orphan %s moved while being recovered (now %s, owner %s): left as it is",
            orphan.id,
            current.state.value if current else "missing",
            current.owner if current else None,
        )
        return Outcome.RACE_LOST
