"""Real Celery workers as subprocesses, a SQLite ledger, and deadlines instead of sleeps.
:class:`Harness` is also the integration contract's harness for Celery
(:class:`jobledger.testing.contract.IntegrationHarness`).

The fixtures live here, not in a conftest.py, so that the root conftest keeps its module name;
test modules import them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
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
from jobledger.testing.executions import ENV, ExecutionLog, Run  # noqa: E402
from ledgerdb import database_url, discard_store, empty_store  # noqa: E402

REDIS = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ = os.environ.get("JOBLEDGER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

T = TypeVar("T")


class Worker:
    """One ``celery worker`` process group; :meth:`kill` signals the whole group."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
        self.proc = proc
        self.name = name
        self.log = log

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def warm_shutdown(self) -> None:
        """SIGTERM to the main process only, as an orchestrator stopping a container does."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def spawn_worker(
    module: str, name: str, queue: str, concurrency: int, cwd: Path, env: dict[str, str], log: Path
) -> Worker:
    """``celery -A module worker`` (prefork) on ``queue`` in a process group of its own, its
    output in ``log``; returns at once (the caller decides what "ready" means). The Celery
    node name carries the queue: a node's remote-control queue on the shared RabbitMQ is
    exclusive, so two sessions each starting a worker ``survivor`` would lock each other out."""
    cmd = [
        sys.executable, "-m", "celery", "-A", module, "worker",
        "-P", "prefork", "-c", str(concurrency), "-Q", queue,
        "-n", f"{name}.{queue}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle",
        "--without-heartbeat",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Worker(proc, name, log)


class Harness:
    """A queue of the test's own on ``broker``, a ledger on ``ledger`` (``sqlite``,
    ``postgresql`` or ``redis``), a runs table, and the workers started. With ``proxied`` (a
    SQL server's ledger), the client and the workers reach the ledger through a
    :class:`TcpProxy` (:attr:`proxy`) the test can cut; :attr:`store` (the test's view)
    always goes direct."""

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
        self.tmp_path = tmp_path
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
        self.heartbeat_interval = heartbeat_interval
        self.visibility_timeout = visibility_timeout
        self.log = ExecutionLog.create(tmp_path / "runs.db")
        os.environ[ENV] = self.log.path  # the client's publishes write there too
        self.settings = Settings(
            database_url=self.worker_url,
            instance_name="client",
            heartbeat_interval=heartbeat_interval,
            recovery_interval=0.5,
        )
        self.app, self.integration = make_app(broker, self.queue, self.settings, visibility_timeout)
        self.workers: list[Worker] = []

    def env(self, name: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT / "src")]),
            E2E_BROKER=self.broker,
            E2E_QUEUE=self.queue,
            JOBLEDGER_EXECUTION_LOG=self.log.path,
            JOBLEDGER_DATABASE_URL=self.worker_url,
            JOBLEDGER_INSTANCE_NAME=name,
            JOBLEDGER_HEARTBEAT_INTERVAL=str(self.heartbeat_interval),
            JOBLEDGER_RECOVERY_INTERVAL="0.5",
            JOBLEDGER_MAX_RECOVERIES="3",
        )
        if self.visibility_timeout is not None:
            env["E2E_VISIBILITY_TIMEOUT"] = str(self.visibility_timeout)
        env.update(extra)
        return env

    def start_worker(self, name: str, concurrency: int = 4, **extra: str) -> Worker:
        """Spawn a worker and wait until it registered in the ledger and is ready."""
        worker = self.spawn_worker(name, concurrency, **extra)
        self._await_ready(worker)
        return worker

    def start_workers(self, names: Sequence[str]) -> None:
        """Spawn a worker (2 pool processes) per name, then wait until each is ready."""
        for worker in [self.spawn_worker(name, 2) for name in names]:
            self._await_ready(worker)

    def _await_ready(self, worker: Worker) -> None:
        proc, name = worker.proc, worker.name
        wait_for(
            f"worker {name} to register",
            lambda: (
                (proc.poll() is None and any(i.name == name for i in self.store.instances(ttl=10)))
                or _died(worker)
            ),
        )
        wait_for(f"worker {name} to be ready", lambda: "ready." in worker.output() or _died(worker))

    def spawn_worker(self, name: str, concurrency: int = 4, **extra: str) -> Worker:
        """Spawn a worker (in the test's directory, so workers share a journal directory) and
        return at once."""
        worker = spawn_worker(
            "e2eworker", name, self.queue, concurrency, self.tmp_path, self.env(name, **extra),
            self.tmp_path / f"{name}.log",
        )  # fmt: skip
        self.workers.append(worker)
        return worker

    def runs(self) -> list[Run]:
        return self.log.runs()

    def pids(self, job_id: str) -> list[int]:
        """The pool processes that started ``job_id``, in order."""
        return [run.pid for run in self.log.executions(job_id)]

    # -- the integration contract's harness ---------------------------------------------------
    system = "celery"

    def enqueue(self, task: str, *args: Any) -> str:
        return str(self.app.send_task(f"e2e.{task}", args=list(args)).id)

    def deliver_again(self, job_id: str) -> None:
        record = self.store.get(job_id)
        assert record is not None, job_id
        self.app.send_task(record.name, args=record.args, kwargs=record.kwargs, task_id=job_id)

    def worker(self, name: str) -> Worker:
        return next(w for w in self.workers if w.name == name)

    def kill_worker(self, name: str) -> None:
        worker = self.worker(name)
        worker.kill(signal.SIGKILL)
        worker.wait(10)

    def kill_work_process(self, job_id: str) -> None:
        os.kill(self.pids(job_id)[-1], signal.SIGKILL)

    def terminate(self, name: str) -> int:
        worker = self.worker(name)
        worker.warm_shutdown()
        return worker.wait(60)

    def executions(self, job_id: str) -> list[Run]:
        return self.log.executions(job_id)

    def check_queue(self, records: Collection[JobRecord]) -> None:
        """Celery keeps no per-job state of its own here (results are ignored)."""

    def close(self) -> None:
        for worker in self.workers:
            worker.kill(signal.SIGKILL)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(10)
        self.integration.close()
        discard_store(self.store)
        if self.proxy is not None:
            self.proxy.close()
        _purge(self.broker, self.queue, dict(self.app.conf.broker_transport_options))


def _died(worker: Worker) -> Any:
    if worker.proc.poll() is not None:
        pytest.fail(f"worker {worker.name} exited ({worker.proc.returncode}):\n{worker.output()}")
    return False


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
