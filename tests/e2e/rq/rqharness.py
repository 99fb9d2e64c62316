"""Real ``rq worker`` processes on a queue of the test's own, a real ledger, and deadlines
instead of sleeps. (Named apart from the Celery harness: both directories go on sys.path.)
:class:`RQHarness` is also the integration contract's harness for RQ
(:class:`jobledger.testing.contract.IntegrationHarness`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq.job import Job, JobStatus

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))

from jobledger.config import Settings  # noqa: E402
from jobledger.integrations.base import registry  # noqa: E402
from jobledger.integrations.rq import Queue, RQIntegration, install  # noqa: E402
from jobledger.model import JobRecord, JobState  # noqa: E402
from jobledger.stores.sql import SQLStore  # noqa: E402
from jobledger.testing import wait_for  # noqa: E402 - the tests import it from here
from jobledger.testing.contract.processes import ProcessHarness, WorkerProcess  # noqa: E402
from ledgerdb import database_url, empty_sql_store  # noqa: E402

REDIS = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WORKER_CLASSES = ["Worker", "SimpleWorker"]


class RQWorker(WorkerProcess):
    """One ``rq worker`` process (and the work horse it forks for each job)."""

    def stopped(self) -> bool:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0] in ("T", "t", "Z")
        return True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """``sig`` to the worker and its work horse (a horse is a process group of its own, so
        a group kill misses it): stopped first (SIGSTOP lands asynchronously: waited for),
        so it forks no horse meanwhile."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGSTOP)
            wait_for(f"{self.name} to stop", self.stopped, timeout=10)
            for pid in self.children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            os.kill(self.proc.pid, sig)


class RQHarness(ProcessHarness[RQWorker]):
    """A queue of the test's own on the test Redis, a ledger on ``ledger`` (``sqlite`` or
    ``postgresql``), the test's runs table, and the workers it started."""

    worker_kind = RQWorker

    def __init__(self, tmp_path: Path, ledger: str = "sqlite", worker_class: str = "Worker"):
        super().__init__(tmp_path)
        self.worker_class = worker_class
        self.queue_name = f"jl-e2e-{uuid.uuid4().hex[:10]}"
        self.url = database_url(ledger, tmp_path)
        self.store: SQLStore = empty_sql_store(self.url)
        self.redis = Redis.from_url(REDIS)
        self.settings = Settings(
            database_url=self.url,
            instance_name="client",
            heartbeat_interval=1.0,
            recovery_interval=0.5,
        )
        self.integration: RQIntegration = install(self.redis, self.settings)
        self.queue = Queue(self.queue_name, connection=self.redis)

    def enqueue(self, name: str, *args: Any, **options: Any) -> str:
        """Enqueue the job function ``rqtasks.<name>`` by name (no task code imported)."""
        return str(self.queue.enqueue(f"rqtasks.{name}", *args, **options).id)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return self.worker_env(
            name, **{"PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT / "src")]), **extra}
        )

    def start_worker(
        self,
        name: str,
        worker_class: str | None = None,
        *,
        rq_args: Sequence[str] = (),
        **env: str,
    ) -> RQWorker:
        """Spawn ``rq worker`` (``worker_class`` one of jobledger's, or a dotted path;
        ``rq_args`` added to its command line; ``env`` over the harness's variables) and wait
        until it registered its instance in the ledger."""
        worker = self.spawn_worker(name, worker_class, rq_args=rq_args, **env)
        self.await_registered(worker)
        return worker

    def start_workers(self, names: Sequence[str]) -> None:
        """Spawn a worker per name, then wait until each registered."""
        for worker in [self.spawn_worker(name) for name in names]:
            self.await_registered(worker)

    def spawn_worker(
        self,
        name: str,
        worker_class: str | None = None,
        *,
        rq_args: Sequence[str] = (),
        **env: str,
    ) -> RQWorker:
        cls = worker_class or self.worker_class
        cmd = [
            sys.executable, "-m", "rq.cli", "worker", "--url", REDIS,
            "--worker-class", cls if "." in cls else f"jobledger.integrations.rq.{cls}",
            "--name", f"{name}-{self.queue_name}", *rq_args, self.queue_name,
        ]  # fmt: skip
        return self.spawn(name, cmd, self.env(name, **env))

    def job(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        assert record is not None, f"job {job_id} is not in the ledger"
        return record

    def wait(self, what: str, check: Callable[[], object], ids: list[str], timeout: float) -> None:
        """:func:`wait_for`, failing with what the ledger, the runs table and each worker's
        log say about ``ids`` (a failed e2e run must explain itself: the machine is shared)."""
        try:
            wait_for(what, check, timeout)
        except TimeoutError as exc:
            jobs = [self.store.get(i) for i in ids]
            lines = [str(exc), *(repr(j) for j in jobs)]
            lines += [repr(r) for r in self.runs() if r[0] in ids]
            for worker in self.workers:
                lines += [f"--- {worker.name}", worker.output()[-4000:]]
            raise AssertionError("\n".join(lines)) from None

    def all_in(self, ids: list[str], state: JobState) -> bool:
        return all((r := self.store.get(i)) is not None and r.state is state for i in ids)

    # -- the integration contract's harness ---------------------------------------------------
    system = "rq"

    def deliver_again(self, job_id: str) -> None:
        self.queue.push_job_id(job_id)

    def check_queue(self, records: Collection[JobRecord]) -> None:
        """RQ's own view agrees: a succeeded job is finished and a failed one failed in RQ,
        and no job is left in the started registry (for RQ's cleanup to fail it later). RQ
        writes its bookkeeping after jobledger's outcome: it may lag the ledger a moment."""
        statuses = {JobState.SUCCEEDED: JobStatus.FINISHED, JobState.FAILED: JobStatus.FAILED}

        def disagreement() -> str | None:
            started = set(self.queue.started_job_registry.get_job_ids())
            failed = set(self.queue.failed_job_registry.get_job_ids())
            for record in records:
                status = Job.fetch(record.id, connection=self.redis).get_status()
                if status != statuses[record.state]:
                    return f"{record.id} is {record.state.value} in the ledger, {status} in RQ"
                if record.id in started:
                    return f"{record.id} left in RQ's started registry"
                if (record.id in failed) is not (record.state is JobState.FAILED):
                    return f"{record.id} ({record.state.value}): in RQ's failed registry? {failed}"
            return None

        try:
            wait_for("RQ to agree with the ledger", lambda: disagreement() is None, timeout=10)
        except TimeoutError:
            raise AssertionError(disagreement()) from None

    def close(self) -> None:
        self.stop_workers()
        registry.unregister("rq", self.integration)
        with contextlib.suppress(Exception):
            keys = list(self.redis.scan_iter(f"*{self.queue_name}*"))
            if keys:
                self.redis.delete(*keys)
        self.redis.close()
        self.store.close()


@pytest.fixture(name="make_rq")
def make_rq_fixture(tmp_path: Path) -> Iterator[Callable[..., RQHarness]]:
    """Build harnesses: ``make_rq(ledger="sqlite", worker_class="Worker")``."""
    made: list[RQHarness] = []

    def make(ledger: str = "sqlite", worker_class: str = "Worker") -> RQHarness:
        made.append(RQHarness(tmp_path, ledger, worker_class))
        return made[-1]

    yield make
    for harness in made:
        harness.close()
