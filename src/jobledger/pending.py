"""Lifecycle writes that could not reach the ledger, kept in memory and tried again (invariant 7).

A worker that finishes a job while the ledger is down must not block, and must not forget either:
a lost ``succeeded`` write would leave the job ``started`` under a live owner forever, where no
recovery ever looks. :class:`PendingWrites` keeps such writes in order and replays them from a
small daemon thread until the ledger answers.

Replaying keeps compare-and-set semantics: a write that reaches the ledger and finds the job moved
on (recovered, finished elsewhere) lost its race; it is dropped with a warning, never forced. The
buffer is bounded; past the bound the oldest write is dropped (logged and counted), which costs at
worst a job re-run after recovery, never a wrong state. Writes of one job keep their order: while
one is pending, later writes of the same job queue behind it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from jobledger.errors import StoreError
from jobledger.model import JobRecord
from jobledger.stores.base import ANY, Store, Transition

log = logging.getLogger(__name__)

#: How many writes a process keeps at most before dropping the oldest.
DEFAULT_LIMIT = 10_000
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
            done = store.delete(self.job_id, self.change.expect, self.change.expect_owner)
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
        if self.delete:
            return current is None
        if current is None or current.state is not self.change.to:
            return False
        owner = self.change.expect_owner
        return owner is ANY or current.owner == owner

    def describe(self) -> str:
        return "deletion on success" if self.delete else f"move to {self.change.to.value}"


class PendingWrites:
    """A bounded, ordered buffer of ledger writes that failed, replayed from a daemon thread.

    ``store`` is called for the store to write to (an integration keeps one per process).
    ``counters`` holds ``deferred``, ``applied``, ``lost`` and ``dropped``.
    """

    def __init__(
        self,
        store: Callable[[], Store],
        *,
        limit: int = DEFAULT_LIMIT,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self._store = store
        self.limit = limit
        self.interval = interval
        self.counters: Counter[str] = Counter()
        self._writes: deque[Write] = deque()
        self._jobs: Counter[str] = Counter()  # pending writes per job id
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one replay at a time keeps the order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._writes)

    def holds(self, job_id: str) -> bool:
        """True while a write of this job waits here."""
        with self._lock:
            return self._jobs[job_id] > 0

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
        """Keep ``write`` to be replayed (dropping the oldest past the bound)."""
        with self._lock:
            if len(self._writes) >= self.limit:
                dropped = self._writes.popleft()
                self._forget(dropped.job_id)
                self.counters["dropped"] += 1
                log.error(
                    "pending ledger writes over %d: dropped job %s's %s (the job may be "
                    "recovered and run again once its owner stops)",
                    self.limit,
                    dropped.job_id,
                    dropped.describe(),
                )
            self._writes.append(write)
            self._jobs[write.job_id] += 1
            self.counters["deferred"] += 1
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name="jobledger-pending", daemon=True
                )
                self._thread.start()

    def flush(self, job_id: str | None = None) -> bool:
        """Replay pending writes in order (only ``job_id``'s if given) until one meets an
        unreachable ledger. True if none is left to replay."""
        with self._flushing:
            while True:
                with self._lock:
                    head = next(
                        (w for w in self._writes if job_id is None or w.job_id == job_id), None
                    )
                if head is None:
                    return True
                try:
                    self._apply(head, retried=True)
                except StoreError:
                    return False
                except Exception:  # a bug in one write must not block the others behind it
                    log.exception(
                        "job %s: replaying %s crashed; dropped", head.job_id, head.describe()
                    )
                    self.counters["dropped"] += 1
                self._discard(head)

    def _discard(self, write: Write) -> None:
        """Remove ``write`` itself (not an equal one) if it is still here: :meth:`add` may have
        dropped it past the bound while it was being replayed."""
        with self._lock:
            for index, held in enumerate(self._writes):
                if held is write:
                    del self._writes[index]
                    self._forget(write.job_id)
                    return

    def _apply(self, write: Write, *, retried: bool) -> bool:
        applied = write.apply(self._store(), retried=retried)
        self.counters["applied" if applied else "lost"] += 1
        return applied

    def _forget(self, job_id: str) -> None:
        self._jobs[job_id] -= 1
        if self._jobs[job_id] <= 0:
            del self._jobs[job_id]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # a bug must not end the replays: log and go on
                log.exception("replaying pending ledger writes crashed")
            with self._lock:
                if not self._writes:
                    self._thread = None
                    return

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the replay thread (the writes still pending stay in memory)."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
