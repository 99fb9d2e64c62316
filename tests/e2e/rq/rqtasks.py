"""The job functions the RQ end-to-end tests run in real ``rq worker`` processes.

The tests enqueue them by name (``rqtasks.work``), so the test process never imports them as
task code; each body writes a row per phase to the test's own runs table (a SQLite file)
with the worker's instance name, its pid and the time, so a test counts how often each job ran.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from rq.job import Job
from rq.queue import Queue

from jobledger.integrations.rq import Worker
from jobledger.testing import wait_for

RUNS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (job_id TEXT, phase TEXT, worker TEXT, at REAL, pid INT)"
)


def _job_id() -> str:
    from rq import get_current_job

    job = get_current_job()
    return job.id if job is not None else "?"


def record_run(job_id: str, phase: str) -> None:
    with (
        contextlib.closing(sqlite3.connect(os.environ["E2E_RUNS_DB"], timeout=60)) as conn,
        conn,
    ):
        conn.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
            (job_id, phase, os.environ.get("JOBLEDGER_INSTANCE_NAME"), time.time(), os.getpid()),
        )


def starts(job_id: str) -> int:
    with contextlib.closing(sqlite3.connect(os.environ["E2E_RUNS_DB"], timeout=60)) as conn:
        query = "SELECT count(*) FROM runs WHERE job_id = ? AND phase = 'start'"
        return int(conn.execute(query, (job_id,)).fetchone()[0])


def work(i: int, seconds: float = 0.1) -> int:
    job_id = _job_id()
    record_run(job_id, "start")
    time.sleep(seconds)
    record_run(job_id, "done")
    return i


def fail_once(i: int) -> int:
    """Raises at its first run, succeeds at its second (a job with an RQ Retry)."""
    job_id = _job_id()
    record_run(job_id, "start")
    if starts(job_id) == 1:
        raise RuntimeError("first run fails")
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
