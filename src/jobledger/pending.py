"""Lifecycle writes that could not reach the ledger, kept and tried again (invariant 7).

A worker that finishes a job while the ledger is down must not block, and must not forget either:
a lost ``succeeded`` write would leave the job ``started`` under a live owner forever, where no
recovery ever looks. :class:`PendingWrites` keeps such writes in order in a :class:`WriteLog`
and replays them until the ledger answers: in memory (:class:`MemoryLog`, one process) or, in a
worker, in the durable journal its processes share (:mod:`jobledger.journal`), which outlives
the process that wrote it.

Replaying keeps compare-and-set semantics: a write that reaches the ledger and finds the job moved
on (recovered, finished elsewhere) lost its race; it is dropped with a warning, never forced. The
buffer is bounded; past the bound the oldest write is dropped (logged and counted), which costs at
worst a job re-run after recovery, never a wrong state. Writes of one job keep their order: while
one is pending, later writes of the same job queue behind it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from jobledger.config import DEFAULT_JOURNAL_LIMIT
from jobledger.errors import StoreError
from jobledger.model import JobRecord
from jobledger.stores.base import Store, Transition

log = logging.getLogger(__name__)

#: How many writes are kept at most before the oldest is dropped.
DEFAULT_LIMIT = DEFAULT_JOURNAL_LIMIT
#: Seconds between replays while writes are pending.
DEFAULT_INTERVAL = 1.0


class Write(Protocol):
    """One deferred ledger write of one job."""

    @property
    def job_id(self) -> str: ...

    def apply(self, store: Store, *, retried: bool = False) -> bool:
        """Try it: True if it took effect, False if it lost its race (the job moved on).
        Raises :class:`~jobledger.errors.StoreError` while the ledger is unreachable.
        ``retried``: an earlier try failed, and may have committed before its answer was lost."""

    def describe(self) -> str: ...


@dataclass(frozen=True)
class TransitionWrite:
    """A compare-and-set :class:`Transition` of one job, or (``delete``) the deletion of a job
    that matches the same expectations (``JOBLEDGER_KEEP_SUCCEEDED=0``)."""

    job_id: str
    change: Transition
    delete: bool = False

    def apply(self, store: Store, *, retried: bool = False) -> bool:
        if self.delete:
            change = self.change
            done = store.delete(
                self.job_id, change.expect, change.expect_owner, change.expect_generation
            )
        else:
            done = store.transition(self.job_id, self.change)
        if done:
            return True
        current = store.get(self.job_id)
        if retried and self._landed(current):
            return True  # an earlier try committed, only its answer was lost with the connection
        log.warning(
            "job %s: %s not applied, the ledger has it %s (owner %s): this instance lost the "
            "job to another (declared dead, recovered, finished elsewhere)",
            self.job_id,
            self.describe(),
            current.state.value if current else "missing",
            current.owner if current else None,
        )
        return False

    def _landed(self, current: JobRecord | None) -> bool:
        return current is None if self.delete else self.change.landed(current)

    def describe(self) -> str:
        return "deletion on success" if self.delete else f"move to {self.change.to.value}"


@dataclass(frozen=True)
class CreateWrite:
    """The record of a job published while the ledger was down, written once it is back.

    Without it such a job exists only as its message, and a message the broker loses (a
    restart without persistence, a prefetching worker SIGKILLed) takes the job with it, with
    nothing left to recover it from. Once the record exists the lost-message sweep covers it.
    A record already there (a claim recreated it first) is fine: create never overwrites."""

    record: JobRecord

    @property
    def job_id(self) -> str:
        return self.record.id

    def apply(self, store: Store, *, retried: bool = False) -> bool:
        store.create(self.record)
        return True

    def describe(self) -> str:
        return "record at publish"


class Entry(NamedTuple):
    """A kept write and its key in its log (its sequence number: the order of replay)."""

    key: int
    write: Write


class WriteLog(Protocol):
    """Where :class:`PendingWrites` keeps writes: ordered, bounded, shareable or not."""

    def __len__(self) -> int: ...

    def holds(self, job_id: str | None = None) -> bool:
        """True while a write of this job (of any job if None) is kept here."""

    def append(self, write: Write) -> list[Write]:
        """Keep ``write`` last; return the oldest writes dropped to stay within the bound."""

    def first(self, job_id: str | None = None) -> Entry | None:
        """The oldest kept write (of this job if given)."""

    def remove(self, key: int) -> None:
        """Forget the write kept under ``key``, if it is still kept."""

    def replaying(self) -> AbstractContextManager[object]:
        """Held around a replay, so writes of one job are applied once and in order."""


class MemoryLog:
    """A :class:`WriteLog` in this process's memory: gone with the process (tests, or no
    worker around to replay a journal)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._entries: deque[Entry] = deque()
        self._jobs: Counter[str] = Counter()  # kept writes per job id
        self._keys = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, job_id: str | None = None) -> bool:
        with self._lock:
            return bool(self._entries) if job_id is None else self._jobs[job_id] > 0

    def append(self, write: Write) -> list[Write]:
        dropped: list[Write] = []
        with self._lock:
            while len(self._entries) >= self.limit:
                oldest = self._entries.popleft()
                self._forget(oldest.write.job_id)
                dropped.append(oldest.write)
            self._entries.append(Entry(next(self._keys), write))
            self._jobs[write.job_id] += 1
        return dropped

    def first(self, job_id: str | None = None) -> Entry | None:
        with self._lock:
            return next((e for e in self._entries if job_id in (None, e.write.job_id)), None)

    def remove(self, key: int) -> None:
        with self._lock:
            for index, entry in enumerate(self._entries):
                if entry.key == key:
                    del self._entries[index]
                    self._forget(entry.write.job_id)
                    return

    def _forget(self, job_id: str) -> None:
        self._jobs[job_id] -= 1
        if self._jobs[job_id] <= 0:
            del self._jobs[job_id]

    def replaying(self) -> AbstractContextManager[object]:
        return contextlib.nullcontext()


