"""The integration contract: the crash and delivery scenarios every queue system's integration
must pass, written once against :class:`IntegrationHarness`.

Subclass :class:`IntegrationContract` in a test module (its name must start with ``Test``) and
give it a ``harness`` fixture yielding a fresh :class:`IntegrationHarness` per test: real worker
processes of your queue system on a queue and a ledger of the test's own, with short
heartbeat settings (interval 1 s, so TTL 3 s; a recovery sweep every second or less). Each
scenario SIGKILLs or SIGTERMs real processes, waits on ledger conditions with deadlines and
asserts invariants, not timings a slow machine moves: every job it enqueued ends in the state
it must, no body ran after its job was recorded succeeded, a recovered job keeps its id.

The worker processes must define three tasks, each writing its runs to the test's
:class:`~jobledger.testing.executions.ExecutionLog` (``record_run(job_id, "start")``
first, ``record_run(job_id, "done")`` when it returns):

- ``work(n, seconds)``: sleeps ``seconds``, then returns;
- ``hangs_first_time(n)``: at its job's first execution sleeps until its process is killed
  (a minute or more); at any later one returns at once;
- ``fails_first_time(n)``: at its job's first execution raises an exception whose message
  holds ``FIRST_FAILURE`` (with no retry left: the job must end ``failed``); later ones return.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from jobledger.config import Settings
from jobledger.integrations.base import Integration, Registry
from jobledger.manager import Manager
from jobledger.model import FINAL_STATES, JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.stores.base import Store
from jobledger.testing import wait_for
from jobledger.testing.executions import FIRST_FAILURE, Run

__all__ = ["FIRST_FAILURE", "IntegrationContract", "IntegrationHarness"]


class IntegrationHarness(Protocol):
    """Real worker processes of one queue system, as the scenarios drive them."""

    #: The queue system's name, as its job records carry it.
    system: str
    #: The ledger the workers write (the test's own view of it).
    store: Store
    #: The settings the workers run with (their heartbeat interval, TTL and sweep interval
    #: bound how soon a dead worker's job must be back).
    settings: Settings
    #: This (client) process's integration: how a restart publishes a job again.
    integration: Integration

    def start_workers(self, names: Sequence[str]) -> None:
        """Start one worker per name (its ledger instance name), with :attr:`settings`; return
        once each has registered in the ledger and consumes the test's queue."""

    def enqueue(self, task: str, *args: Any) -> str:
        """Enqueue the tracked task ``task`` (one of the module docstring's) with ``args``, as
        the application would; the job's id."""

    def deliver_again(self, job_id: str) -> None:
        """Put the job's message on the queue once more, as a broker's at-least-once
        redelivery (or a relay's duplicate) would: same id, same generation."""

    def kill_worker(self, name: str) -> None:
        """SIGKILL every process of the worker ``name``; return once they are dead."""

    def kill_work_process(self, job_id: str) -> None:
        """SIGKILL only the process running ``job_id``'s body (a pool process, a work horse, a
        worker process), leaving the worker's other processes alive."""

    def terminate(self, name: str) -> int:
        """SIGTERM the worker ``name``'s main process (a warm shutdown, as an orchestrator
        stopping it sends); its exit status once it has exited."""

    def executions(self, job_id: str) -> Sequence[Run]:
        """The starts of ``job_id``'s body, in order, from the test's own execution log."""

    def check_queue(self, records: Collection[JobRecord]) -> None:
        """Return once the queue system's own bookkeeping (RQ's registries, say) agrees with
        these final records, which it may lag a moment; raise AssertionError, saying how it
        disagrees, if it does not within a deadline. Do nothing where it keeps none."""


