"""What a worker does to the ledger around each job: claim it, then finish it.

Every step is a compare-and-set through the Store seam, so the races DESIGN.md names (a
redelivery while the job runs, a worker finishing while recovery re-enqueues it, a process that
was wrongly declared dead) each have exactly one winner, and the loser learns it and logs it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field, replace

from jobledger.config import DEFAULT_MAX_RECOVERIES, DEFAULT_RECOVERY_WINDOW
from jobledger.errors import StoreError
from jobledger.journal import LOCAL
from jobledger.model import CLAIMABLE_STATES, JobRecord, JobState, Republish
from jobledger.pending import PendingWrites, TransitionWrite
from jobledger.poison import RecoveryCap, with_recovery
from jobledger.stores.base import ANY, KEEP, Store, Transition

log = logging.getLogger(__name__)

_STARTED = frozenset({JobState.STARTED})
_STARTED_OR_RETRYING = frozenset({JobState.STARTED, JobState.RETRYING})
#: Final states a claim starts a job from only for a restart's delivery (the restart publishes
#: before it moves the record); any other delivery of such a job is a stray redelivery.
_RESTART_ONLY = frozenset({JobState.FAILED, JobState.DEAD})
#: States the job's current message (same generation) is claimed from.
_PENDING = CLAIMABLE_STATES - _RESTART_ONLY


class Claim(str, enum.Enum):
    """The outcome of :meth:`Lifecycle.claim`: run the body only when :attr:`should_run`."""

    CLAIMED = "claimed"  # moved to started, owned by this instance
    CREATED = "created"  # the record was missing (ledger down at publish): created as started
    TAKEN_OVER = "taken_over"  # started by an instance that is dead: now ours
    ALREADY_SUCCEEDED = "already_succeeded"  # a duplicate delivery of a finished job
    RUNNING_ELSEWHERE = "running_elsewhere"  # a live instance runs it now
    CANCELLED = "cancelled"  # a person cancelled it: acknowledge, do not run
    DEFERRED = "deferred"  # the ledger is unreachable: run it, the claim is replayed later
    NOT_RESTARTED = "not_restarted"  # failed or dead, and this delivery is no restart: skip
    POISON_PILL = "poison_pill"  # its dead owner's takeover is over the recovery cap: now dead
    STALE = "stale"  # an older generation than the record's: a republish superseded it
    ORPHANED = "orphaned"  # started by a dead owner: its recovery republishes it, not this

    @property
    def should_run(self) -> bool:
        return self in (Claim.CLAIMED, Claim.CREATED, Claim.TAKEN_OVER, Claim.DEFERRED)


@dataclass
class Lifecycle:
    """Ledger transitions for jobs run by one instance (``owner``, an instance id).

    ``ttl`` is the heartbeat TTL: an owner silent for longer is dead, and its started jobs may
    be taken over by a redelivery. ``delete_on_success`` removes a job's record when it succeeds
    (``JOBLEDGER_KEEP_SUCCEEDED=0``, as the seed's tracking tables did); the price is the claim
    guard's memory: a duplicate delivery that arrives after the deletion runs again.

    With ``pending``, a claim or finish that meets an unreachable ledger is kept there and
    replayed (invariant 7) instead of raising: the claim answers :attr:`Claim.DEFERRED` (run the
    body: at least once beats not at all) and the finish counts as done for now.

    ``max_recoveries`` and ``recovery_window`` are the poison-pill cap a takeover obeys, as
    the recovery sweep does.

    **Generations** (invariant 2). A delivery that carries one is judged by facts only: older
    than the record's, it is a stray a republish superseded (skipped); equal, it is the
    job's current message (claimed from staged, queued or retrying; a started job is left to
    its live owner, or to the recovery that republishes a dead owner's job); newer, its
    republish has not moved the record yet, so it runs (taking over a started record when its
    :class:`~jobledger.model.Republish` reason supersedes runs) and raises the record's
    generation to its own, which makes the republisher's move lose harmlessly. Finishes then
    compare the generation of the run, so a run superseded meanwhile changes nothing.
    Deliveries without a generation (published before generations) keep the older rules.
    """

    store: Store = field(metadata=LOCAL)  # not journaled: a replayed claim uses the replayer's
    owner: str
    ttl: float
    delete_on_success: bool = False
    pending: PendingWrites | None = field(default=None, metadata=LOCAL)
    max_recoveries: int = DEFAULT_MAX_RECOVERIES
    recovery_window: float = DEFAULT_RECOVERY_WINDOW

    def claim(
        self,
        job_id: str,
        record: JobRecord | None = None,
        *,
        restart: bool = False,
        generation: int | None = None,
        republish: Republish | None = None,
    ) -> Claim:
        """Take the job before its body runs (invariant 2). ``record`` describes the job in case
        the ledger has no record of it yet; it is created as started, owned by us.
        ``generation`` and ``republish`` are what the delivery's message carries (see the class
        docstring); ``restart`` (messages without a generation): a restart's message, so a
        failed or dead job may start again."""
        write = ClaimWrite(job_id, record, self, restart, generation, republish)
        if self.pending is None:
            return write.claim(self.store)
        # What this process still owes the job goes first (a retry delivered back to us).
        if self.pending.flush(job_id):
            try:
                return write.claim(self.store)
            except StoreError as exc:
                log.warning("job %s: claim deferred, the ledger is unavailable: %s", job_id, exc)
        self.pending.add(write)
        return Claim.DEFERRED

    def _claim(
        self,
        job_id: str,
        record: JobRecord | None,
        *,
        restart: bool = False,
        generation: int | None = None,
        republish: Republish | None = None,
    ) -> Claim:
        # a failed or dead job starts again from a restart's message only: one without a
        # generation says so in a header; one with a generation is newer than the record
        expect = CLAIMABLE_STATES if restart and generation is None else _PENDING
        for _ in range(3):
            claim = Transition(
                to=JobState.STARTED,
                expect=expect,
                owner=self.owner,
                expect_generation=generation,
            )
            if self.store.transition(job_id, claim):
                return Claim.CLAIMED
            current = self.store.get(job_id)
            if current is None:
                if record is None:
                    raise LookupError(f"job {job_id} is not in the ledger and no record was given")
                if self.store.create(self._as_started(record, generation)):
                    return Claim.CREATED
                continue  # created by someone else meanwhile: judge that record
            if generation is None:
                outcome = self._judge(current, restart=restart)
            else:
                outcome = self._judge_generation(current, generation, republish)
            if outcome is not None:
                return outcome
        return Claim.RUNNING_ELSEWHERE

    def _judge_generation(
        self, current: JobRecord, generation: int, republish: Republish | None
    ) -> Claim | None:
        """The claim of a delivery that carries ``generation`` (the class docstring's rules).
        None: the job moved between our reads; try again."""
        if generation < current.generation:
            log.info(
                "job %s: delivery of generation %d is stale (the ledger is at %d): skipped",
                current.id,
                generation,
                current.generation,
            )
            return Claim.STALE
        # only a restart's message, newer than the record, starts a failed or dead job again:
        # a recovery or requeue that lost its race to a run that then failed must not
        closed = self._closed(
            current,
            restart=generation > current.generation and republish is Republish.RESTART,
        )
        if closed is not None:
            return closed
        if generation == current.generation:
            if current.state is not JobState.STARTED:
                return None
            if current.owner != self.owner and not self._alive(current.owner):
                log.warning(
                    "job %s: its owner %s is dead; left to the recovery that republishes it",
                    current.id,
                    current.owner,
                )
                return Claim.ORPHANED
            log.warning("job %s runs on %s: duplicate skipped", current.id, current.owner)
            return Claim.RUNNING_ELSEWHERE
        # newer than the record: its republish has not moved the record yet
        if current.state is JobState.STARTED and not (republish and republish.supersedes_run):
            log.warning(
                "job %s: a requeued message found it started by %s: skipped",
                current.id,
                current.owner,
            )
            return Claim.RUNNING_ELSEWHERE
        counted = republish.counted_as if republish else None
        ahead = Transition(
            to=JobState.STARTED,
            expect=frozenset({current.state}),
            expect_owner=current.owner if current.state is JobState.STARTED else ANY,
            owner=self.owner,
            expect_generation=current.generation,
            generation=generation,
            reason=counted,
            recent_recoveries=(
                with_recovery(current, self.store.now()) if counted == "recovery" else None
            ),
        )
        if not self.store.transition(current.id, ahead):
            return None
        if current.state is JobState.STARTED:
            log.warning(
                "job %s taken over from %s by its republished message", current.id, current.owner
            )
            return Claim.TAKEN_OVER
        return Claim.CLAIMED

    def _alive(self, owner: str | None) -> bool:
        return bool(owner) and self.store.is_alive(str(owner), self.ttl)

    @staticmethod
    def _closed(current: JobRecord, *, restart: bool) -> Claim | None:
        """The skip for a job that is closed to this delivery: succeeded, cancelled, or failed
        or dead when the delivery is no restart's (a stray redelivery); else None."""
        if current.state in _RESTART_ONLY and not restart:
            log.warning(
                "job %s is %s and this delivery is no restart (a stray redelivery): skipped",
                current.id,
                current.state.value,
            )
            return Claim.NOT_RESTARTED
        if current.state is JobState.SUCCEEDED:
            log.warning("job %s already succeeded: duplicate delivery skipped", current.id)
            return Claim.ALREADY_SUCCEEDED
        if current.state is JobState.CANCELLED:
            log.info("job %s was cancelled: delivery acknowledged, not run", current.id)
            return Claim.CANCELLED
        return None

    def _judge(self, current: JobRecord, *, restart: bool) -> Claim | None:
        closed = self._closed(current, restart=restart)
        if closed is not None:
            return closed
        if current.state is not JobState.STARTED:
            return None  # moved between our two reads: try the claim again
        if current.owner == self.owner:
            log.warning("job %s delivered again to its own owner: skipped", current.id)
            return Claim.RUNNING_ELSEWHERE
        if current.owner and self.store.is_alive(current.owner, self.ttl):
            log.warning(
                "job %s runs on live instance %s: duplicate skipped", current.id, current.owner
            )
            return Claim.RUNNING_ELSEWHERE
        if self.cap.reached(current, self.store.now):
            return self._bury(current)
        takeover = Transition(
            to=JobState.STARTED,
            expect=_STARTED,
            expect_owner=current.owner,
            owner=self.owner,
            reason="recovery",
        )
        if self.store.transition(current.id, takeover):
            log.warning("job %s taken over from dead instance %s", current.id, current.owner)
            return Claim.TAKEN_OVER
        return None

    def _bury(self, current: JobRecord) -> Claim | None:
        """A takeover would rerun a poison pill: bury it, as the sweep would, and skip.
        None: the job moved meanwhile; judge it again."""
        if not self.cap.bury(self.store, current, "a redelivery would have run it again"):
            return None
        return Claim.POISON_PILL

    @property
    def cap(self) -> RecoveryCap:
        return RecoveryCap(self.max_recoveries, self.recovery_window)

    def _as_started(self, record: JobRecord, generation: int | None) -> JobRecord:
        return replace(
            record,
            state=JobState.STARTED,
            owner=self.owner,
            attempts=1,
            generation=generation or 0,
        )

    # Every finish takes the ``generation`` the run claimed (None: its message had none) and
    # compares it with owner and state (invariant 3): a run a republish superseded meanwhile,
    # even one on this same instance, changes nothing.
    def succeed(self, job_id: str, *, generation: int | None = None) -> bool:
        """started → succeeded, only if we still own it (invariant 3). False: the job was
        lost to another actor; True: done, or (with ``pending``) deferred until the ledger
        answers."""
        return self._finish(
            job_id, JobState.SUCCEEDED, None, generation, delete=self.delete_on_success
        )

    def fail(
        self, job_id: str, error: str, *, will_retry: bool, generation: int | None = None
    ) -> bool:
        """started → retrying (the queue retries it, invariant 8) or → failed (none left)."""
        to = JobState.RETRYING if will_retry else JobState.FAILED
        return self._finish(job_id, to, error, generation)

    def fail_unsent_retry(self, job_id: str, error: str, *, generation: int | None = None) -> bool:
        """started or retrying → failed: the job failed while its retry was being published
        (it may already be ``retrying``, moved before the broker refused the message)."""
        return self._finish(job_id, JobState.FAILED, error, generation, expect=_STARTED_OR_RETRYING)

    def cancel(
        self, job_id: str, reason: str | None = None, *, generation: int | None = None
    ) -> bool:
        """started → cancelled (revoked while we ran it)."""
        return self._finish(job_id, JobState.CANCELLED, reason, generation)

    def release(self, job_id: str, *, generation: int | None = None) -> bool:
        """started → queued: the job goes back to its queue unrun (a requeueing reject)."""
        return self._finish(job_id, JobState.QUEUED, None, generation)

    def _finish(
        self,
        job_id: str,
        to: JobState,
        error: str | None,
        generation: int | None,
        *,
        delete: bool = False,
        expect: frozenset[JobState] = _STARTED,
    ) -> bool:
        change = Transition(
            to=to,
            expect=expect,
            expect_owner=self.owner,
            error=KEEP if error is None else error,
            expect_generation=generation,
        )
        write = TransitionWrite(job_id, change, delete=delete)
        if self.pending is None:
            return write.apply(self.store)
        return self.pending.submit(write) is not False


@dataclass(frozen=True)
class ClaimWrite:
    """A claim as a write: made at once, or (the ledger unreachable while the job ran anyway)
    replayed later, so the finish writes queued behind it find the job started by us."""

    job_id: str
    record: JobRecord | None
    lifecycle: Lifecycle
    restart: bool = False
    generation: int | None = None
    republish: Republish | None = None

    def claim(self, store: Store) -> Claim:
        on_store = replace(self.lifecycle, store=store, pending=None)
        return on_store._claim(
            self.job_id,
            self.record,
            restart=self.restart,
            generation=self.generation,
            republish=self.republish,
        )

    def apply(self, store: Store, *, retried: bool = False) -> bool:
        owner = self.lifecycle.owner
        if retried:  # an earlier try may have committed before its answer was lost
            current = store.get(self.job_id)
            if (
                current
                and current.state is JobState.STARTED
                and current.owner == owner
                and (self.generation is None or current.generation == self.generation)
            ):
                return True
        claim = self.claim(store)
        if claim.should_run:
            return True
        log.warning(
            "job %s ran here while the ledger was unreachable, but its late claim found it %s: "
            "this run was a duplicate",
            self.job_id,
            claim.value,
        )
        return False

    def describe(self) -> str:
        return "claim"
