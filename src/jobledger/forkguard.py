"""Fork safety for a worker's main-process store (moved out of the Celery integration, which
RQ's fork-per-job worker needs as much).

SQLite keeps its file locks' bookkeeping per process: a child forked while another thread of
the parent holds a lock (a heartbeat, a sweep) inherits the bookkeeping but not the thread,
and its own writes then wait for a lock nobody will release. :class:`ForkGuardedStore` holds
:data:`FORK_LOCK` around each call, and :func:`install_fork_hooks` makes every fork take it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from jobledger.stores.base import StagedBatch, Store


class ForkGuardedStore:
    """The worker main process's store, never in use while the process forks a child."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @contextlib.contextmanager
    def staged_batch(self, **options: Any) -> Iterator[StagedBatch]:
        """The lease and its end (the batch's two transactions) hold the lock; the publishes
        between them do not, so a slow broker never holds up the heartbeat."""
        context = self._store.staged_batch(**options)
        with FORK_LOCK:
            batch = context.__enter__()
        try:
            yield batch
        except BaseException:
            with FORK_LOCK:
                if not context.__exit__(*sys.exc_info()):
                    raise
        else:
            with FORK_LOCK:
                context.__exit__(None, None, None)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target):
            return target

        def guarded(*args: Any, **kwargs: Any) -> Any:
            with FORK_LOCK:
                return target(*args, **kwargs)

        return guarded


FORK_LOCK = threading.RLock()
_fork_hooks_installed = False


def install_fork_hooks() -> None:
    """Make every fork of this process wait for :data:`FORK_LOCK` (idempotent)."""
    global _fork_hooks_installed
    if _fork_hooks_installed:
        return
    _fork_hooks_installed = True
    os.register_at_fork(before=_acquire, after_in_parent=_release, after_in_child=_release_in_child)


def _acquire() -> None:
    FORK_LOCK.acquire()


def _release() -> None:
    FORK_LOCK.release()


def _release_in_child() -> None:
    global FORK_LOCK
    try:
        FORK_LOCK.release()
    except RuntimeError:  # not held by this thread after all: start the child with a fresh one
        FORK_LOCK = threading.RLock()
