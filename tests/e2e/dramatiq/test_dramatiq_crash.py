"""Crashes: the jobs of one SIGKILLed process of a busy two-process Dramatiq worker are
recovered by another worker and run to success once, while ``dramatiq`` stops the killed
process's sibling gracefully (RabbitMQ, a PostgreSQL ledger). A whole worker SIGKILLed, and a
single-process worker's process, on both brokers: the integration contract's scenarios
(``tests/e2e/test_integration_contract.py``).

A Dramatiq worker process is one jobledger instance. When one is killed, ``dramatiq``'s main
process stops its siblings (gracefully: they finish what they run and deregister), so the
killed process's jobs wait for another worker's sweep: within TTL + sweep interval.

The jobs that must be recovered are those the ledger says a killed instance runs, read after
the kill, whose body did not finish in a killed process (no "done" row of theirs in the runs
table, a SQLite file each wrote itself: a dead process's rows are final). A body that did
finish may have had its success in flight: sent just before the kill, it still lands after it
on a database server (PostgreSQL completes a statement whose client is gone), so such a job
rightly succeeds without a recovery.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable

from dramatiq_harness import Harness, make_harness_fixture, wait_for  # noqa: F401

from jobledger.model import JobState
from jobledger.query import JobQuery
from jobledger.testing.contract.processes import WorkerProcess

SUCCEEDED = frozenset({JobState.SUCCEEDED})
STARTED = frozenset({JobState.STARTED})


def started_by(h: Harness, instances: set[str]) -> set[str]:
    return {j.id for j in h.store.iter_jobs(JobQuery(states=STARTED)) if j.owner in instances}


def instances_of(h: Harness, name: str, pid: int | None = None) -> set[str]:
    return {
        i.id
        for i in h.store.instances(ttl=3600)
        if i.name == name and (pid is None or i.pid == pid)
    }


def finished_in(h: Harness, pids: set[int]) -> set[str]:
    """The jobs whose body finished in one of the processes ``pids``."""
    return {r[0] for r in h.runs() if r[1] == "done" and r[4] in pids}


def kill_mid_run(h: Harness, victim: WorkerProcess) -> tuple[set[str], set[str], float]:
    """Wait until the victim has finished some jobs and one of its processes runs at least
    two, SIGKILL that process, and return the killed instance, the jobs it held started whose
    bodies did not finish there (see the module docstring) and the kill's time."""
    busy: dict[str, int] = {}

    def mid_run() -> bool:
        done = sum(1 for r in h.runs() if r[2] == victim.name and r[1] == "done")
        held = Counter(j.owner for j in h.store.iter_jobs(JobQuery(states=STARTED)) if j.owner)
        for pid in victim.children():
            for instance in instances_of(h, victim.name, pid):
                if held[instance] >= 2 and done >= 4:
                    busy["pid"] = pid
                    return True
        return False

    wait_for(f"{victim.name} to be mid-run", mid_run, timeout=30)
    pid = busy["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = instances_of(h, victim.name, pid)
    at = time.time()
    orphaned = started_by(h, killed) - finished_in(h, {pid})
    assert orphaned
    return killed, orphaned, at


def test_a_sigkilled_process_loses_no_job_and_runs_none_after_its_success(
    make_harness: Callable[..., Harness],
) -> None:
    h = make_harness("rabbitmq", "postgresql")
    victim = h.start_worker("victim", processes=2, threads=4)
    h.start_worker("survivor", processes=1, threads=4)
    ids = [h.send("e2e.work", i, 0.3) for i in range(60)]
    killed, orphaned, killed_at = kill_mid_run(h, victim)

    wait_for(
        "every job to succeed",
        lambda: h.store.count(JobQuery(states=SUCCEEDED, ids=frozenset(ids))) == len(ids),
        timeout=60,
    )
    jobs = {j.id: j for j in h.store.iter_jobs(JobQuery(ids=frozenset(ids)))}
    runs = h.runs()
    done = Counter(r[0] for r in runs if r[1] == "done")
    assert all(done[i] >= 1 for i in ids), "a job never ran to completion"
    for job_id, job in jobs.items():  # no run started after the job's success was recorded
        assert job.finished_at is not None
        succeeded_at = job.finished_at.timestamp()
        late = [r for r in runs if r[0] == job_id and r[1] == "start" and r[3] > succeeded_at]
        assert not late, f"job {job_id} ran again after it succeeded: {late}"
    bound = h.settings.ttl + h.settings.recovery_interval + 2.0  # + slack for one sweep
    for job_id in orphaned:  # recovered within TTL + sweep interval + slack, and run elsewhere
        job = jobs[job_id]
        assert job.recoveries >= 1 and job.recovered_at is not None
        assert job.recovered_at.timestamp() - killed_at < bound
        # by the survivor, or by a sibling of the killed process that dramatiq had not
        # stopped yet (a live instance: it finishes the job before it stops)
        assert job.owner and job.owner not in killed
    victim.wait(30)
    # a killed process's sibling was stopped by dramatiq, gracefully: drained, deregistered
    assert instances_of(h, "victim") == killed
