"""What a worker does to the ledger around each job: claim it, then finish it.

Every step is a compare-and-set through the Store seam, so the races DESIGN.md names (a
redelivery while the job runs, a worker finishing while recovery re-enqueues it, a process that
was wrongly declared dead) each have exactly one winner, and the loser learns it and logs it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace

from jobledger.errors import StoreError
from jobledger.model import CLAIMABLE_STATES, JobRecord, JobState
from jobledger.pending import PendingWrites, TransitionWrite
from jobledger.stores.base import KEEP, Store, Transition

log = logging.getLogger(__name__)

_STARTED = frozenset({JobState.STARTED})


class Claim(str, enum.Enum):
    """The outcome of :meth:`Lifecycle.claim`: run the body only when :attr:`should_run`."""

    CLAIMED = "claimed"  # moved to started, owned by this instance
    CREATED = "created"  # the record was missing (ledger down at publish): created as started
    TAKEN_OVER = "taken_over"  # started by an instance that is dead: now ours
    ALREADY_SUCCEEDED = "already_succeeded"  # a duplicate delivery of a finished job
    RUNNING_ELSEWHERE = "running_elsewhere"  # a live instance runs it now
    CANCELLED = "cancelled"  # a person cancelled it: acknowledge, do not run
    DEFERRED = "deferred"  # the ledger is unreachable: run it, the claim is replayed later

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
    """

    store: Store
    owner: str
    ttl: float
    delete_on_success: bool = False
    pending: PendingWrites | None = None

    def claim(self, job_id: str, record: JobRecord | None = None) -> Claim:
        """Take the job before its body runs (invariant 2). ``record`` describes the job in case
        the ledger has no record of it yet; it is created as started, owned by us."""
        if self.pending is None:
            return self._claim(job_id, record)
        # What this process still owes the job goes first (a retry delivered back to us).
        if self.pending.flush(job_id):
            try:
                return self._claim(job_id, record)
            except StoreError as exc:
                log.warning("job %s: claim deferred, the ledger is unavailable: %s", job_id, exc)
        self.pending.add(ClaimWrite(job_id, record, self.owner, self.ttl))
        return Claim.DEFERRED

    def _claim(self, job_id: str, record: JobRecord | None) -> Claim:
        for _ in range(3):
            claim = Transition(to=JobState.STARTED, expect=CLAIMABLE_STATES, owner=self.owner)
            if self.store.transition(job_id, claim):
                return Claim.CLAIMED
            current = self.store.get(job_id)
            if current is None:
                if record is None:
                    raise LookupError(f"job {job_id} is not in the ledger and no record was given")
                if self.store.create(self._as_started(record)):
                    return Claim.CREATED
                continue  # created by someone else meanwhile: judge that record
            outcome = self._judge(current)
            if outcome is not None:
                return outcome
        return Claim.RUNNING_ELSEWHERE

    def _judge(self, current: JobRecord) -> Claim | None:
        if current.state is JobState.SUCCEEDED:
            log.warning("job %s already succeeded: duplicate delivery skipped", current.id)
            return Claim.ALREADY_SUCCEEDED
        if current.state is JobState.CANCELLED:
            log.info("job %s was cancelled: delivery acknowledged, not run", current.id)
            return Claim.CANCELLED
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

    def _as_started(self, record: JobRecord) -> JobRecord:
        return replace(record, state=JobState.STARTED, owner=self.owner, attempts=1)

    def succeed(self, job_id: str) -> bool:
        """started → succeeded, only if we still own it (invariant 3). False: the job was
        lost to another actor; True: done, or (with ``pending``) deferred until the ledger
        answers."""
        return self._finish(job_id, JobState.SUCCEEDED, None, delete=self.delete_on_success)

    def fail(self, job_id: str, error: str, *, will_retry: bool) -> bool:
        """started → retrying (the queue retries it, invariant 8) or → failed (none left)."""
        return self._finish(job_id, JobState.RETRYING if will_retry else JobState.FAILED, error)

    def cancel(self, job_id: str, reason: str | None = None) -> bool:
        """started → cancelled (revoked while we ran it)."""
        return self._finish(job_id, JobState.CANCELLED, reason)

    def release(self, job_id: str) -> bool:
        """started → queued: the job goes back to its queue unrun (a requeueing reject)."""
        return self._finish(job_id, JobState.QUEUED, None)

    def _finish(
        self, job_id: str, to: JobState, error: str | None, *, delete: bool = False
    ) -> bool:
        change = Transition(
            to=to, expect=_STARTED, expect_owner=self.owner, error=KEEP if error is None else error
        )
        write = TransitionWrite(job_id, change, delete=delete)
        if self.pending is None:
            return write.apply(self.store)
        return self.pending.submit(write) is not False


@dataclass(frozen=True)
class ClaimWrite:
    """A claim that met an unreachable ledger while the job ran anyway, replayed later so the
    finish writes queued behind it find the job started and owned by us."""

    job_id: str
    record: JobRecord | None
    owner: str
    ttl: float

    def apply(self, store: Store, *, retried: bool = False) -> bool:
        if retried:  # an earlier try may have committed before its answer was lost
            current = store.get(self.job_id)
            if current and current.state is JobState.STARTED and current.owner == self.owner:
                return True
        claim = Lifecycle(store, self.owner, self.ttl)._claim(self.job_id, self.record)
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
