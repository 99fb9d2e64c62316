"""What a worker does to the ledger around each job: claim it, then finish it.

Every step is a compare-and-set through the Store seam, so the races DESIGN.md names (a
redelivery while the job runs, a worker finishing while recovery re-enqueues it, a process that
was wrongly declared dead) each have exactly one winner, and the loser learns it and logs it.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace

from jobledger.model import CLAIMABLE_STATES, JobRecord, JobState
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

    @property
    def should_run(self) -> bool:
        return self in (Claim.CLAIMED, Claim.CREATED, Claim.TAKEN_OVER)


@dataclass
class Lifecycle:
    """Ledger transitions for jobs run by one instance (``owner``, an instance id).

    ``ttl`` is the heartbeat TTL: an owner silent for longer is dead, and its started jobs may
    be taken over by a redelivery.
    """

    store: Store
    owner: str
    ttl: float

    def claim(self, job_id: str, record: JobRecord | None = None) -> Claim:
        """Take the job before its body runs (invariant 2). ``record`` describes the job in case
        the ledger has no record of it yet; it is created as started, owned by us."""
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
        """started → succeeded, only if we still own it (invariant 3)."""
        return self._finish(job_id, JobState.SUCCEEDED, None)

    def fail(self, job_id: str, error: str, *, will_retry: bool) -> bool:
        """started → retrying (the queue retries it, invariant 8) or → failed (none left)."""
        return self._finish(job_id, JobState.RETRYING if will_retry else JobState.FAILED, error)

    def cancel(self, job_id: str, reason: str | None = None) -> bool:
        """started → cancelled (revoked while we ran it)."""
        return self._finish(job_id, JobState.CANCELLED, reason)

    def _finish(self, job_id: str, to: JobState, error: str | None) -> bool:
        change = Transition(
            to=to, expect=_STARTED, expect_owner=self.owner, error=KEEP if error is None else error
        )
        if self.store.transition(job_id, change):
            return True
        current = self.store.get(job_id)
        log.warning(
            "job %s finished as %s here, but the ledger has it %s (owner %s): this instance was "
            "declared dead and the job handed on; the result is not applied",
            job_id,
            to.value,
            current.state.value if current else "missing",
            current.owner if current else None,
        )
        return False
