"""A small toolkit for testing code that uses jobledger, without a database or a broker.

- :class:`MemoryStore`: the whole Store seam in memory, passing the same contract suite as the
  SQL store, so what your tests prove holds against the real ledger.
- :class:`ManualClock`: a clock you move by hand, to give a ``MemoryStore`` as its database
  clock: heartbeat TTLs, lock expiry and ages pass in a line of code instead of a sleep.
- :class:`RecordingIntegration`: an Integration that keeps what it was asked to publish (or
  refuses, like a broker that is down), to test restarts and recovery without a queue system.
- With pytest, add ``pytest_plugins = ["jobledger.testing"]`` to a ``conftest.py`` for the
  ``ledger_clock``, ``ledger_store`` and ``ledger_integration`` fixtures.

:mod:`jobledger.testing.contract` holds the contract suites a store or a queue integration of
your own runs to prove it behaves as jobledger's do.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from jobledger.model import JobRecord
from jobledger.stores.memory import MemoryStore

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0) -> T:
    """Poll ``check`` until it returns something truthy, and return that; raise
    :class:`TimeoutError` naming ``what`` at the deadline. Tests wait on conditions, not sleeps."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        pause.wait(0.05)


__all__ = ["ManualClock", "MemoryStore", "RecordingIntegration"]

#: Where a :class:`ManualClock` starts unless told: a fixed, recent moment, so runs repeat.
DEFAULT_START = 1_800_000_000.0


class ManualClock:
    """Epoch seconds that change only when told: call it for the time, :meth:`advance` it.

    Time never goes backwards here unless :meth:`set` is asked to, which is how a test shows
    what a store does when a database's clock jumps.
    """

    def __init__(self, start: float = DEFAULT_START) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move ``seconds`` forward (not backward); the new time."""
        if not seconds >= 0:
            raise ValueError(f"a clock advances by zero or more seconds, not {seconds!r}")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        """Jump to ``now``, forward or back."""
        with self._lock:
            self._now = float(now)


@dataclass
class RecordingIntegration:
    """An Integration that records each published record in :attr:`published`, in order.

    Set :attr:`fail_with` (e.g. ``PublishError("broker down")``) to make :meth:`publish` raise
    it instead, as a broker that refuses would; set it back to None to let the broker recover.
    """

    system: str = "python"
    fail_with: BaseException | None = None
    published: list[JobRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def publish(self, record: JobRecord) -> None:
        with self._lock:
            if self.fail_with is not None:
                raise self.fail_with
            self.published.append(record)

    @property
    def ids(self) -> list[str]:
        """The ids published, in order (a job published twice appears twice)."""
        with self._lock:
            return [record.id for record in self.published]


if importlib.util.find_spec("pytest") is not None:
    import pytest

    @pytest.fixture
    def ledger_clock() -> ManualClock:
        """A :class:`ManualClock`, the database clock of ``ledger_store``."""
        return ManualClock()

    @pytest.fixture
    def ledger_store(ledger_clock: ManualClock) -> Iterator[MemoryStore]:
        """An empty :class:`MemoryStore` on ``ledger_clock``."""
        store = MemoryStore(clock=ledger_clock)
        yield store
        store.close()

    @pytest.fixture
    def ledger_integration() -> RecordingIntegration:
        """A :class:`RecordingIntegration` for the default ``python`` system."""
        return RecordingIntegration()
