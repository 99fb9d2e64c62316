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
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from jobledger.config import Settings
from jobledger.errors import JobLedgerError
from jobledger.integrations.base import registry
from jobledger.loop import Loop
from jobledger.model import JobRecord, JobState, to_epoch
from jobledger.stores.base import Store, Transition

log = logging.getLogger(__name__)

#: The name of the recovery lock in the store.
LOCK_NAME = "jobledger.recovery"

_STARTED = frozenset({JobState.STARTED})

Publisher = Callable[[JobRecord], None]


def publish_through_registry(record: JobRecord) -> None:
    """Publish ``record`` with the integration registered for its queue system."""
    registry.get(record.system).publish(record)


class Outcome(str, enum.Enum):
    """What :meth:`Recovery.recover` did with one orphan."""

    REQUEUED = "requeued"  # published again, now queued
    DEAD = "dead"  # over the recovery cap: a poison pill
    RACE_LOST = "race_lost"  # the job moved meanwhile (finished, taken over, recovered)
    PUBLISH_FAILED = "publish_failed"  # the broker did not take it; still started, next sweep


def over_recovery_cap(
    record: JobRecord, *, max_recoveries: int, window: float, now: Callable[[], float]
) -> bool:
    """True if recovering ``record`` once more would exceed the poison-pill cap (invariant 6).

    The store keeps the total of recoveries and the time of the latest only, so the count is
    taken as within the window when the latest recovery is; ``now`` (the store's clock) is
    asked only then. Shared by the sweep and by a
    claim that takes a job over from a dead owner, so neither path can rerun a poison pill.
    """
    if record.recoveries < max_recoveries:
        return False
    if max_recoveries == 0 or record.recovered_at is None:
        return True
    last = to_epoch(record.recovered_at)
    return last is not None and now() - last <= window


#: An instance silent for this many TTLs, holding no started job, is forgotten by the sweep.
PRUNE_AFTER_TTLS = 10


@dataclass
class SweepReport:
    """What one sweep did; ``locked_out`` means another recoverer held the lock.
    ``pruned`` lists the long-dead instances it forgot."""

    locked_out: bool = False
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
    """

    def __init__(
        self,
        store: Store,
        *,
        ttl: float,
        max_recoveries: int,
        recovery_window: float,
        lock_ttl: float = 30.0,
        publish: Publisher = publish_through_registry,
        batch: int = 500,
        systems: Collection[str] | None = None,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.max_recoveries = max_recoveries
        self.recovery_window = recovery_window
        self.lock_ttl = lock_ttl
        self.publish = publish
        self.batch = batch
        self.systems = None if systems is None else frozenset(systems)
        self.token = secrets.token_hex(8)

    @classmethod
    def from_settings(
        cls,
        store: Store,
        settings: Settings,
        *,
        publish: Publisher = publish_through_registry,
        systems: Collection[str] | None = None,
    ) -> Recovery:
        return cls(
            store,
            ttl=settings.ttl,
            max_recoveries=settings.max_recoveries,
            recovery_window=settings.recovery_window,
            lock_ttl=max(30.0, 2 * settings.recovery_interval),
            publish=publish,
            systems=systems,
        )

    def sweep_once(self) -> SweepReport:
        """One sweep under the lock (what ``jobledger recover`` runs). Ledger errors propagate."""
        report = SweepReport()
        if not self.store.acquire_lock(LOCK_NAME, self.token, self.lock_ttl):
            report.locked_out = True
            return report
        try:
            for orphan in self.store.orphans(self.ttl, limit=self.batch):
                if not self.covers(orphan):
                    continue  # another system's job: its own recoverer's business
                # Renew before each job: if the lock was lost, another sweeper owns the rest.
                if not self.store.acquire_lock(LOCK_NAME, self.token, self.lock_ttl):
                    log.warning("recovery lock lost mid-sweep: leaving the rest to its holder")
                    break
                report.outcomes[orphan.id] = self.recover(orphan)
            else:
                report.pruned = self._prune_dead_instances()
        finally:
            self.store.release_lock(LOCK_NAME, self.token)
        return report

    def covers(self, record: JobRecord) -> bool:
        """True if this sweep recovers jobs of ``record``'s queue system."""
        return self.systems is None or record.system in self.systems

    def _prune_dead_instances(self) -> list[str]:
        """Deregister instances long dead that no started job names as its owner. (A job's
        owner row going is harmless anyway: an owner that is missing is a dead one.)"""
        long_dead = [
            i.id
            for i in self.store.instances(self.ttl)
            if not i.alive and (i.heartbeat_age or 0) > PRUNE_AFTER_TTLS * self.ttl
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

        ``orphan`` is the record as read (its ``owner`` is the compare-and-set's expected owner).
        Also used by an integration for a job whose worker process died under it.
        """
        owner = orphan.owner
        if self._over_cap(orphan):
            error = (
                f"poison pill: recovered {orphan.recoveries} times within "
                f"{self.recovery_window:.0f}s (max {self.max_recoveries}); last owner {owner} "
                f"died under it ({why}). Not re-enqueued; restart it by hand once fixed."
            )
            change = Transition(to=JobState.DEAD, expect=_STARTED, expect_owner=owner, error=error)
            if self.store.transition(orphan.id, change):
                log.error("job %s (%s) is DEAD: %s", orphan.id, orphan.name, error)
                return Outcome.DEAD
            return self._race_lost(orphan)
        try:
            self.publish(orphan)  # invariant 1: publish first
        except JobLedgerError as exc:
            log.error("could not publish orphan %s (%s) again: %s", orphan.id, orphan.name, exc)
            return Outcome.PUBLISH_FAILED
        change = Transition(
            to=JobState.QUEUED, expect=_STARTED, expect_owner=owner, reason="recovery"
        )
        if self.store.transition(orphan.id, change):
            log.warning(
                "job %s (%s) recovered from %s (%s): published again, queued",
                orphan.id,
                orphan.name,
                owner,
                why,
            )
            return Outcome.REQUEUED
        return self._race_lost(orphan)

    def _over_cap(self, orphan: JobRecord) -> bool:
        return over_recovery_cap(
            orphan,
            max_recoveries=self.max_recoveries,
            window=self.recovery_window,
            now=self.store.now,
        )

    def _race_lost(self, orphan: JobRecord) -> Outcome:
        current = self.store.get(orphan.id)
        log.warning(
            "orphan %s moved while being recovered (now %s, owner %s): left as it is",
            orphan.id,
            current.state.value if current else "missing",
            current.owner if current else None,
        )
        return Outcome.RACE_LOST


class RecoveryLoop(Loop):
    """Runs :meth:`Recovery.sweep_once` shortly after start, then every ``interval`` seconds.

    ``enabled`` (e.g. the heartbeat's ``can_claim``) is asked before each sweep: an instance
    that cannot reach the ledger does not sweep.
    """

    def __init__(
        self,
        recovery: Recovery,
        *,
        interval: float,
        first_delay: float | None = None,
        enabled: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(
            "recovery",
            interval,
            self._sweep,
            first_delay=min(interval, 1.0) if first_delay is None else first_delay,
        )
        self.recovery = recovery
        self.enabled = enabled
        self.sweeps = 0

    def _sweep(self) -> None:
        if self.enabled():
            self.recovery.sweep_once()
            self.sweeps += 1
