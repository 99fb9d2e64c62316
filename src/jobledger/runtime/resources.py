"""A worker's ledger resources, one set per process: a forked child must not share its parent's.

A prefork worker's children (Celery's pool processes, RQ's work horses) inherit the parent's
objects but must not use its database connections, so each resource is built lazily for the
process that asks, keyed by pid. Once the main process becomes a worker
(:meth:`ProcessResources.become_worker`), its store is fork-guarded and every process's pending
writes go to the worker's journal, which the main process replays.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

from jobledger.integrations.base import PublishBatch
from jobledger.journal import Journal
from jobledger.outbox import Outbox
from jobledger.pending import PendingWrites
from jobledger.runtime import forksafe
from jobledger.stores.base import Store

T = TypeVar("T")


class ProcessResources:
    """This process's store, pending writes and outbox, made by ``factory`` on first use.

    ``store``, when given, serves the process that made this object only (a test's store, or a
    client's); every other process opens its own through ``factory``.
    """

    def __init__(
        self, factory: Callable[[], Store], publish_many: PublishBatch, store: Store | None = None
    ) -> None:
        self.factory = factory
        self.publish_many = publish_many
        #: The worker's journal, opened by its main process before the pool forks.
        self.journal: Journal | None = None
        self._stores: dict[int, Store] = {} if store is None else {os.getpid(): store}
        self._pending: dict[int, PendingWrites] = {}
        self._outboxes: dict[int, Outbox] = {}
        # RLock: a resource made under it may need the store
        self._lock = forksafe.renewed_in_child(self, "_lock", threading.RLock)

    @property
    def store(self) -> Store:
        return self._own(self._stores, self.factory)

    @property
    def pending(self) -> PendingWrites:
        """This process's ledger writes waiting for the ledger (invariant 7): in a worker, in
        the journal all its processes share, replayed by the main process; in any other
        process, in memory, replayed by a thread of its own."""
        return self._own(
            self._pending,
            lambda: PendingWrites(
                lambda: self.store, log=self.journal, replay_on_add=self.journal is None
            ),
        )

    @property
    def outbox(self) -> Outbox:
        """This process's outbox: stages jobs and publishes them right after the commit."""
        return self._own(self._outboxes, lambda: Outbox(self.store, publish=self.publish_many))

    def _own(self, made: dict[int, T], make: Callable[[], T]) -> T:
        """This process's entry of ``made``, made on first use (once, under the lock)."""
        pid = os.getpid()
        with self._lock:
            found = made.get(pid)
            if found is None:
                found = made[pid] = make()
            return found

    def become_worker(self, journal: Journal) -> None:
        """This process is a worker's main process from now on: its store is never used while
        it forks, and every process's pending writes go to ``journal``."""
        forksafe.install_fork_hooks()
        with self._lock:
            pid = os.getpid()
            self._stores[pid] = forksafe.guarded(self._stores.get(pid) or self.factory())
            self._pending.pop(pid, None)
            self.journal = journal

    def own_store(self) -> Store:
        """A store of its own for a loop whose work must not hold up the heartbeat (the
        relay's batches), fork-guarded where the store needs it (SQLite)."""
        return forksafe.guarded(self.factory())

    def close(self) -> None:
        """Stop replaying pending writes and close this object's stores and journal."""
        with self._lock:
            pendings, self._pending = list(self._pending.values()), {}
            stores, self._stores = list(self._stores.values()), {}
        for pending in pendings:
            pending.stop()
        for store in stores:
            store.close()
        if self.journal is not None:
            self.journal.close()
