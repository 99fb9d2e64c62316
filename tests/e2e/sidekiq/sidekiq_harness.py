"""A real Sidekiq app (Debian's ruby-sidekiq, 6.4) against a private redis-server and a real
``jobledger serve``: processes started, SIGKILLed and SIGTERMed as a deployment would see.

The fixtures live here, not in a conftest.py, so the root conftest keeps its module name;
test modules import them. Every wait is a deadline on a condition, never a sleep.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from e2e.celery.services import PrivateRedis, free_port
from jobledger.model import JobRecord, JobState
from jobledger.stores.sql import SQLStore
from jobledger.testing import wait_for

APP = Path(__file__).resolve().parent / "app"
#: Sidekiq beats every second here (5 s by default) and the supervisor judges a process dead
#: after 3 s of silence: the README's figures come from these settings.
BEAT_PAUSE = 1.0
PROCESS_TTL = 3.0
MAX_RECOVERIES = 3


class Supervisor:
    """``jobledger serve`` with the Sidekiq integration, as its own process."""

    def __init__(self, workdir: Path, sidekiq_redis: str) -> None:
        self.db_url = f"sqlite:///{workdir / 'ledger.db'}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "supervisor.log"
        self.env = {
            **os.environ,
            "JOBLEDGER_DATABASE_URL": self.db_url,
            "JOBLEDGER_SIDEKIQ_REDIS_URL": sidekiq_redis,
            "JOBLEDGER_SIDEKIQ_PROCESS_TTL": str(PROCESS_TTL),
            "JOBLEDGER_HEARTBEAT_INTERVAL": "1",
            "JOBLEDGER_RECOVERY_INTERVAL": "1",
            "JOBLEDGER_MAX_RECOVERIES": str(MAX_RECOVERIES),
        }
        self.env.pop("JOBLEDGER_API_TOKEN", None)
        self.cli("migrate")
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jobledger", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for("the supervisor to answer", self._up)
        self.store = SQLStore(self.db_url)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``jobledger ARGS`` with the supervisor's settings."""
        return subprocess.run(
            [sys.executable, "-m", "jobledger", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"supervisor exited: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def job(self, jid: str) -> JobRecord:
        record = self.store.get(jid)
        assert record is not None, f"job {jid} is not in the ledger"
        return record

    def wait_states(self, jids: list[str], state: JobState, timeout: float = 60) -> None:
        def reached() -> bool:
            return all(self.job(j).state is state for j in jids if self.store.get(j))

        def all_recorded() -> bool:
            return all(self.store.get(j) is not None for j in jids)

        wait_for("every job to be recorded", all_recorded, timeout)
        try:
            wait_for(f"{len(jids)} jobs to be {state.value}", reached, timeout)
        except TimeoutError:
            left = {j: self.job(j).state.value for j in jids if self.job(j).state is not state}
            log = self.log.read_text()[-3000:]
            raise AssertionError(f"not {state.value}: {left}\n{log}") from None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.store.close()


@dataclass
class SidekiqProcess:
    """One ``sidekiq`` process of the app; its identity as it names itself in ``processes``."""

    process: subprocess.Popen[bytes]
    redis: redis.Redis
    log: Path
    _identity: str | None = None

    @property
    def identity(self) -> str:
        if self._identity is not None:
            return self._identity

        def found() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"sidekiq exited: {self.log.read_text()[-3000:]}")
            for member in self.redis.smembers("processes"):
                if f":{self.process.pid}:" in member:
                    return str(member)
            return None

        self._identity = wait_for(f"sidekiq {self.process.pid} to beat", found)
        return self._identity

    def identity_gone(self) -> bool:
        """True once it left ``processes`` (a clean shutdown)."""
        return not any(f":{self.process.pid}:" in m for m in self.redis.smembers("processes"))

    def holding(self) -> set[str]:
        """The jids its last heartbeat reported in flight."""
        work = self.redis.hgetall(f"{self.identity}:workers")
        return {json.loads(json.loads(entry)["payload"])["jid"] for entry in work.values()}

    def wait_holding(self, jids: set[str], timeout: float = 30) -> None:
        wait_for(f"sidekiq to report {len(jids)} jobs in flight", lambda: jids <= self.holding(),
                 timeout)  # fmt: skip

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)
        self.process.wait(timeout=30)


class SidekiqApp:
    """The Ruby app under ``app/``: processes to start and jobs to enqueue."""

    def __init__(self, workdir: Path, redis_url: str, supervisor: Supervisor) -> None:
        self.workdir = workdir
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.env = {**os.environ, "REDIS_URL": redis_url, "JOBLEDGER_URL": supervisor.url,
                    "SIDEKIQ_BEAT_PAUSE": str(BEAT_PAUSE)}  # fmt: skip
        self.processes: list[SidekiqProcess] = []

    def start(self, concurrency: int = 5) -> SidekiqProcess:
        if shutil.which("sidekiq") is None:
            raise AssertionError(
                "sidekiq is not installed: apt-get install ruby-sidekiq ruby-faraday "
                "(scripts/test installs them)"
            )
        log = self.workdir / f"sidekiq-{len(self.processes)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["sidekiq", "-r", str(APP / "app.rb"), "-c", str(concurrency), "-t", "1"],
                env=self.env,
                cwd=APP,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = SidekiqProcess(process, self.redis, log)
        self.processes.append(started)
        _ = started.identity  # up and beating
        return started

    def enqueue(self, count: int) -> list[str]:
        done = subprocess.run(
            ["ruby", str(APP / "enqueue.rb"), str(count)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        jids: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
        return jids

    def notes(self, which: str) -> list[dict[str, Any]]:
        """What the bodies noted: ``starts`` or ``completes``, oldest first."""
        return [json.loads(raw) for raw in self.redis.lrange(f"jl:{which}", 0, -1)]

    def stop(self) -> None:
        for started in self.processes:
            if started.process.poll() is None:
                started.process.kill()
                started.process.wait()
        self.redis.close()


@pytest.fixture(name="sidekiq_redis")
def sidekiq_redis_fixture(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path, persistent=False)
    server.start()
    yield server
    server.close()


@pytest.fixture(name="supervisor")
def supervisor_fixture(tmp_path: Path, sidekiq_redis: PrivateRedis) -> Iterator[Supervisor]:
    running = Supervisor(tmp_path, sidekiq_redis.url)
    yield running
    running.stop()


@pytest.fixture(name="sidekiq")
def sidekiq_fixture(
    tmp_path: Path, sidekiq_redis: PrivateRedis, supervisor: Supervisor
) -> Iterator[SidekiqApp]:
    app = SidekiqApp(tmp_path, sidekiq_redis.url, supervisor)
    yield app
    app.stop()


def ran_after_success(app: SidekiqApp, supervisor: Supervisor) -> list[str]:
    """Jobs whose body started after the ledger recorded them succeeded (one host's clock)."""
    late = []
    for start in app.notes("starts"):
        record = supervisor.job(start["jid"])
        finished = record.finished_at
        if record.state is JobState.SUCCEEDED and finished and start["at"] > finished.timestamp():
            late.append(start["jid"])
    return late
