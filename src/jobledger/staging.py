"""Transaction holders: what staging sees of a caller's open database transaction.

:class:`Holders` finds the holder of a transaction (a SQLAlchemy Session or Connection, a
Django ``atomic`` block) from what a caller passed as ``using=`` or from the one open in its
thread. Each framework's adapter registers itself here when loaded: the SQLAlchemy one
(:mod:`jobledger.stores.staging`) and Django's (:mod:`jobledger.contrib.django`), loaded on
first use if their framework is importable. This module imports no store and no outbox, so
the adapters and :mod:`jobledger.outbox` both depend on it and not on each other.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from jobledger.errors import StagingError
from jobledger.model import JobRecord

#: Publishes the ids staged in one transaction, once, after it committed.
Flush = Callable[[list[str]], object]


class TransactionHolder(Protocol):
    """A caller's open transaction that jobs can be staged in."""

    #: Which database the transaction writes to, as ``backend:name``, or None if unknown:
    #: checked against the ledger's, since jobs staged elsewhere would never be published.
    database: str | None

    def insert(self, record: JobRecord) -> str | None:
        """Write ``record`` (state ``staged``, times from the database clock) through the
        caller's connection, inside its transaction; None when written. The id of the
        unfinished job that holds the record's ``unique_key`` instead, with nothing written;
        :class:`StagingError` if it cannot (its id taken, no ledger tables in that database,
        a closed or failed transaction), with nothing written."""

    def after_commit(self, job_id: str, flush: Flush) -> None:
        """See that ``flush`` is called with ``job_id`` after the outermost transaction commits,
        and never if it rolls back. Several ids staged in one transaction may reach one call."""

    def ledger_id(self) -> str | None:
        """The ledger id stored in the transaction's database (see
        :data:`jobledger.stores.schema.LEDGER_ID`), or None if it has none."""


def hand_over(committed: Iterable[tuple[str, Flush]]) -> None:
    """Give the ids a transaction staged, once it committed, to their fast paths: one call per
    outbox (holders collect the pairs :meth:`TransactionHolder.after_commit` was given)."""
    by_flush: dict[Flush, list[str]] = {}
    for job_id, flush in committed:
        by_flush.setdefault(flush, []).append(job_id)
    for flush, ids in by_flush.items():
        flush(ids)


#: Turns what a caller passed as ``using=`` into a holder; None when it is not its kind.
Adapter = Callable[[object], "TransactionHolder | None"]
#: The holder of the transaction open in this thread right now, if its framework has one
#: (a Django ``atomic`` block); None when there is none.
Ambient = Callable[[], "TransactionHolder | None"]


class Holders:
    """The adapters that find a transaction holder; one per framework. :data:`holders` is the
    process's, and the SQLAlchemy and Django adapters add themselves to it when loaded."""

    #: Adapter modules loaded on first use, each only if its framework is importable.
    BUILTIN = (("sqlalchemy", "jobledger.stores.staging"), ("django", "jobledger.contrib.django"))

    def __init__(self) -> None:
        self._adapters: list[Adapter] = []
        self._ambient: list[Ambient] = []
        self._bound: contextvars.ContextVar[object | None] = contextvars.ContextVar(
            "jobledger_staging_in", default=None
        )
        self._loaded = False
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # apart from _lock: the modules loaded call register()

    def register(self, adapter: Adapter, ambient: Ambient | None = None) -> None:
        with self._lock:
            if adapter not in self._adapters:
                self._adapters.append(adapter)
            if ambient is not None and ambient not in self._ambient:
                self._ambient.append(ambient)

    @contextlib.contextmanager
    def bound(self, using: object) -> Iterator[None]:
        """Within the block, :meth:`resolve` without ``using`` stages through ``using``."""
        token = self._bound.set(using)
        try:
            yield
        finally:
            self._bound.reset(token)

    def resolve(self, using: object | None = None) -> TransactionHolder | None:
        """The holder ``using`` names; without it, the one bound by :meth:`bound` or the
        framework transaction open in this thread. None: no transaction, so the ledger's own
        connection stages (and commits at once). :class:`StagingError` for a ``using`` no
        adapter knows."""
        self._load_builtin()
        explicit = using if using is not None else self._bound.get()
        if explicit is None:
            for ambient in list(self._ambient):
                found = ambient()
                if found is not None:
                    return found
            return None
        for adapter in list(self._adapters):
            holder = adapter(explicit)
            if holder is not None:
                return holder
        raise StagingError(
            f"cannot stage a job in {type(explicit).__name__} {explicit!r}: pass a SQLAlchemy "
            "Session or Connection, or a Django database alias inside transaction.atomic "
            "(with 'jobledger.contrib.django' in INSTALLED_APPS), or leave using= out to stage "
            "through the ledger's own connection"
        )

    def _load_builtin(self) -> None:
        """Import the adapters of the frameworks this process has, once; a thread staging
        meanwhile waits for them rather than finding none."""
        if self._loaded:
            return
        with self._loading:
            if self._loaded:
                return
            for framework, module in self.BUILTIN:
                try:
                    importlib.import_module(framework)
                except ImportError:
                    continue
                importlib.import_module(module)
            self._loaded = True


#: The process's transaction-holder adapters.
holders = Holders()


def staging_in(using: object) -> contextlib.AbstractContextManager[None]:
    """Stage every job staged in this block (and thread, or task) through ``using`` (a Session,
    a Connection, a Django alias) without passing it to each call."""
    return holders.bound(using)
