"""Brokers the outbox tests can break: a private ``redis-server`` to stop and start again on the
same port, and a proxy to the shared Redis that delays every request (a slow broker).

The shared Redis (``harness.REDIS``) is never stopped: other tests and sessions use it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tcpproxy import TcpProxy

from jobledger.testing import wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of the test's own on a free port, without persistence: :meth:`stop`
    is a broker outage (connections refused, every message gone), :meth:`start` brings it back
    on the same port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None, "already running"
        self.starts += 1
        log = (self.workdir / f"redis-{self.starts}.log").open("wb")
        cmd = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", str(self.workdir),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        wait_for(f"redis-server on port {self.port} to answer", self.ping, timeout=15)

    def stop(self) -> None:
        """SIGKILL: an outage, not a shutdown (nothing saved, connections reset)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)
        wait_for(f"port {self.port} to refuse connections", lambda: not self._accepts())

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def _accepts(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def close(self) -> None:
        self.stop()


class SlowProxy(TcpProxy):
    """A :class:`TcpProxy` that holds every chunk a client sends for ``delay`` seconds: each
    Redis command (one LPUSH per Celery publish) takes at least that long."""

    def __init__(self, redis_url: str, delay: float) -> None:
        parsed = urlsplit(redis_url)
        super().__init__((parsed.hostname or "127.0.0.1", parsed.port or 6379))
        self.delay = delay
        #: ``redis_url`` through the proxy
        self.url = urlunsplit(parsed._replace(netloc=f"127.0.0.1:{self.port}"))

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            upstream = source.getpeername()[1] == self.target[1]
        except OSError:
            upstream = True
        delay = 0.0 if upstream else self.delay  # only what the client sends waits
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if delay:
                    time.sleep(delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            source.close()


def queue_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    """The Celery messages waiting in ``queue`` (a Redis list), oldest first, as kombu wrote
    them (``headers['id']`` is the task id)."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    return [json.loads(item) for item in reversed(raw)]  # LPUSH: the newest at the head


def queue_length(redis_url: str, queue: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        return int(client.llen(queue))
    finally:
        client.close()
