"""The start/stop service under every background thread jobledger runs, and the periodic loop.

A :class:`Service` is one daemon thread: :meth:`~Service.start` is idempotent,
:meth:`~Service.stop` never waits out an interval (every wait is on an event that stop sets),
and :meth:`~Service.wake` cuts the current wait short. A :class:`Loop` runs a task after
``first_delay`` and then every ``interval`` seconds; a failure is logged (and reported through
``on_error``) and the loop carries on, since the next run may work. The heartbeat, the recovery
sweep, the relay, the journal replay, the audit and a Celery worker's consumption switch are
all services.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from jobledger.errors import JobLedgerError

log = logging.getLogger(__name__)


class Service:
    """A daemon thread named ``jobledger-<name>`` running :meth:`serve` until :meth:`stop`.

    :meth:`serve` waits with :meth:`pause` (or on :attr:`stopping`), so a stop is immediate.
    ``join_timeout`` bounds how long :meth:`stop` waits for the thread to end.
    """

    join_timeout = 10.0

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopping = threading.Event()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self.stopping.clear()
            self._thread = threading.Thread(
                target=self.serve, name=f"jobledger-{self.name}", daemon=True
            )
            self._thread.start()

    def serve(self) -> None:
        """The thread's body: return once :attr:`stopping` is set."""
        raise NotImplementedError

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if woken or stopped; True if the service is stopping."""
        self._wakeup.wait(seconds)
        self._wakeup.clear()
        return self.stopping.is_set()

    def wake(self) -> None:
        """End the current :meth:`pause` now."""
        self._wakeup.set()

    def stop(self, timeout: float | None = None) -> None:
        self.stopping.set()
        self._wakeup.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.join_timeout if timeout is None else timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class Loop(Service):
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
        super().__init__(name)
        self.interval = interval
        self.task = task
        self.first_delay = first_delay
        self.on_error = on_error
        self.runs = 0

    def serve(self) -> None:
        delay = self.first_delay
        while not self.stopping.wait(delay):
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
