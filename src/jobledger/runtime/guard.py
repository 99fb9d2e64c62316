"""The claim guard: the one call an adapter wraps around a task body (invariants 2 and 3).

:meth:`Guard.run` claims the delivery's job before the body runs, runs it only if the claim
says so (else raises :class:`~jobledger.errors.DeliverySkipped`: acknowledge, do not run),
and records how the body ended, fenced by the generation the run claimed. How a queue's own
exception ends a job (a retry, a requeueing reject...) is the adapter's :data:`Judge`; the
guard does the ledger writes. A ledger that is down never stops a body: the claim and the
finish are journaled (invariant 7), and a claim that cannot even be journaled runs the body
unclaimed (at least once beats not at all).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from jobledger.errors import DeliverySkipped, JobLedgerError
from jobledger.lifecycle import Claim
from jobledger.model import JobRecord, Republish
from jobledger.runtime import forksafe
from jobledger.tracebacks import task_traceback

if TYPE_CHECKING:
    from jobledger.runtime.worker import WorkerRuntime

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The counter a skipped delivery raises, by the claim's outcome (else ``duplicates_skipped``).
_SKIP_COUNTERS = {
    Claim.NOT_RESTARTED: "stray_redeliveries_skipped",
    Claim.STALE: "stale_deliveries_skipped",
    Claim.ORPHANED: "orphan_deliveries_skipped",
}


@dataclass(frozen=True)
class Delivery:
    """What one delivery of a tracked job says, as the adapter read it from its message."""

    #: The job as the message describes it (created as started if the ledger has no record:
    #: the ledger was down at publish), with the options to publish it again.
    record: JobRecord
    #: The message's fencing generation; None for a message published before generations.
    generation: int | None
    #: Why jobledger published this message again (None: a first publish, or a retry).
    republish: Republish | None = None
    #: A restart's message (read only for messages without a generation).
    restart: bool = False
    #: Whatever the adapter wants back while the run lasts (:meth:`Guard.running`).
    context: object = None

    @property
    def job_id(self) -> str:
        return self.record.id


@dataclass
class Run:
    """A job this process claimed and runs now."""

    delivery: Delivery
    #: Moved to retrying during the run (its retry's message is being published).
    retrying: bool = False
    #: The broker took its retry's message: set by an adapter that sees that publish apart
    #: from the body's end (Dramatiq's ``after_enqueue``), which ends a retrying run
    #: ``RETRYING`` if so and ``FAILED`` if not (:meth:`Guard.end`).
    retry_sent: bool = False

    @property
    def generation(self) -> int | None:
        return self.delivery.generation


class End(str, enum.Enum):
    """How a body that raised ended, as the adapter judges its queue's exception."""

    SUCCEEDED = "succeeded"  # ended on purpose without a result (Celery's Ignore)
    RETRYING = "retrying"  # the queue runs it again (the record waits as retrying)
    FAILED = "failed"  # no more tries
    RELEASED = "released"  # back on its queue unrun (a requeueing reject)
    CANCELLED = "cancelled"  # stopped on purpose (an abort, a stop request)


#: The adapter's reading of an exception the body raised: the end and its error text, or None
#: for an ordinary failure (failed, with the traceback from the task's frames on:
#: :func:`~jobledger.tracebacks.task_traceback` without jobledger's and the runtime's
#: ``wrappers`` packages' leading frames).
Judge = Callable[[Exception, Run], "tuple[End, str | None] | None"]


def _failure(exc: Exception, run: Run) -> None:
    return None


