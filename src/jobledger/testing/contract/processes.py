"""Process control for an :class:`~jobledger.testing.contract.IntegrationHarness` over real
worker processes: what every queue system's harness needs and none should write again.

A harness for a new queue system subclasses :class:`ProcessHarness`, sets ``system``,
``store``, ``settings`` and ``integration``, starts each worker with :meth:`~ProcessHarness.spawn`
(its command line and environment are the queue system's own) and writes only
``start_workers``, ``enqueue``, ``deliver_again`` and ``check_queue``; killing, terminating,
counting runs and cleaning up come from here. A worker whose processes need more than a group
kill (RQ's work horse is a process group of its own) subclasses :class:`WorkerProcess`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Generic, Literal, TypeVar

from jobledger.config import Settings
from jobledger.integrations.base import Integration
from jobledger.stores.base import Store
from jobledger.testing import wait_for
from jobledger.testing.executions import ENV, ExecutionLog, Run

__all__ = ["ProcessHarness", "WorkerExited", "WorkerProcess", "spawn"]


class WorkerExited(AssertionError):
    """A worker process ended while the test waited for it to come up; the message holds its
    exit status and output (a worker that cannot start says why there)."""


class WorkerProcess:
    """A worker's main process, started in a session (so a process group) of its own, its
    output in ``log``."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, log: Path) -> None:
        self.proc = proc
        self.name = name
        self.log = log

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """``sig`` to the whole process group: the main process and every child it forked."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def warm_shutdown(self) -> None:
        """SIGTERM to the main process only, as an orchestrator stopping a container does."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)

    def children(self) -> list[int]:
        """The main process's children (pool processes, a work horse), from /proc."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            return [int(pid) for pid in path.read_text().split()]
        return []

    def group_alive(self) -> bool:
        """Whether a process of its group still exists (a child of a killed worker outlives
        it until the signal reaches it too)."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float = 30) -> int:
        """The main process's exit status once it has exited (TimeoutExpired if it does not)."""
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> Literal[False]:
        """False while the main process runs (for a ``wait_for`` check to ``or`` with); raise
        :class:`WorkerExited` once it has exited."""
        if self.proc.poll() is not None:
            raise WorkerExited(
                f"worker {self.name} exited ({self.proc.returncode}):\n{self.output()}"
            )
        return False


W = TypeVar("W", bound=WorkerProcess)


def spawn(
    cmd: Sequence[str],
    name: str,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    kind: type[W],
) -> W:
    """Start ``cmd`` in a session of its own, its output in ``log``; return at once (the
    caller decides what "ready" means)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return kind(proc, name, log)


class ProcessHarness(Generic[W]):
    """The queue-independent half of an integration harness: a runs table in the test's
    directory (named to the workers and this process in ``JOBLEDGER_EXECUTION_LOG``), the
    workers started, and the contract's process-control methods over them."""

    #: The worker wrapper :meth:`spawn` makes (a subclass for queue-specific killing).
    worker_kind: type[W]
    system: str
    store: Store
    settings: Settings
    integration: Integration

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.log = ExecutionLog.create(tmp_path / "runs.db")
        os.environ[ENV] = self.log.path  # the client's publishes write there too
        self.workers: list[W] = []

    def worker_env(self, name: str, **extra: str) -> dict[str, str]:
        """This process's environment with the ``JOBLEDGER_*`` variables that give the worker
        ``name`` the harness's :attr:`settings` (its ledger, heartbeat and sweep) and the runs
        table; ``extra`` over them."""
        env = dict(os.environ)
        env.update(
            {
                ENV: self.log.path,
                "JOBLEDGER_DATABASE_URL": self.settings.database_url,
                "JOBLEDGER_INSTANCE_NAME": name,
                "JOBLEDGER_HEARTBEAT_INTERVAL": str(self.settings.heartbeat_interval),
                "JOBLEDGER_RECOVERY_INTERVAL": str(self.settings.recovery_interval),
                "JOBLEDGER_MAX_RECOVERIES": str(self.settings.max_recoveries),
            }
        )
        env.update(extra)
        return env

    def spawn(self, name: str, cmd: Sequence[str], env: Mapping[str, str]) -> W:
        """Start the worker ``name`` (in the test's directory, so workers share a journal
        directory; its output in ``<name>.log`` there); return at once."""
        worker = spawn(
            cmd, name, self.tmp_path, env, self.tmp_path / f"{name}.log", self.worker_kind
        )
        self.workers.append(worker)
        return worker

    def registered(self, name: str) -> int:
        """How many live instances named ``name`` the ledger holds."""
        return sum(1 for i in self.store.instances(ttl=10) if i.name == name and i.alive)

    def await_registered(self, worker: W, instances: int = 1) -> None:
        """Return once ``worker`` has registered ``instances`` instances (one per worker
        process where each process is an instance); fail at once if it exits."""
        wait_for(
            f"worker {worker.name} to register {instances} instance(s)",
            lambda: self.registered(worker.name) >= instances or worker.check_alive(),
        )

    def worker(self, name: str) -> W:
        return next(w for w in self.workers if w.name == name)

    def runs(self) -> list[Run]:
        return self.log.runs()

    def executions(self, job_id: str) -> list[Run]:
        return self.log.executions(job_id)

    def pids(self, job_id: str) -> list[int]:
        """The processes that started ``job_id``'s body, in order."""
        return [run.pid for run in self.log.executions(job_id)]

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

    def stop_workers(self) -> None:
        """SIGKILL every worker started, and reap them (for ``close``)."""
        for worker in self.workers:
            worker.kill(signal.SIGKILL)
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(10)
