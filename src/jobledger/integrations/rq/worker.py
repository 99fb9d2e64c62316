"""The worker classes: ``rq worker --worker-class jobledger.integrations.rq.Worker``.

RQ has no signals, so the hooks are the worker's own methods, mapped onto the integration's
:class:`~jobledger.runtime.worker.WorkerRuntime`:

- ``work``: register the instance before RQ's loop (its heartbeat says which job the worker
  holds) and start the recovery sweep, the relay, the journal replay and the held-jobs audit;
  at warm shutdown (``handle_warm_shutdown_request``: draining) RQ waits for the running job,
  then the runtime drains and deregisters. ``unsubscribe`` stops RQ's command listener
  without the minute RQ 3.0 with redis-py 8.2 can wait there.
- ``dequeue_job_and_maintain_ttl``: a worker whose heartbeat has failed for longer than the
  TTL takes no job (invariant 9: another instance may be handed its jobs) until a beat
  succeeds; the jobs wait in Redis meanwhile.
- ``execute_job`` (main process): the tracked job dequeued is *received* (held until it
  ends, so the sweep puts it back if the whole worker dies before the work horse's claim
  lands; its record journaled if the enqueue could not write it).
- ``main_work_horse``: a forked work horse starts with no runs of its parent's.
- ``perform_job`` (work horse, or the worker itself for ``SimpleWorker``): the claim guard.
  A delivery of a job that succeeded or that a live instance runs is acknowledged and
  skipped: its execution leaves the started registry and the job's hash is not touched.
- ``handle_job_success`` / ``handle_job_retry`` / ``handle_job_failure``: the outcome, written
  *before* RQ's own bookkeeping, so a retry is ``retrying`` before its id is queued again.
- ``handle_job_failure`` in the main process, after the work horse ended without reporting:
  ``rq job stop`` cancels the job; a horse RQ killed itself 60 s past the job's timeout (one
  that outlived its own alarm) times it out (failed, naming the timeout; ``retrying`` if RQ
  retries it); a horse that died (SIGKILL, out of memory: "work-horse terminated
  unexpectedly") is lost: RQ fails it, and jobledger puts it back at once with the next
  generation (which takes it out of the FailedJobRegistry again), or fails or cancels it as
  its orphan policy says. A job with ``Retry`` left is RQ's to retry (``retrying``), unless
  its orphan policy forbids running it again after its worker died.

A whole worker SIGKILLed runs none of these: its heartbeat stops, and any live instance's
sweep republishes its job within TTL + recovery interval.
"""

from __future__ import annotations

import inspect
import logging
import signal
import sys
import threading
from typing import Any

import rq
from rq.job import Job
from rq.queue import Queue
from rq.worker.base import SHUTDOWN_SIGNAL

from jobledger.errors import ConfigError, DeliverySkipped, SchemaMissing
from jobledger.integrations.rq.integration import RQIntegration, integration_for
from jobledger.integrations.rq.marks import FIELDS, delivery_of, is_tracked, orphan_policy
from jobledger.model import ORPHAN_OPTION, OrphanPolicy
from jobledger.runtime.guard import Delivery, End, Run

log = logging.getLogger(__name__)


