"""Fork safety: the worker main process's store is never in use while the process forks.

Prefork workers (Celery's pool, RQ's work horse per job) fork from a process whose own threads
(the heartbeat, the sweep, the relay) use the ledger. SQLite keeps its file locks' bookkeeping
per process: a child forked while another thread of the parent holds a lock inherits the
bookkeeping but not the thread, and its own writes then wait for a lock nobody will release.
So every call on a :class:`ForkGuardedStore` (what :func:`guarded` makes of a store that needs
it: SQLite; the others are left as they are) holds one process-wide lock, which
``os.register_at_fork`` takes around every fork (:func:`install_fork_hooks`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, cast

from jobledger.stores.base import StagedBatch, Store

_fork_lock = threading.RLock()
_hooks_installed = False


def install_fork_hooks() -> None:
    """Hold the fork lock around every fork of this process from now on (idempotent)."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    os.register_at_fork(
        before=lambda: _fork_lock.acquire(),
        after_in_parent=lambda: _fork_lock.release(),
        after_in_child=_release_in_child,
    )


def _release_in_child() -> None:
    global _fork_lock
    try:
        _fork_lock.release()
    except RuntimeError:  # not held by this thread after all: start the child with a fresh one
        _fork_lock = threading.RLock()


def guarded(store: Store) -> Store:
    """``store``, each of whose calls holds the fork lock (see the module docstring), if it
    needs that (:attr:`~jobledger.stores.base.Store.serialize_across_fork`: SQLite); else
    ``store`` itself, so the other stores' calls take no lock."""
    if not getattr(store, "serialize_across_fork", True):
        return store
    return cast(Store, ForkGuardedStore(store))


class ForkGuardedStore:
    """A store whose every call holds the fork lock; made with :func:`guarded`."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @contextlib.contextmanager
    def staged_batch(self, **options: Any) -> Iterator[StagedBatch]:
        """The lease and its end (the batch's two transactions) hold the lock; the publishes
        between them do not, so a slow broker never holds up the heartbeat."""
        context = self._store.staged_batch(**options)
        with _fork_lock:
            batch = context.__enter__()
        try:
            yield batch
        except BaseException:
            with _fork_lock:
                if not context.__exit__(*sys.exc_info()):
                    raise
        else:
            with _fork_lock:
                context.__exit__(None, None, None)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            with _fork_lock:
                return target(*args, **kwargs)

        return call
