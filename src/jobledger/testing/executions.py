"""A table of the test's own where task bodies write each run, so a test counts how often a
job's body ran without trusting the ledger it is testing.

A SQLite file (WAL) that every worker process of every queue system can write: the test
creates it (:meth:`ExecutionLog.create`) and names it to the workers in
``JOBLEDGER_EXECUTION_LOG``; a task body calls :func:`record_run` with its job's id. Worker
processes import this module without pytest (:mod:`jobledger.testing.contract` needs it).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

from jobledger.errors import ConfigError

#: The environment variable that names the log to the worker processes.
ENV = "JOBLEDGER_EXECUTION_LOG"
#: What the integration contract's ``fails_first_time`` task raises with.
FIRST_FAILURE = "fails on its first run"
#: The phase a body records as it starts: an execution (it records "done" as it returns;
#: the e2e apps also record "published" for a recoverer's publish, "untracked" for others).
START = "start"

_SCHEMA = "CREATE TABLE IF NOT EXISTS runs (job_id TEXT, phase TEXT, worker TEXT, at REAL, pid INT)"

#: Held around every write and around every fork: a prefork worker's main process writes
#: "published" rows from a thread while it forks pool processes, and a child forked mid-write
#: inherits SQLite's record of a lock its own connections then wait on.
_WRITE_LOCK = threading.Lock()
os.register_at_fork(
    before=_WRITE_LOCK.acquire,
    after_in_parent=_WRITE_LOCK.release,
    after_in_child=_WRITE_LOCK.release,
)


class Run(NamedTuple):
    """One row: a phase of one job's body in one process, with the worker's instance name."""

    job_id: str
    phase: str
    worker: str
    at: float
    pid: int


class ExecutionLog:
    """The runs table in the SQLite file at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    @classmethod
    def create(cls, path: str | Path) -> ExecutionLog:
        """Make the table (in WAL mode: writers in many processes) and return the log."""
        with contextlib.closing(sqlite3.connect(str(path))) as conn, conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
        return cls(path)

    @classmethod
    def from_env(cls) -> ExecutionLog:
        """The log the test named in ``JOBLEDGER_EXECUTION_LOG``."""
        path = os.environ.get(ENV)
        if not path:
            raise ConfigError(f"{ENV} is not set: the test names its execution log there")
        return cls(path)

    def record(self, job_id: str, phase: str) -> None:
        """Add a row, stamped with this process's instance name, pid and time."""
        worker = os.environ.get("JOBLEDGER_INSTANCE_NAME", "client")
        row = (job_id, phase, worker, time.time(), os.getpid())
        with (
            _WRITE_LOCK,
            contextlib.closing(sqlite3.connect(self.path, timeout=60)) as conn,
            conn,
        ):
            conn.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", row)

    def runs(self) -> list[Run]:
        """Every row, in the order written."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=60)) as conn:
            return [Run(*row) for row in conn.execute("SELECT * FROM runs ORDER BY rowid")]

    def executions(self, job_id: str) -> list[Run]:
        """The starts of ``job_id``'s body, in order: how many times it ran, where and when."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=60)) as conn:
            query = "SELECT * FROM runs WHERE job_id = ? AND phase = ? ORDER BY rowid"
            return [Run(*row) for row in conn.execute(query, (job_id, START))]


def record_run(job_id: str, phase: str) -> None:
    """What a task body calls: a row in the log ``JOBLEDGER_EXECUTION_LOG`` names."""
    ExecutionLog.from_env().record(job_id, phase)
