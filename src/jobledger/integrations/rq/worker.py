"""The worker classes: ``rq worker --worker-class jobledger.integrations.rq.Worker``.

RQ has no signals, so the hooks are the worker's own methods:

- ``work``: register the instance, beat, sweep and relay (:mod:`.ledger`) around RQ's loop;
  at warm shutdown RQ waits for the running job, then the heartbeat drains and deregisters.
- ``dequeue_job_and_maintain_ttl``: a worker whose heartbeat has failed for longer than the
  TTL takes no job (invariant 9: another instance may be handed its jobs) until a beat
  succeeds; the jobs wait in Redis meanwhile.
- ``execute_job`` (main process): the job dequeued is *held* until it ends, so the sweep
  puts it back if the whole worker dies before the work horse's claim lands.
- ``perform_job`` (work horse, or the worker itself for ``SimpleWorker``): the claim guard.
  A delivery of a job that succeeded or that a live instance runs is acknowledged and
  skipped: its execution leaves the started registry and the job's hash is not touched.
- ``handle_job_success`` / ``handle_job_failure`` / ``handle_job_retry``: the outcome, written
  *before* RQ's own bookkeeping, so a retry is ``retrying`` before its id is queued again.
- ``handle_job_failure`` in the main process, after a work horse died under the job
  (SIGKILL, out of memory: "work-horse terminated unexpectedly"): RQ fails it (or retries it,
  if it has retries left: then the ledger says ``retrying``), and jobledger puts it back
  with the next generation at once, which takes it out of the FailedJobRegistry again.
  ``rq job stop`` (a horse killed on purpose) cancels it instead.

A whole worker SIGKILLed runs none of these: its heartbeat stops, and any live instance's
sweep republishes its job within TTL + recovery interval.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import rq
from rq.job import Job
from rq.queue import Queue

from jobledger.integrations.rq.integration import RQIntegration, integration_for
from jobledger.integrations.rq.marks import generation_of, is_tracked, record_of, republish_of

log = logging.getLogger(__name__)


class _Run:
    """A job this process claimed and runs now, with the generation of its claim."""

    def __init__(self, job_id: str, generation: int | None) -> None:
        self.job_id = job_id
        self.generation = generation


class _Tracked:
    """What jobledger adds to an RQ worker class (first in the bases)."""

    jobledger: RQIntegration
    _jl_run: _Run | None = None
    _jl_held: tuple[str, int] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jobledger = integration_for(self.connection)  # type: ignore[attr-defined]

    def work(self, *args: Any, **kwargs: Any) -> bool:
        self.jobledger.ledger.start(self.queue_names(), self._holding)  # type: ignore[attr-defined]
        try:
            return bool(super().work(*args, **kwargs))  # type: ignore[misc]
        finally:
            self.jobledger.ledger.stop()

    def dequeue_job_and_maintain_ttl(self, *args: Any, **kwargs: Any) -> Any:
        while True:
            self._wait_for_the_ledger()
            result = super().dequeue_job_and_maintain_ttl(*args, **kwargs)  # type: ignore[misc]
            if result is None or self.jobledger.ledger.health.can_claim:
                return result
            # the ledger went away while this worker waited for a job: give it back untouched
            job, queue = result
            with self.connection.pipeline() as pipe:  # type: ignore[attr-defined]
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                queue.push_job_id(job.id, pipeline=pipe, at_front=True)
                pipe.execute()

    def _wait_for_the_ledger(self) -> None:
        """Invariant 9: take no job while this instance's heartbeat fails past the TTL."""
        ledger = self.jobledger.ledger
        if ledger.health.can_claim:
            return
        log.error("jobledger: the ledger is out of reach: this worker takes no jobs")
        pause = threading.Event()
        while not ledger.health.can_claim and not getattr(self, "_stop_requested", False):
            self.heartbeat()  # type: ignore[attr-defined]  # RQ's own: alive to rq info
            pause.wait(ledger.settings.heartbeat_interval)
        log.warning("jobledger: the ledger answers again: this worker takes jobs")

    def _holding(self) -> list[tuple[str, int]]:
        held = self._jl_held
        return [held] if held is not None else []

    def execute_job(self, job: Job, queue: Queue) -> None:
        if is_tracked(job):
            self._jl_held = (job.id, generation_of(job) or 0)
            self.jobledger.ledger.wake()
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        finally:
            self._jl_held = None

    def perform_job(self, job: Job, queue: Queue, *rest: Any) -> bool:
        ledger = self.jobledger.ledger
        record = record_of(job) if is_tracked(job) else None
        if record is None or ledger.instance_id is None:
            return bool(super().perform_job(job, queue, *rest))  # type: ignore[misc]
        generation = generation_of(job)
        claim = ledger.claim(job.id, record, generation, republish_of(job))
        if claim is not None and not claim.should_run:
            log.warning("job %s (%s) not run: %s", job.id, job.func_name, claim.value)
            self._skip(job, queue, *rest)
            return True
        self._jl_run = _Run(job.id, generation) if claim is not None else None
        try:
            return bool(super().perform_job(job, queue, *rest))  # type: ignore[misc]
        finally:
            self._jl_run = None

    def _skip(self, job: Job, queue: Queue, *rest: Any) -> None:
        """Acknowledge a skipped delivery as RQ would a finished one, leaving the job's hash
        to the run it duplicates: its execution leaves the started registry and its id the
        intermediate queue (RQ's maintenance would otherwise enqueue it again)."""
        worker: Any = self
        with worker.connection.pipeline() as pipe:
            worker.cleanup_execution(job, pipe, *rest)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.execute()

    def _claimed(self, job: Job) -> _Run | None:
        run = self._jl_run
        return run if run is not None and run.job_id == job.id else None

    def handle_job_success(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        run = self._claimed(job)
        if run is not None:
            g = run.generation
            self.jobledger.ledger.finish(job.id, lambda lc: lc.succeed(job.id, generation=g))
        super().handle_job_success(job, queue, *args, **kwargs)  # type: ignore[misc]

    def handle_job_retry(self, job: Job, queue: Queue, retry: Any, *args: Any, **kw: Any) -> None:
        """A job that returned ``rq.Retry`` (RQ 2.1+): retrying, or failed past its max."""
        run = self._claimed(job)
        if run is not None:
            left = not (job.number_of_retries and job.number_of_retries >= retry.max)
            why = f"returned {retry!r}"
            g = run.generation
            self.jobledger.ledger.finish(
                job.id, lambda lc: lc.fail(job.id, why, will_retry=left, generation=g)
            )
        super().handle_job_retry(job, queue, retry, *args, **kw)  # type: ignore[misc]

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        error = str(kwargs.get("exc_string") or (args[1] if len(args) > 1 else "") or "failed")
        stopped = getattr(self, "_stopped_job_id", None) == job.id
        retry = bool(job.retries_left and job.retries_left > 0) and not stopped
        run = self._claimed(job)
        ledger = self.jobledger.ledger
        if run is not None:  # the body failed in this process
            g = run.generation
            ledger.finish(job.id, lambda lc: lc.fail(job.id, error, will_retry=retry, generation=g))
            super().handle_job_failure(job, queue, *args, **kwargs)  # type: ignore[misc]
            return
        delivered = generation_of(job)
        if not is_tracked(job) or delivered is None or ledger.instance_id is None:
            super().handle_job_failure(job, queue, *args, **kwargs)  # type: ignore[misc]
            return
        # the main process: the work horse died under the job, or was stopped on purpose
        if stopped:
            ledger.finish(job.id, lambda lc: lc.cancel(job.id, error, generation=delivered))
        elif retry:  # RQ queues it again: retrying before its id is pushed
            ledger.finish(
                job.id, lambda lc: lc.fail(job.id, error, will_retry=True, generation=delivered)
            )
        super().handle_job_failure(job, queue, *args, **kwargs)  # type: ignore[misc]
        if not stopped and not retry:
            ledger.lost(job.id, delivered, why=f"its work horse died: {error.strip()}")


class Worker(_Tracked, rq.Worker):
    """RQ's forking worker (a work horse per job), with the ledger."""


class SimpleWorker(_Tracked, rq.SimpleWorker):
    """RQ's worker that runs each job in its own process, with the ledger."""
