"""What the queue benches share: a worker they start as a process group of its own, and waiting
on a condition with a deadline (never a fixed sleep).

The benches are named after the queue system they measure (``celery.py``, ``rq.py``...), so
each one puts its directory at the *end* of ``sys.path`` before importing this module: the
queue system's own package wins the name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def wait_for(what: str, check: Callable[[], object], timeout: float = 300) -> None:
    """Return once ``check()`` is true; RuntimeError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        pause.wait(0.01)


class WorkerProcess:
    """A worker started in a session of its own (so :meth:`kill` takes its pool with it), its
    output kept in ``log`` and shown when it dies early."""

    def __init__(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str],
        log: Path,
        *,
        cwd: str | None = None,
    ) -> None:
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                list(cmd),
                env=dict(env),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.log = log

    def alive(self) -> bool:
        """True while it runs; RuntimeError with the end of its log once it has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{self.log.read_text(errors='replace')[-3000:]}")
        return True

    def wait_until(self, what: str, ready: Callable[[], object], timeout: float = 60) -> None:
        """Wait for ``ready()``, failing at once if the worker dies meanwhile."""
        wait_for(what, lambda: self.alive() and ready(), timeout)

    def children(self) -> list[int]:
        """The process ids of its direct children (a pool, a work horse)."""
        with contextlib.suppress(OSError):
            path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            return [int(p) for p in path.read_text().split()]
        return []

    def kill(self) -> None:
        """SIGKILL the worker's whole process group and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
