"""The job functions the RQ end-to-end tests run in real ``rq worker`` processes.

The tests enqueue them by name (``rqtasks.work``), so the test process never imports them as
task code; each body writes a row per phase to the test's execution log (a SQLite file) with
the worker's instance name, its pid and the time, so a test counts how often each job ran.
``work``, ``hangs_first_time`` and ``fails_first_time`` are the integration contract's
(:mod:`jobledger.testing.contract.integration`).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from rq.job import Job
from rq.queue import Queue

from jobledger.integrations.rq import Worker
from jobledger.testing import wait_for
from jobledger.testing.executions import FIRST_FAILURE, ExecutionLog, record_run


def _job_id() -> str:
    from rq import get_current_job

    job = get_current_job()
    return job.id if job is not None else "?"


def starts(job_id: str) -> int:
    return len(ExecutionLog.from_env().executions(job_id))


def work(i: int, seconds: float = 0.1) -> int:
    job_id = _job_id()
    record_run(job_id, "start")
    time.sleep(seconds)
    record_run(job_id, "done")
    return i


def hangs_first_time(i: int) -> int:
    job_id = _job_id()
    record_run(job_id, "start")
    if starts(job_id) == 1:
        time.sleep(120)  # until the test kills this process
    record_run(job_id, "done")
    return i


def fails_first_time(i: int) -> int:
    """Raises at its first run, succeeds at its second (a job with an RQ Retry, or one a
    person restarts)."""
    job_id = _job_id()
    record_run(job_id, "start")
    if starts(job_id) == 1:
        raise RuntimeError(f"job {i} {FIRST_FAILURE}")
    record_run(job_id, "done")
    return i


def fail(i: int) -> int:
    record_run(_job_id(), "start")
    raise ValueError(f"job {i} always fails")


def outlive_alarm(i: int, seconds: float = 300) -> int:
    """Ignores RQ's timeout alarm: its work horse outlives the job's timeout until RQ's
    worker kills it (60 s past the timeout)."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    return work(i, seconds)


def save_meta_after(go: str) -> str:
    """Its first run waits for the file ``go`` (the test republishes the job meanwhile), then
    saves the job's meta as it loaded it, as a body reporting progress does."""
    from rq import get_current_job

    job = get_current_job()
    assert job is not None
    record_run(job.id, "start")
    if starts(job.id) == 1:
        wait_for("the test to republish the job", Path(go).exists, timeout=60)
    job.meta["progress"] = "saved"
    job.save_meta()
    record_run(job.id, "done")
    return job.id


class PausingWorker(Worker):
    """Stops itself (SIGSTOP) once it received a job, before its work horse forks: a worker
    that dies between the two, for the test to kill there."""

    def fork_work_horse(self, job: Job, queue: Queue) -> Any:
        os.kill(os.getpid(), signal.SIGSTOP)
        return super().fork_work_horse(job, queue)
