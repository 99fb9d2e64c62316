"""Real ``dramatiq`` workers as subprocesses (N processes of T threads each), a SQLite or
PostgreSQL ledger, a runs table of the test's own, and deadlines instead of sleeps.
:class:`Harness` is also the integration contract's harness for Dramatiq
(:class:`jobledger.testing.contract.IntegrationHarness`).

The fixtures live here, not in a conftest.py, so that the root conftest keeps its module name;
test modules import them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))

from dramatiq_app import make_app  # noqa: E402

from jobledger.config import Settings  # noqa: E402
from jobledger.integrations.base import Integration  # noqa: E402
from jobledger.model import JobRecord  # noqa: E402
from jobledger.stores.sql import SQLStore  # noqa: E402
from jobledger.testing import wait_for  # noqa: E402, F401 - the e2e tests import it from here
from jobledger.testing.contract.processes import ProcessHarness, WorkerProcess  # noqa: E402
from ledgerdb import database_url, empty_sql_store  # noqa: E402

REDIS = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ = os.environ.get("JOBLEDGER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
BROKERS = {"redis": REDIS, "rabbitmq": RABBITMQ}


class Harness(ProcessHarness[WorkerProcess]):
    """A queue of the test's own on ``broker`` (a URL), a ledger on ``ledger`` (``sqlite`` or
    ``postgresql``), a runs table, the client's broker with jobledger installed, and the
    workers started."""

    worker_kind = WorkerProcess

    def __init__(
        self, tmp_path: Path, broker: str, ledger: str = "sqlite", heartbeat_interval: float = 1.0
    ) -> None:
        super().__init__(tmp_path)
        self.broker_url = broker
        self.ledger = ledger
        self.queue = f"jl-e2e-{uuid.uuid4().hex[:10]}"
        self.url = database_url(ledger, tmp_path)
        self.store: SQLStore = empty_sql_store(self.url)
        self.settings = Settings(
            database_url=self.url,
            instance_name="client",
            heartbeat_interval=heartbeat_interval,
            recovery_interval=0.5,
        )
        self.broker, self.middleware = make_app(broker, self.queue, self.settings)

    def send(self, actor: str, *args: Any, **kwargs: Any) -> str:
        """Send a message to ``actor`` (by name) as the application would; its id."""
        return str(self.broker.get_actor(actor).send(*args, **kwargs).message_id)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        path = [str(HERE), str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
        base = {
            "PYTHONPATH": os.pathsep.join(path),  # and the caller's (another Dramatiq, say)
            "E2E_WORKER": "1",
            "E2E_BROKER": self.broker_url,
            "E2E_QUEUE": self.queue,
        }
        return self.worker_env(name, **{**base, **extra})

    def spawn_worker(
        self, name: str, processes: int = 2, threads: int = 4, **extra: str
    ) -> WorkerProcess:
        """``dramatiq dramatiq_app``; returns at once."""
        cmd = [
            sys.executable, "-m", "dramatiq", "dramatiq_app:BROKER", "--processes", str(processes),
            "--threads", str(threads), "--queues", self.queue, "--worker-shutdown-timeout", "30000",
        ]  # fmt: skip
        return self.spawn(name, cmd, self.env(name, **extra))

    def start_worker(
        self, name: str, processes: int = 2, threads: int = 4, **extra: str
    ) -> WorkerProcess:
        """Spawn a worker and wait until each of its processes registered in the ledger."""
        worker = self.spawn_worker(name, processes, threads, **extra)
        self.await_registered(worker, processes)
        return worker

    def start_workers(self, names: Sequence[str]) -> None:
        """Spawn a worker (1 process of 2 threads) per name, then wait until each registered."""
        for worker in [self.spawn_worker(name, 1, 2) for name in names]:
            self.await_registered(worker)

    # -- the integration contract's harness ---------------------------------------------------
    system = "dramatiq"

    @property
    def integration(self) -> Integration:
        return self.middleware.publisher

    def enqueue(self, task: str, *args: Any) -> str:
        return self.send(f"e2e.{task}", *args)

    def deliver_again(self, job_id: str) -> None:
        """The job's message once more, as the broker would redeliver it."""
        record = self.store.get(job_id)
        assert record is not None, job_id
        self.integration.publish(record)

    def check_queue(self, records: Collection[JobRecord]) -> None:
        """Dramatiq keeps no per-job state of its own here (no results backend)."""

    def close(self) -> None:
        self.stop_workers()
        with contextlib.suppress(Exception):  # best effort: the queue is the test's own
            self.broker.flush_all()
        self.middleware.close()
        self.broker.close()
        self.store.close()


@pytest.fixture(name="make_harness")
def make_harness_fixture(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Build harnesses: ``make_harness("redis" | "rabbitmq", ledger, ...)``."""
    made: list[Harness] = []

    def make(broker: str = "redis", ledger: str = "sqlite", **options: Any) -> Harness:
        made.append(Harness(tmp_path, BROKERS[broker], ledger, **options))
        return made[-1]

    yield make
    for harness in made:
        harness.close()