class Guard:
    """The claim guard of one worker runtime; its runs are this process's."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self._runs: dict[str, Run] = {}
        self._lock = forksafe.renewed_in_child(self, "_lock", threading.Lock)

    def run(self, delivery: Delivery, body: Callable[[], T], judge: Judge = _failure) -> T:
        """Claim, run ``body`` if the claim says so, record its end; return what it returned
        or raise what it raised. :class:`DeliverySkipped` when the body must not run."""
        run = self.begin(delivery)
        if run is None:
            return body()
        try:
            result = body()
        except Exception as exc:
            judged = judge(exc, run) or (
                End.FAILED,
                task_traceback(exc, wrappers=self.runtime.wrappers),  # from the task's frames
            )
            self.end(run, *judged)
            raise
        self.end(run, End.SUCCEEDED)
        return result

    def begin(self, delivery: Delivery) -> Run | None:
        """The first half of :meth:`run`, for a queue whose hooks surround the body instead
        of wrapping it (RQ's, Dramatiq's): claim the job before its body runs. The run to pass
        to :meth:`end` once the body ended; None when the body runs unclaimed (no registered
        worker here, or a claim that could not even be journaled: nothing to end); or
        :class:`DeliverySkipped` when it must not run."""
        runtime = self.runtime
        job_id = delivery.job_id
        if runtime.instance_id is None:
            runtime.count("run_unguarded")
            return None  # not a worker started with the runtime: nothing to claim as
        try:
            claim = runtime.lifecycle().claim(
                job_id,
                delivery.record,
                restart=delivery.restart,
                generation=delivery.generation,
                republish=delivery.republish,
            )
        except JobLedgerError as exc:
            runtime.count("claim_unrecorded")
            log.warning("job %s runs unclaimed, the ledger is unavailable: %s", job_id, exc)
            return None
        if claim is Claim.DEFERRED:
            runtime.count("claim_deferred")
        if not claim.should_run:
            runtime.count(_SKIP_COUNTERS.get(claim, "duplicates_skipped"))
            name = delivery.record.name
            log.warning("job %s (%s) not run: %s", job_id, name, claim.value)
            raise DeliverySkipped(f"job {job_id} ({name}) not run: {claim.value}", claim)
        run = Run(delivery)
        with self._lock:
            self._runs[job_id] = run
        return run

    def end(self, run: Run, end: End, error: str | None = None) -> None:
        """The second half of :meth:`run`: record how ``run`` ended, fenced by the generation
        it claimed (invariant 3), and forget it. A run moved to retrying is finished by its
        retry's delivery, unless it ends ``FAILED`` (its retry's message did not go)."""
        with self._lock:
            if self._runs.get(run.delivery.job_id) is run:
                del self._runs[run.delivery.job_id]
        job_id, g = run.delivery.job_id, run.generation
        try:
            lifecycle = self.runtime.lifecycle()
            if end is End.RELEASED:
                lifecycle.release(job_id, generation=g)
            elif run.retrying:  # its retry's message is out (or failed to go: failed)
                if end is End.FAILED:
                    lifecycle.fail_unsent_retry(job_id, error or "failed", generation=g)
            elif end is End.SUCCEEDED:
                lifecycle.succeed(job_id, generation=g)
            elif end is End.CANCELLED:
                lifecycle.cancel(job_id, error, generation=g)
            else:
                will_retry = end is End.RETRYING
                lifecycle.fail(job_id, error or end.value, will_retry=will_retry, generation=g)
        except JobLedgerError as exc:  # not a ledger outage (those are deferred): a bug
            self.runtime.count("finish_unrecorded")
            log.warning("job %s: its end could not be recorded: %s", job_id, exc)

    def running(self, job_id: str) -> Run | None:
        """The run of ``job_id`` in this process, if one is under way."""
        with self._lock:
            return self._runs.get(job_id)

    def retrying(self, job_id: str, why: str) -> None:
        """The running job's retry (or replacement) is about to be published: move it to
        retrying *before* its new message exists, so that message's claim finds it claimable
        (invariant 8). Once per run; a job not running here is left alone."""
        run = self.running(job_id)
        if run is None or run.retrying:
            return
        try:
            if self.runtime.lifecycle().fail(
                job_id, why, will_retry=True, generation=run.generation
            ):
                run.retrying = True
        except JobLedgerError as exc:
            self.runtime.count("finish_unrecorded")
            log.warning("job %s retry not recorded: %s", job_id, exc)

    def forget(self) -> None:
        """A forked child starts with no runs (its parent's are not its own)."""
        with self._lock:
            self._runs.clear()
