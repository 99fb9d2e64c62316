"""The ends a worker's main process records for a job its child could not: a child that died
under it (lost), killed at its hard time limit (timed out), a revoke (cancelled), and a
publish the caller was told failed (not queued).

:meth:`Outcomes.lost` and :meth:`Outcomes.timed_out` return at once and do their ledger work
on a thread of their own, since they are called from the queue's own hooks (Celery's event
loop, RQ's parent between jobs) that a slow ledger or broker must not stall (invariant 7).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from jobledger.errors import JobLedgerError, PublishError
from jobledger.model import ORPHAN_OPTION, JobRecord, JobState, OrphanPolicy, Republish
from jobledger.pending import TransitionWrite
from jobledger.stores.base import ANY, KEEP, Transition

if TYPE_CHECKING:
    from jobledger.runtime.worker import WorkerRuntime

log = logging.getLogger(__name__)

_STARTED = frozenset({JobState.STARTED})
_WAITING = frozenset({JobState.QUEUED, JobState.RETRYING})


def _in_background(name: str, target: Callable[..., None], *args: Any) -> None:
    threading.Thread(target=target, args=args, name=f"jobledger-{name}", daemon=True).start()


class Outcomes:
    """The main process's finishes for one worker runtime."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def lost(self, job_id: str, why: str) -> None:
        """The child running (or handed) ``job_id`` died: put the job back, now."""
        if self.runtime.instance_id is None:
            return
        # what was handed to the child, read now: the queue may forget it soon after
        delivered = self.runtime.held.take(job_id)
        _in_background(f"lost-{job_id}", self.recover_lost, job_id, why, delivered)

    def timed_out(self, job_id: str, why: str) -> None:
        """The queue killed the child at the job's hard time limit: the job failed."""
        if self.runtime.instance_id is not None:
            _in_background(f"timed-out-{job_id}", self.fail_timed_out, job_id, why)

    def recover_lost(self, job_id: str, why: str, delivered: JobRecord | None) -> None:
        """Put back the job of a child that died under it (the main process knows what it
        handed that child): a job the child had claimed (started by this instance:
        recovered, as its task's orphan policy says), and one whose claim never landed (still
        queued or retrying at the delivery's generation: its body never ran, so it is
        requeued). What the dead child still owed the ledger (a journaled claim or finish) is
        replayed first, so the record judged is the one it left."""
        runtime = self.runtime
        why = f"its pool process died: {why}"
        try:
            settled = runtime.pending.flush(job_id)
            record = runtime.store.get(job_id) if settled else None
        except JobLedgerError:
            settled, record = False, None
        if not settled:
            if delivered is not None:
                self._put_back_unreachable(delivered, why)
            else:
                log.warning("job %s lost its process; the sweep will recover it", job_id)
            return
        if record is None or (delivered is not None and record.generation != delivered.generation):
            return  # republished meanwhile: that newer message is the job's
        try:
            if record.state is JobState.STARTED and record.owner == runtime.instance_id:
                runtime.recovery().recover(record, why=why)
            elif record.state in _WAITING and delivered is not None:
                runtime.recovery().requeue(record, why=why)
        except JobLedgerError as exc:
            log.warning("job %s lost its process; the sweep will recover it: %s", job_id, exc)

    def _put_back_unreachable(self, delivered: JobRecord, why: str) -> None:
        """The ledger is down, so whether the dead child's claim landed (and its body ran)
        is unknown. A job its task lets run again is published now as the next generation,
        from what its delivery said, as a recovery (it supersedes the run if the claim did
        land); one its task forbids to run twice is failed or discarded. Either way the
        ledger's move waits in the journal, after the dead child's own writes."""
        runtime = self.runtime
        policy = OrphanPolicy.parse(delivered.options.get(ORPHAN_OPTION, OrphanPolicy.REQUEUE))
        if policy is OrphanPolicy.REQUEUE:
            after = replace(delivered, generation=delivered.generation + 1)
            try:
                runtime.adapter.publish(after, reason=Republish.RECOVERY)
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
        for source, owner in ((_STARTED, runtime.instance_id), (_WAITING, ANY)):
            move = Transition(
                to=to,
                expect=source,
                expect_owner=owner,
                expect_generation=delivered.generation,
                generation=generation,
                reason="recovery" if to is JobState.QUEUED else None,
                error=KEEP if error is None else error,
            )
            runtime.pending.submit(TransitionWrite(delivered.id, move))
        log.warning("job %s: %s; ledger unreachable, %s journaled", delivered.id, why, to.value)

    def fail_timed_out(self, job_id: str, why: str) -> None:
        """started → failed for the job whose child the queue killed at its hard time limit
        (the killed child recorded nothing); a job retrying meanwhile is left to its retry."""
        change = Transition(
            to=JobState.FAILED,
            expect=_STARTED,
            expect_owner=self.runtime.instance_id,
            error=f"hard time limit exceeded, the pool process was killed ({why})",
        )
        self._write(job_id, change, "hit its hard time limit", "failed: hard time limit exceeded")

    def cancelled(self, job_id: str, reason: str) -> None:
        """A revoke (or an expiry): a job not started yet is cancelled; one this instance runs
        too."""
        try:
            waiting = Transition(
                to=JobState.CANCELLED,
                expect=frozenset({JobState.QUEUED, JobState.RETRYING, JobState.STAGED}),
                error=reason,
            )
            if self.runtime.store.transition(job_id, waiting) or self.runtime.instance_id is None:
                return
        except JobLedgerError as exc:
            self._unrecorded(job_id, reason, exc)
            return
        running = Transition(
            to=JobState.CANCELLED,
            expect=_STARTED,
            expect_owner=self.runtime.instance_id,
            error=reason,
        )
        self._write(job_id, running, reason)

    def unpublished(self, job_id: str, exc: Exception) -> None:
        """The publish of a job recorded as queued raised, and the caller was told: the
        record says so too (cancelled, with the error), instead of waiting as queued for a
        message that may never exist, which the lost-message sweep would publish behind the
        caller's back."""
        change = Transition(
            to=JobState.CANCELLED,
            expect=frozenset({JobState.QUEUED}),
            expect_owner=None,
            expect_generation=0,
            error=f"not queued: its publish failed and the caller was told ({exc!r})",
        )
        self.runtime.pending.submit(TransitionWrite(job_id, change))

    def _write(self, job_id: str, change: Transition, what: str, done: str | None = None) -> None:
        try:
            if self.runtime.store.transition(job_id, change) and done:
                log.error("job %s %s", job_id, done)
        except JobLedgerError as exc:
            self._unrecorded(job_id, what, exc)

    def _unrecorded(self, job_id: str, what: str, exc: JobLedgerError) -> None:
        self.runtime.count("finish_unrecorded")
        log.warning("job %s %s, not recorded: %s", job_id, what, exc)
