"""Fork safety: the worker main process's store is never in use while the process forks.

Prefork workers (Celery's pool, RQ's work horse per job) fork from a process whose own threads
(the heartbeat, the sweep, the relay) use the ledger. SQLite keeps its file locks' bookkeeping
per process: a child forked while another thread of the parent holds a lock inherits the
bookkeeping but not the thread, and its own writes then wait for a lock nobody will release.
So every call on a :class:`ForkGuardedStore` (what :func:`guarded` makes of a store that needs
it: SQLite; the others are left as they are) holds one process-wide lock, which
``os.register_at_fork`` takes around every fork (:func:`install_fork_hooks`).

The runtime's own locks have the same hazard in Python: a child forked while another thread of
the parent holds one inherits it held, by a thread the child does not have, and its first use
there waits forever (an RQ work horse forked while the heartbeat thread looked up the store
never claimed its job). Each such lock is made with :func:`renewed_in_child`, and every forked
child starts with new ones.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from jobledger.stores.base import StagedBatch, Store

T = TypeVar("T")

_fork_lock = threading.RLock()
_hooks_installed = False
#: The locks :func:`renewed_in_child` made: their owner, attribute and how to make one.
_renewed: list[tuple[weakref.ref[object], str, Callable[[], object]]] = []


def renewed_in_child(owner: object, attribute: str, make: Callable[[], T]) -> T:
    """``make()``, to be stored as ``owner.<attribute>``, which every child forked from now on
    gets anew (see the module docstring): for a lock a forked child may take."""
    _renewed.append((weakref.ref(owner), attribute, make))
    return make()


def _renew_in_child() -> None:
    global _renewed
    alive = [(ref, attribute, make) for ref, attribute, make in _renewed if ref() is not None]
    for ref, attribute, make in alive:
        setattr(ref(), attribute, make())
    _renewed = alive


os.register_at_fork(after_in_child=_renew_in_child)


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
