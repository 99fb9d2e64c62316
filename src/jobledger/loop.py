"""A periodic task on a daemon thread: the shape of every background loop jobledger runs
(the recovery sweep in workers; recovery, pruning and heartbeats in the supervisor).

The task runs after ``first_delay`` and then every ``interval`` seconds; a failure is logged
(and reported through ``on_error``) and the loop carries on, since the next run may work; the
wait is a :class:`threading.Event`, so :meth:`Loop.stop` never waits out an interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from jobledger.errors import JobLedgerError

log = logging.getLogger(__name__)


class Loop:
    """Run ``task`` every ``interval`` seconds in a daemon thread until :meth:`stop`."""

    def __init__(
        self,
        name: str,
        interval: float,
        task: Callable[[], object],
        *,
        first_delay: float = 0.0,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.interval = interval
        self.task = task
        self.first_delay = first_delay
        self.on_error = on_error
        self.runs = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"jobledger-{self.name}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        delay = self.first_delay
        while not self._stopping.wait(delay):
            try:
                self.task()
            except JobLedgerError as exc:
                self.on_error()
                log.warning("%s failed: %s", self.name, exc)
            except Exception:  # a bug must not end the loop; the next run may work
                self.on_error()
                log.exception("%s crashed", self.name)
            self.runs += 1
            delay = self.delay()

    def delay(self) -> float:
        """Seconds until the next run: ``interval``; a loop that backs off overrides it."""
        return self.interval

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