class PendingWrites:
    """Ledger writes that failed, kept in ``log`` (default: a :class:`MemoryLog` of ``limit``
    writes) and replayed in order.

    ``store`` is called for the store to write to (an integration keeps one per process).
    ``counters`` holds ``deferred``, ``applied``, ``lost`` and ``dropped`` (this process's).
    With ``replay_on_add``, a daemon thread replays every ``interval`` from the first write
    kept until the log is empty; without, someone else calls :meth:`flush` (a worker's main
    process replays the journal its pool processes write).
    """

    def __init__(
        self,
        store: Callable[[], Store],
        *,
        log: WriteLog | None = None,
        limit: int = DEFAULT_LIMIT,
        interval: float = DEFAULT_INTERVAL,
        replay_on_add: bool = True,
    ) -> None:
        self._store = store
        self.log: WriteLog = log if log is not None else MemoryLog(limit)
        self.interval = interval
        self.replay_on_add = replay_on_add
        self.counters: Counter[str] = Counter()
        self._flushing = threading.Lock()  # one replay at a time in this process
        self._thread_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self.log)

    def holds(self, job_id: str | None = None) -> bool:
        """True while a write of this job (of any job if None) waits here."""
        return self.log.holds(job_id)

    def submit(self, write: Write) -> bool | None:
        """Apply ``write`` now, or keep it if the ledger is unreachable or an earlier write of the
        same job still waits. True: applied; False: lost its race; None: kept for later."""
        if not self.holds(write.job_id):
            try:
                return self._apply(write, retried=False)
            except StoreError as exc:
                log.warning(
                    "job %s: %s deferred, the ledger is unavailable: %s",
                    write.job_id,
                    write.describe(),
                    exc,
                )
        self.add(write)
        return None

    def add(self, write: Write) -> None:
        """Keep ``write`` to be replayed (dropping the oldest past the bound). Once this
        returns, the write is as durable as the log is."""
        for dropped in self.log.append(write):
            self.counters["dropped"] += 1
            log.error(
                "pending ledger writes over the bound: dropped job %s's %s (the job may be "
                "recovered and run again once its owner stops)",
                dropped.job_id,
                dropped.describe(),
            )
        self.counters["deferred"] += 1
        if self.replay_on_add:
            self._ensure_thread()

    def flush(self, job_id: str | None = None) -> bool:
        """Replay pending writes in order (only ``job_id``'s if given) until one meets an
        unreachable ledger. True if none is left to replay."""
        if not self.holds(job_id):
            return True  # the hot path: no lock, no replay
        with self._flushing, self.log.replaying():
            while True:
                head = self.log.first(job_id)
                if head is None:
                    return True
                try:
                    self._apply(head.write, retried=True)
                except StoreError:
                    return False
                except Exception:  # a bug in one write must not block the others behind it
                    log.exception(
                        "job %s: replaying %s crashed; dropped",
                        head.write.job_id,
                        head.write.describe(),
                    )
                    self.counters["dropped"] += 1
                self.log.remove(head.key)

    def _apply(self, write: Write, *, retried: bool) -> bool:
        applied = write.apply(self._store(), retried=retried)
        self.counters["applied" if applied else "lost"] += 1
        return applied

    def _ensure_thread(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="jobledger-pending", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # a bug must not end the replays: log and go on
                log.exception("replaying pending ledger writes crashed")
            with self._thread_lock:
                if not self.holds():
                    self._thread = None
                    return

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the replay thread (the writes still pending stay in the log)."""
        self._stop.set()
        with self._thread_lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