class IntegrationContract:
    """The scenarios; a subclass provides the ``harness`` fixture."""

    #: Seconds of slack on "back within TTL + sweep interval" and on waits for a run to end.
    margin = 2.0
    #: Deadline for jobs to reach their final state once nothing stands in their way.
    settle = 30.0

    def test_a_job_runs_once_and_succeeds(self, harness: IntegrationHarness) -> None:
        h = harness
        h.start_workers(["w1"])
        ids = [h.enqueue("work", n, 0.0) for n in range(6)]
        records = wait_final(h, ids, self.settle)
        for n, job_id in enumerate(ids):
            record = records[job_id]
            assert record.state is JobState.SUCCEEDED, record
            assert (record.system, record.args[0]) == (h.system, n), record
            assert (record.attempts, record.recoveries) == (1, 0), record
            assert instance_name(record.owner) == "w1", record
            assert len(h.executions(job_id)) == 1, h.executions(job_id)
        h.check_queue(list(records.values()))

    def test_a_whole_worker_sigkilled_mid_job_loses_no_job(
        self, harness: IntegrationHarness
    ) -> None:
        """The jobs a dead worker held are back within TTL + sweep interval, under their ids,
        and finish on the other worker; the jobs queued around them are not lost either."""
        h = harness
        h.start_workers(["w1", "w2"])
        hung = h.enqueue("hangs_first_time", 0)
        ids = [hung, *(h.enqueue("work", n, 0.2) for n in range(1, 7))]
        victim = wait_for("the hanging job to be claimed", lambda: running_on(h, hung))
        wait_for("its body to start", lambda: h.executions(hung))  # else it never hung
        survivor = "w2" if victim == "w1" else "w1"
        killed_at = time.time()
        h.kill_worker(victim)
        started = h.store.iter_jobs(JobQuery(states=frozenset({JobState.STARTED})))
        held = {r.id for r in started if instance_name(r.owner) == victim}
        assert hung in held

        records = wait_final(h, ids, bound(h, self.margin) + self.settle)
        assert_all(h, records, JobState.SUCCEEDED)
        for job_id in held:
            record = records[job_id]
            assert record.recoveries >= 1 and record.recovered_at is not None, record
            assert record.recovered_at.timestamp() - killed_at < bound(h, self.margin), record
            assert instance_name(record.owner) == survivor, record
        assert len(h.executions(hung)) == 2
        h.check_queue(list(records.values()))

    def test_a_work_process_sigkilled_mid_job_is_put_back(
        self, harness: IntegrationHarness
    ) -> None:
        h = harness
        h.start_workers(["w1", "w2"])
        job_id = h.enqueue("hangs_first_time", 1)
        wait_for("the job to be claimed", lambda: running_on(h, job_id))
        first = wait_for("its body to start", lambda: h.executions(job_id))[0]
        killed_at = time.time()
        h.kill_work_process(job_id)

        record = wait_final(h, [job_id], bound(h, self.margin) + self.settle)[job_id]
        assert record.state is JobState.SUCCEEDED, record
        assert record.recoveries == 1 and record.recovered_at is not None, record
        assert record.recovered_at.timestamp() - killed_at < bound(h, self.margin), record
        runs = h.executions(job_id)
        assert len(runs) == 2 and runs[1].pid != first.pid, runs
        h.check_queue([record])

    def test_sigterm_mid_job_finishes_or_hands_it_back(self, harness: IntegrationHarness) -> None:
        """A warm shutdown never loses a job: what runs finishes (a drain) or goes back to the
        queue; the worker leaves the ledger only once it holds nothing."""
        h = harness
        h.start_workers(["w1", "w2"])
        ids = [h.enqueue("work", n, 2.0) for n in range(4)]
        name = wait_for("a job to be claimed", lambda: running_on(h, ids[0]))
        assert h.terminate(name) == 0
        assert not any(i.name == name for i in h.store.instances(ttl=3600)), "not deregistered"
        records = wait_final(h, ids, 4 * 2.0 + self.settle)
        assert_all(h, records, JobState.SUCCEEDED)
        h.check_queue(list(records.values()))

    def test_a_duplicate_delivery_is_skipped(self, harness: IntegrationHarness) -> None:
        """A second delivery of a job that runs (on a live instance) or that succeeded is
        acknowledged without running the body."""
        h = harness
        h.start_workers(["w1", "w2"])
        job_id = h.enqueue("work", 1, 3.0)
        wait_for("the job to be claimed", lambda: running_on(h, job_id))
        h.deliver_again(job_id)
        wait_for("the copy to be skipped while the job runs", lambda: skipped(h) >= 1)
        record = wait_final(h, [job_id], 3.0 + self.settle)[job_id]
        assert record.state is JobState.SUCCEEDED, record
        h.deliver_again(job_id)
        wait_for("the copy to be skipped after the success", lambda: skipped(h) >= 2)
        assert len(h.executions(job_id)) == 1, h.executions(job_id)
        again = h.store.get(job_id)
        assert again is not None and (again.attempts, again.recoveries) == (1, 0), again
        h.check_queue([again])

    def test_a_failed_job_keeps_its_error_and_a_restart_runs_it_again(
        self, harness: IntegrationHarness
    ) -> None:
        h = harness
        h.start_workers(["w1"])
        job_id = h.enqueue("fails_first_time", 1)
        failed = wait_final(h, [job_id], self.settle)[job_id]
        assert failed.state is JobState.FAILED, failed
        assert failed.error is not None and FIRST_FAILURE in failed.error, failed
        h.check_queue([failed])

        integrations = Registry()
        integrations.register(h.integration)
        manager = Manager(h.store, integrations=integrations, settings=h.settings)
        report = manager.restart([job_id])
        assert report.done == [job_id], report
        record = wait_final(h, [job_id], self.settle)[job_id]
        assert record.state is JobState.SUCCEEDED, record
        assert (record.restarts, record.generation) == (1, 1), record
        assert len(h.executions(job_id)) == 2, h.executions(job_id)
        h.check_queue([record])