class _Tracked:
    """What jobledger adds to an RQ worker class (first in the bases)."""

    jobledger: RQIntegration
    #: The tracked job this worker handles now: handed to its work horse (main process), or
    #: about to be claimed (the horse inherits it; ``SimpleWorker`` is both).
    _jl_delivery: Delivery | None = None
    #: The run the claim guard started for it (work horse, ``SimpleWorker``).
    _jl_run: Run | None = None
    #: The job whose work horse this worker killed itself (see :meth:`kill_horse`).
    _jl_killed: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jobledger = integration_for(self.connection)  # type: ignore[attr-defined]

    # -- the main process -----------------------------------------------------------------
    def work(self, *args: Any, **kwargs: Any) -> bool:
        """Register before RQ's loop; an unmigrated ledger or an unusable journal directory
        ends the worker with one line, an unreachable ledger is an outage it waits out."""
        runtime = self.jobledger.runtime
        worker: Any = self
        try:
            runtime.register(
                queues=worker.queue_names(),
                in_flight=lambda: 0 if self._jl_delivery is None else 1,
                held=self._held,
                worker_name=worker.name,
            )
        except (ConfigError, SchemaMissing) as exc:
            print(f"jobledger: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        runtime.start()
        try:
            return bool(super().work(*args, **kwargs))  # type: ignore[misc]
        finally:
            runtime.mark_draining()
            runtime.drain()

    def handle_warm_shutdown_request(self) -> None:
        """Warm shutdown begins (in RQ's signal handler): say draining, write nothing."""
        self.jobledger.runtime.mark_draining()
        super().handle_warm_shutdown_request()  # type: ignore[misc]

    def unsubscribe(self) -> None:
        """RQ's, with the listener thread's stop flag set *before* the unsubscribe whose reply
        wakes it, not after: a listener that took the reply first waits up to 60 s (RQ's
        ``sleep_time``) for a new subscription, and redis-py 8.2's ``stop()`` joins it without
        a bound, so a warm shutdown could hang a minute past its job (seen 2 times in ~40 runs
        under load; Kubernetes would SIGKILL it first)."""
        worker: Any = self
        thread = worker.pubsub_thread
        if not thread:
            return
        worker.log.info(
            "Worker %s: unsubscribing from channel %s", worker.name, worker.pubsub_channel_name
        )
        _stop_without_waiting(thread)
        worker.pubsub.unsubscribe()
        thread.join(timeout=1)
        worker.pubsub.close()

    def _held(self) -> set[str]:
        delivery = self._jl_delivery
        return set() if delivery is None else {delivery.job_id}

    def dequeue_job_and_maintain_ttl(self, *args: Any, **kwargs: Any) -> Any:
        while True:
            self._wait_for_the_ledger()
            result = super().dequeue_job_and_maintain_ttl(*args, **kwargs)  # type: ignore[misc]
            if result is None or self.jobledger.runtime.health.can_claim:
                return result
            # the ledger went away while this worker waited for a job: give it back untouched
            job, queue = result
            with self.connection.pipeline() as pipe:  # type: ignore[attr-defined]
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                queue.push_job_id(job.id, pipeline=pipe, at_front=True)
                pipe.execute()

    def _wait_for_the_ledger(self) -> None:
        """Invariant 9: take no job while this instance's heartbeat fails past the TTL."""
        runtime = self.jobledger.runtime
        if runtime.health.can_claim:
            return
        log.error("jobledger: the ledger is out of reach: this worker takes no jobs")
        pause = threading.Event()
        while not runtime.health.can_claim and not getattr(self, "_stop_requested", False):
            self.heartbeat()  # type: ignore[attr-defined]  # RQ's own: alive to rq info
            pause.wait(runtime.settings.heartbeat_interval)
        log.warning("jobledger: the ledger answers again: this worker takes jobs")

    def execute_job(self, job: Job, queue: Queue) -> None:
        runtime = self.jobledger.runtime
        registered = runtime.instance_id is not None  # else: run as a plain RQ worker would
        delivery = self._delivery_of(job) if registered and is_tracked(job) else None
        if delivery is not None:
            self._jl_delivery, unrecorded = delivery
            runtime.received(self._jl_delivery.record, unrecorded=unrecorded)
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        finally:
            self._jl_delivery = self._jl_killed = None

    def _delivery_of(self, job: Job) -> tuple[Delivery, bool] | None:
        """What this delivery says: the job, and its hash's generation, republish reason and
        unrecorded mark read now (one round trip)."""
        settings = self.jobledger.settings
        try:
            policy = orphan_policy(job, settings.on_orphan)
        except ConfigError as exc:
            log.warning("%s; using %s", exc, settings.on_orphan.value)
            policy = settings.on_orphan
        fields = self.connection.hmget(job.key, *FIELDS)  # type: ignore[attr-defined]
        return delivery_of(job, fields, policy)

    def kill_horse(self, sig: signal.Signals = SHUTDOWN_SIGNAL) -> None:
        """RQ kills a work horse itself at a stop request (``rq job stop``, which it says in
        ``_stopped_job_id``), at a cold shutdown (which reports nothing), and when the job ran
        60 s past its timeout without the horse ending at its own alarm: so a kill no stop
        asked for is the timeout, as :meth:`handle_job_failure` reads it."""
        if self._jl_delivery is not None and sig == SHUTDOWN_SIGNAL:
            self._jl_killed = self._jl_delivery.job_id
        super().kill_horse(sig)  # type: ignore[misc]

    # -- the work horse (or SimpleWorker) ---------------------------------------------------
    def main_work_horse(self, job: Job, queue: Queue) -> None:
        self.jobledger.runtime.child_started()
        super().main_work_horse(job, queue)  # type: ignore[misc]

    def perform_job(self, job: Job, queue: Queue, *rest: Any) -> bool:
        delivery = self._jl_delivery
        if delivery is None or delivery.job_id != job.id:  # untracked
            return bool(super().perform_job(job, queue, *rest))  # type: ignore[misc]
        try:
            self._jl_run = self.jobledger.runtime.guard.begin(delivery)
        except DeliverySkipped:
            self._skip(job, queue, *rest)
            return True
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

    def _claimed(self, job: Job) -> Run | None:
        run = self._jl_run
        return run if run is not None and run.delivery.job_id == job.id else None

    def handle_job_success(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        run = self._claimed(job)
        if run is not None:
            self.jobledger.runtime.guard.end(run, End.SUCCEEDED)
        super().handle_job_success(job, queue, *args, **kwargs)  # type: ignore[misc]

    def handle_job_retry(self, job: Job, queue: Queue, retry: Any, *args: Any, **kw: Any) -> None:
        """A job that returned ``rq.Retry`` (RQ 2.1+): retrying, or failed past its max."""
        run = self._claimed(job)
        if run is not None:
            left = not (job.number_of_retries and job.number_of_retries >= retry.max)
            end = End.RETRYING if left else End.FAILED
            self.jobledger.runtime.guard.end(run, end, f"returned {retry!r}")
        super().handle_job_retry(job, queue, retry, *args, **kw)  # type: ignore[misc]

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        error = str(kwargs.get("exc_string") or (args[1] if len(args) > 1 else "") or "failed")
        stopped = getattr(self, "_stopped_job_id", None) == job.id
        runtime = self.jobledger.runtime
        run, lost = self._claimed(job), None
        delivery = self._jl_delivery
        if run is None and delivery is not None and delivery.job_id == job.id:
            # the main process: its work horse ended without reporting; it ends the job for
            # the horse, as the same instance
            if stopped:
                run = Run(delivery)
            elif self._jl_killed == job.id:
                error = (
                    f"RQ's job timeout ({job.timeout} s) passed: its work horse outlived its "
                    f"own alarm and was killed ({error.strip()})"
                )
                run = Run(delivery) if job.should_retry else None
                if run is None:
                    runtime.outcomes.timed_out(job.id, error)
            else:
                lost = f"its work horse died: {error.strip()}"
                run = self._lost_run(job, delivery)
        if run is not None:
            end = End.CANCELLED if stopped else End.RETRYING if job.should_retry else End.FAILED
            runtime.guard.end(run, end, lost or error)
        super().handle_job_failure(job, queue, *args, **kwargs)  # type: ignore[misc]
        if lost is not None and run is None:
            runtime.outcomes.lost(job.id, lost)

    def _lost_run(self, job: Job, delivery: Delivery) -> Run | None:
        """The work horse died under the job: RQ retries a job with ``Retry`` left (the run
        to end as retrying) unless its orphan policy forbids running it again; else (None)
        RQ fails it, and the runtime then puts it back, or fails or cancels it as that
        policy says."""
        named = delivery.record.options.get(ORPHAN_OPTION, OrphanPolicy.REQUEUE)
        if job.should_retry and OrphanPolicy.parse(named) is OrphanPolicy.REQUEUE:
            return Run(delivery)
        job.retries_left = 0  # not RQ's to run again: the orphan policy decides
        return None


def _stop_without_waiting(thread: Any) -> None:
    """Set a redis-py pubsub listener's stop flag and return: redis-py 8.2 and later join the
    thread in ``stop()`` (without a bound unless given one), earlier ones only set the flag."""
    if "timeout" in inspect.signature(thread.stop).parameters:
        thread.stop(timeout=0)
    else:
        thread.stop()


class Worker(_Tracked, rq.Worker):
    """RQ's forking worker (a work horse per job), with the ledger."""


class SimpleWorker(_Tracked, rq.SimpleWorker):
    """RQ's worker that runs each job in its own process, with the ledger."""
