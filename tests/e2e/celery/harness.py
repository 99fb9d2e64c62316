"""Real Celery workers as subprocesses, a SQLite ledger, and deadlines instead of sleeps.
:class:`Harness` is also the integration contract's harness for Celery
(:class:`jobledger.testing.contract.IntegrationHarness`).

The fixtures live here, not in a conftest.py, so that the root conftest keeps its module name;
test modules import them.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE))

from e2eapp import make_app  # noqa: E402
from tcpproxy import TcpProxy  # noqa: E402

from jobledger.config import Settings  # noqa: E402
from jobledger.model import JobRecord  # noqa: E402
from jobledger.stores.base import Store  # noqa: E402
from jobledger.stores.sql import SQLStore  # noqa: E402
from jobledger.testing import wait_for  # noqa: E402 - the e2e tests import it from here
from jobledger.testing.contract.processes import ProcessHarness, WorkerProcess, spawn  # noqa: E402
from ledgerdb import database_url, discard_store, empty_store  # noqa: E402

REDIS = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ = os.environ.get("JOBLEDGER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

T = TypeVar("T")


def spawn_worker(
    module: str, name: str, queue: str, concurrency: int, cwd: Path, env: dict[str, str], log: Path
) -> WorkerProcess:
    """``celery -A module worker`` (prefork) on ``queue`` in a process group of its own, its
    output in ``log``; returns at once (the caller decides what "ready" means). The Celery
    node name carries the queue: a node's remote-control queue on the shared RabbitMQ is
    exclusive, so two sessions each starting a worker ``survivor`` would lock each other out."""
    return spawn(
        celery_command(module, name, queue, concurrency), name, cwd, env, log, WorkerProcess
    )


def celery_command(module: str, name: str, queue: str, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", module, "worker",
        "-P", "prefork", "-c", str(concurrency), "-Q", queue,
        "-n", f"{name}.{queue}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle",
        "--without-heartbeat",
    ]  # fmt: skip


class Harness(ProcessHarness[WorkerProcess]):
    """A queue of the test's own on ``broker``, a ledger on ``ledger`` (``sqlite``,
    ``postgresql`` or ``redis``), a runs table, and the workers started. With ``proxied`` (a
    SQL server's ledger), the client and the workers reach the ledger through a
    :class:`TcpProxy` (:attr:`proxy`) the test can cut; :attr:`store` (the test's view)
    always goes direct."""

    worker_kind = WorkerProcess

    def __init__(
        self,
        tmp_path: Path,
        broker: str,
        ledger: str = "sqlite",
        *,
        proxied: bool = False,
        heartbeat_interval: float = 1.0,  # TTL 3 s: the shortest an e2e test may use
        visibility_timeout: float | None = None,
    ) -> None:
        super().__init__(tmp_path)
        self.broker = broker
        self.ledger = ledger
        self.queue = f"jl-e2e-{uuid.uuid4().hex[:10]}"
        self.url = database_url(ledger, tmp_path)
        self.store: Store = empty_store(self.url)
        self.proxy: TcpProxy | None = None
        self.worker_url = self.url
        if proxied:
            assert isinstance(self.store, SQLStore), "the proxy forwards to a SQL server"
            parsed = self.store.url
            self.proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
            self.proxy.start()
            self.worker_url = self.proxy.url_for(self.url)
        self.visibility_timeout = visibility_timeout
        self.settings = Settings(
            database_url=self.worker_url,
            instance_name="client",
            heartbeat_interval=heartbeat_interval,
            recovery_interval=0.5,
        )
        self.app, self.integration = make_app(broker, self.queue, self.settings, visibility_timeout)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        env = self.worker_env(
            name,
            PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT / "src")]),
            E2E_BROKER=self.broker,
            E2E_QUEUE=self.queue,
        )
        if self.visibility_timeout is not None:
            env["E2E_VISIBILITY_TIMEOUT"] = str(self.visibility_timeout)
        env["PGAPPNAME"] = self.session_name(name)  # libpq names the worker's sessions
        env.update(extra)
        return env

    def session_name(self, name: str) -> str:
        """The ``application_name`` of the worker ``name``'s PostgreSQL sessions."""
        return f"{self.queue}-{name}"

    def await_gone(self, worker: WorkerProcess) -> None:
        """Wait until a killed worker can change the ledger no more: every process of its
        group has exited and, on PostgreSQL, every session of its has ended. A statement
        (a claim's commit) sent just before the kill still lands after it, so the ledger read
        at the kill is not yet what the dead worker left."""
        worker.wait(10)
        wait_for(f"every process of {worker.name} to exit", lambda: not worker.group_alive())
        if self.ledger != "postgresql":
            return
        assert isinstance(self.store, SQLStore)
        from sqlalchemy import text

        def sessions() -> int:
            with self.store.engine.connect() as conn:
                query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"
                return int(
                    conn.execute(text(query), {"name": self.session_name(worker.name)}).scalar_one()
                )

        wait_for(f"the ledger to end {worker.name}'s sessions", lambda: sessions() == 0)

    def start_worker(self, name: str, concurrency: int = 4, **extra: str) -> WorkerProcess:
        """Spawn a worker and wait until it registered in the ledger and is ready."""
        worker = self.spawn_worker(name, concurrency, **extra)
        self._await_ready(worker)
        return worker

    def start_workers(self, names: Sequence[str]) -> None:
        """Spawn a worker (2 pool processes) per name, then wait until each is ready."""
        for worker in [self.spawn_worker(name, 2) for name in names]:
            self._await_ready(worker)

    def _await_ready(self, worker: WorkerProcess) -> None:
        self.await_registered(worker)
        wait_for(
            f"worker {worker.name} to be ready",
            lambda: "ready." in worker.output() or worker.check_alive(),
        )

    def spawn_worker(self, name: str, concurrency: int = 4, **extra: str) -> WorkerProcess:
        """Spawn a worker and return at once."""
        command = celery_command("e2eworker", name, self.queue, concurrency)
        return self.spawn(name, command, self.env(name, **extra))

    # -- the integration contract's harness ---------------------------------------------------
    system = "celery"

    def enqueue(self, task: str, *args: Any) -> str:
        return str(self.app.send_task(f"e2e.{task}", args=list(args)).id)

    def deliver_again(self, job_id: str) -> None:
        record = self.store.get(job_id)
        assert record is not None, job_id
        self.app.send_task(record.name, args=record.args, kwargs=record.kwargs, task_id=job_id)

    def check_queue(self, records: Collection[JobRecord]) -> None:
        """Celery keeps no per-job state of its own here (results are ignored)."""

    def close(self) -> None:
        self.stop_workers()
        self.integration.close()
        discard_store(self.store)
        if self.proxy is not None:
            self.proxy.close()
        _purge(self.broker, self.queue, dict(self.app.conf.broker_transport_options))


def _purge(broker: str, queue: str, options: dict[str, Any]) -> None:
    from kombu import Connection

    try:
        with Connection(broker, connect_timeout=5, transport_options=options) as conn:
            channel = conn.channel()
            channel.queue_delete(queue)
        prefix = options.get("global_keyprefix")
        if prefix:  # the test's own unacked bookkeeping too
            import redis

            client = redis.Redis.from_url(broker)
            for key in list(client.scan_iter(f"{prefix}*", count=1000)):
                client.delete(key)
            client.close()
    except Exception:  # best effort: the queue name is unique to the test anyway
        pass


@pytest.fixture(name="redis_harness")
def redis_harness_fixture(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, REDIS)
    yield harness
    harness.close()


@pytest.fixture(name="make_harness")
def make_harness_fixture(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    """Build harnesses with other ledgers or settings: ``make_harness(broker, ledger, ...)``."""
    made: list[Harness] = []

    def make(broker: str = REDIS, ledger: str = "sqlite", **options: Any) -> Harness:
        made.append(Harness(tmp_path, broker, ledger, **options))
        return made[-1]

    yield make
    for harness in made:
        harness.close()


@pytest.fixture(name="rabbit_harness")
def rabbit_harness_fixture(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, RABBITMQ)
    yield harness
    harness.close()