# -- reading the ledger -----------------------------------------------------------------------


def bound(h: IntegrationHarness, margin: float) -> float:
    """How soon a dead process's job must be back: TTL + a sweep interval + ``margin``."""
    return h.settings.ttl + h.settings.recovery_interval + margin


def instance_name(owner: str | None) -> str | None:
    """The worker name of the instance ``owner`` (an instance id is ``name:nonce``)."""
    return None if owner is None else owner.rsplit(":", 1)[0]


def running_on(h: IntegrationHarness, job_id: str) -> str | None:
    """The worker name of the instance ``job_id`` is started on, if it is."""
    record = h.store.get(job_id)
    if record is None or record.state is not JobState.STARTED:
        return None
    return instance_name(record.owner)


def skipped(h: IntegrationHarness) -> int:
    """Deliveries the workers acknowledged without running, as their heartbeats report."""
    return sum(int(i.stats.get("duplicates_skipped", 0)) for i in h.store.instances(ttl=3600))


def wait_final(h: IntegrationHarness, ids: Sequence[str], timeout: float) -> dict[str, JobRecord]:
    """Wait until every job of ``ids`` is in a final state; their records. At the deadline,
    the failure names the jobs that are not, with their records and runs."""

    def final() -> dict[str, JobRecord] | None:
        records = {i: h.store.get(i) for i in ids}
        if all(r is not None and r.state in FINAL_STATES for r in records.values()):
            return {i: r for i, r in records.items() if r is not None}
        return None

    try:
        return wait_for(f"{len(ids)} jobs to finish", final, timeout)
    except TimeoutError as exc:
        late = [h.store.get(i) for i in ids]
        lines = [str(exc)]
        for record in late:
            if record is None or record.state not in FINAL_STATES:
                runs = h.executions(record.id) if record is not None else []
                lines.append(f"{record!r}\n  runs: {runs}")
        raise AssertionError("\n".join(lines)) from None


def assert_all(h: IntegrationHarness, records: dict[str, JobRecord], state: JobState) -> None:
    """Every record is in ``state``, every body ran, and none started after its job was
    recorded succeeded (a body may have ended twice: its worker killed between the body's
    end and the finish's write)."""
    for job_id, record in records.items():
        assert record.state is state, record
        runs = h.executions(job_id)
        assert runs, f"job {job_id} never ran: {record!r}"
        if state is JobState.SUCCEEDED:
            assert record.finished_at is not None, record
            late = [r for r in runs if r.at > record.finished_at.timestamp()]
            assert not late, f"job {job_id} ran again after it succeeded: {late}"
