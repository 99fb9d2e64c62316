"""Private servers a fault-injection run may stop, kill and start: a PostgreSQL cluster and a
redis-server, each on a free port under a directory of its own.

The machine's shared servers are never restarted (other sessions use them); these are.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _wait_port(port: int, up: bool, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _accepts(port) is not up:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} on port {port} did not {'start' if up else 'stop'}")
        time.sleep(0.05)


class PrivatePostgres:
    """A PostgreSQL cluster of its own, run as the ``postgres`` user (``initdb`` refuses root).

    ``directory`` must be one the ``postgres`` user can reach; the cluster lives in
    ``directory/pg`` (handed to that user), with its log beside it.
    """

    def __init__(self, directory: Path) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = Path(found[-1]).parent
        self.root = directory / "pg"
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    def init(self) -> None:
        self.root.mkdir()
        shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1"
            f" -c unix_socket_directories={self.root} -c max_connections=200"
        )
        self._run(
            "pg_ctl", action, "-D", str(self.data), "-l", str(self.logfile), "-w",
            "-t", "60", "-o", options, *extra,
        )  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        """``-m fast``: clients are disconnected at once, as when a database host restarts."""
        self._ctl("stop", "-m", "fast")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")


class PrivateRedis:
    """A redis-server with an append-only file, so a restart keeps every message it accepted.

    ``appendfsync always`` (the default here): each write is on disk before Redis answers it,
    so a server that is SIGKILLed (not shut down) loses nothing it acknowledged, and whatever
    a run loses is jobledger's or Celery's doing, not Redis's one-second ``everysec`` window.
    """

    def __init__(self, directory: Path, *, persistent: bool = True, fsync: str = "always") -> None:
        """``persistent=False``: no append-only file, so a restart loses every message (a
        cache-style Redis, as many brokers run). ``fsync``: the ``appendfsync`` policy."""
        self.dir = directory / "redis"
        self.dir.mkdir()
        self.persistent = persistent
        self.fsync = fsync
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", self.fsync,
            "--save", "", "--logfile", str(self.dir / "server.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, start_new_session=True)
        _wait_port(self.port, True, "redis-server")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL, as a crashed or evicted broker pod: no shutdown save, only the AOF.
        ``signal.SIGTERM``: the shutdown an orchestrator asks for (Redis fsyncs the AOF and
        exits)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            self.proc.wait(30)
            self.proc = None
        _wait_port(self.port, False, "redis-server")

    close = kill
