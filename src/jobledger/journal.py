"""The durable local journal: what a worker owes the ledger survives the worker (invariant 7).

A job that runs while the ledger is down has its claim and its outcome deferred. Kept in memory,
they died with the process that held them, and the ledger went on showing finished jobs as
``queued``. A :class:`Journal` keeps them in a SQLite file instead (stdlib ``sqlite3``, WAL mode,
``synchronous=FULL``: a write is on disk before ``submit`` answers "deferred"), one file per
instance name in ``JOBLEDGER_JOURNAL_DIR``, shared by every process of the worker:

- entries are ordered by a sequence number and replayed in that order; replays are serialized
  across processes by an ``flock`` on a lock file of the journal's own, so the writes of one job
  are applied once each and in order, whoever replays them;
- the worker's main process holds an exclusive ``flock`` on the journal's owner file for its
  whole life (its pool processes inherit it), so "the worker that wrote this journal is gone" is
  a fact, not a timeout: any worker using the same directory replays such an orphaned journal;
- "is anything journaled?" is answered from shared memory made before the pool forks, so a job
  pays no SQLite query while the journal is empty (the hot path).

What it does not protect: the directory itself (a lost disk, a pod's ``emptyDir`` deleted with
its pod) and writes dropped past the bound (``JOBLEDGER_JOURNAL_LIMIT``, oldest first, logged
and counted: the job is then recovered and run again, never shown wrongly as done).

Entries are JSON built from ``dataclasses.fields`` (see :func:`encode`), so a field added to a
write later travels without edits here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import importlib
import json
import logging
import multiprocessing.sharedctypes
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Collection, Iterator
from datetime import datetime
from itertools import count
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jobledger.errors import ConfigError
from jobledger.pending import DEFAULT_LIMIT, Entry, PendingWrites, Write
from jobledger.stores.base import Store

log = logging.getLogger(__name__)

#: The ending of a journal's SQLite file; its owner and replay lock files add ``.owner`` and
#: ``.replay``.
SUFFIX = ".journal"
#: How long a journal statement waits for another process's transaction (seconds).
BUSY_TIMEOUT = 30.0
#: Dataclass field metadata for a process's resource (a store, a buffer), not data: such a
#: field is not journaled and comes back as None; the write binds it to the replaying store.
LOCAL = {"journal": False}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS writes (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "job_id TEXT NOT NULL, body TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS writes_job ON writes (job_id, seq)",
)


# -- the entries: JSON built from dataclass fields ---------------------------------------------
def encode(value: Any) -> Any:
    """``value`` as JSON data: jobledger's dataclasses by their fields (:data:`LOCAL` ones
    left out), enums, datetimes, sets, tuples, lists and dicts, each tagged to come back as
    itself through :func:`decode`. :class:`TypeError` for anything else."""
    if isinstance(value, enum.Enum):  # before str: a str enum is a str
        return {"enum": _class_name(type(value)), "value": value.value}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kept = (f for f in dataclasses.fields(value) if f.init and f.metadata.get("journal", True))
        return {
            "dataclass": _class_name(type(value)),
            "fields": {f.name: encode(getattr(value, f.name)) for f in kept},
        }
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, (set, frozenset)):
        return {"frozenset": [encode(v) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    raise TypeError(f"cannot journal a {type(value).__name__}: {value!r}")


def decode(data: Any) -> Any:
    """The value :func:`encode` made ``data`` from. A dataclass's fields that the data lacks
    take their defaults; its :data:`LOCAL` fields are None."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    (tag, inner), *_ = data.items()
    if tag == "enum":
        return _class(data["enum"])(data["value"])
    if tag == "dataclass":
        cls = _class(inner)
        values = {name: decode(v) for name, v in data["fields"].items()}
        local = (f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("journal", 1))
        return cls(**values, **{f.name: None for f in local})
    if tag == "datetime":
        return datetime.fromisoformat(inner)
    if tag == "frozenset":
        return frozenset(decode(v) for v in inner)
    if tag == "tuple":
        return tuple(decode(v) for v in inner)
    if tag == "dict":
        return {decode(k): decode(v) for k, v in inner}
    raise ValueError(f"unknown journal tag {tag!r}")


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _class(name: str) -> Any:
    module, _, qualname = name.partition(":")
    if module != "jobledger" and not module.startswith("jobledger."):
        raise ValueError(f"a journal entry names {name}, which is not jobledger's")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """An entry this version of jobledger cannot read back (written by another version): its
    replay fails, so it is logged, dropped and counted like any write that crashes."""

    job_id: str
    why: str

    def apply(self, store: Store, *, retried: bool = False) -> bool:
        raise ValueError(f"unreadable journal entry: {self.why}")

    def describe(self) -> str:
        return "unreadable journal entry"


# -- the journal -------------------------------------------------------------------------------
class Journal:
    """A :class:`~jobledger.pending.WriteLog` in the SQLite file ``path``, shared by processes.

    Each process opens its own connection on first use (never one inherited across a fork).
    Build a worker's own with :meth:`for_instance`, before its pool forks.
    """

    def __init__(self, path: Path | str, *, limit: int = DEFAULT_LIMIT) -> None:
        self.path = Path(path)
        self.limit = limit
        # "may hold entries": set in the transaction of every append, cleared only by a
        # transaction that found the file empty, so it is never False while entries exist.
        self._hint: Any = multiprocessing.sharedctypes.RawValue("b", 1)
        self._conn: sqlite3.Connection | None = None
        self._replay_fd: int | None = None
        self._pid = -1
        self._threads = threading.Lock()  # one replay per process; flock is per open file
        self._owner_fd: int | None = None
        _journals.add(self)
        with self._transaction() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            self._hint.value = 1 if self._count(conn) else 0

    @classmethod
    def for_instance(
        cls, directory: Path | str, name: str, *, limit: int = DEFAULT_LIMIT
    ) -> Journal:
        """The journal of instance ``name`` in ``directory``, owned by this process (and its
        forked children) until it exits. If a live worker of the same name owns that journal,
        the next free one (``name~2``, ...) is used. :class:`ConfigError` if the directory
        cannot be used."""
        folder = Path(directory)
        base = quote(name, safe="")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for n in count(1):
                path = folder / (base + ("" if n == 1 else f"~{n}") + SUFFIX)
                fd = os.open(_owner_file(path), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                journal = cls(path, limit=limit)
                journal._owner_fd = fd
                return journal
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"JOBLEDGER_JOURNAL_DIR={str(directory)!r} cannot hold the journal: {exc}"
            ) from None
        raise AssertionError("unreachable")

    def orphans(self) -> list[Path]:
        """The other journals in this one's directory whose owner process is gone."""
        found = []
        for path in sorted(self.path.parent.glob(f"*{SUFFIX}")):
            if path == self.path:
                continue
            # under the fork lock: a child forked while the owner file is open here would keep
            # our test lock on it, and the journal would look owned while that child lives
            with _fork_lock:
                try:
                    fd = os.open(_owner_file(path), os.O_RDWR)
                except FileNotFoundError:
                    continue  # not a journal a worker ever owned
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live worker owns it and replays it itself
                else:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    found.append(path)
                finally:
                    os.close(fd)
        return found

    def journaled(self, job_ids: Collection[str]) -> set[str]:
        """Of ``job_ids``, those with a write waiting in this journal or in any other journal of
        its directory, its owner alive or gone. Such a job's outcome is on its way to the ledger
        (it ran while the ledger was unreachable; a gone owner's journal is replayed by the next
        worker to look), so the recovery sweep must not put it back meanwhile: a SIGKILLed
        worker's pool processes keep its journal locked for a moment after it died, and a job
        that ran to success then ran again. Read-only: the other journals are not touched."""
        wanted = list(job_ids)
        if not wanted:
            return set()
        marks = ",".join("?" * len(wanted))
        query = f"SELECT DISTINCT job_id FROM writes WHERE job_id IN ({marks})"
        found = {row[0] for row in self._read(query, wanted)} if self._hint.value else set()
        for path in sorted(self.path.parent.glob(f"*{SUFFIX}")):
            if path == self.path:
                continue
            try:
                with _fork_lock:  # the sweep's thread must not be in SQLite when a child forks
                    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
                    try:
                        found.update(row[0] for row in conn.execute(query, wanted))
                    finally:
                        conn.close()
            except sqlite3.Error as exc:  # not a journal, or being created: nothing to read
                log.debug("journal %s not read: %s", path, exc)
        return found

    def _read(self, query: str, params: list[str]) -> list[tuple[str]]:
        with self._reading() as conn:
            return list(conn.execute(query, params))

    # -- the WriteLog protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        with self._reading() as conn:
            return self._count(conn)

    def holds(self, job_id: str | None = None) -> bool:
        if not self._hint.value:
            return False  # no SQLite query while nothing is journaled
        if job_id is not None:
            with self._reading() as conn:
                query = "SELECT 1 FROM writes WHERE job_id = ? LIMIT 1"
                return conn.execute(query, (job_id,)).fetchone() is not None
        with self._transaction() as conn:  # write-locked: no append between count and clear
            if self._count(conn):
                return True
            self._hint.value = 0
            return False

    def append(self, write: Write) -> list[Write]:
        body = json.dumps(encode(write))
        with self._transaction() as conn:
            excess = self._count(conn) + 1 - self.limit
            dropped = []
            if excess > 0:
                oldest = "SELECT seq, job_id, body FROM writes ORDER BY seq LIMIT ?"
                rows = conn.execute(oldest, (excess,)).fetchall()
                conn.execute("DELETE FROM writes WHERE seq <= ?", (rows[-1][0],))
                dropped = [_journaled(job_id, text) for _, job_id, text in rows]
            conn.execute("INSERT INTO writes (job_id, body) VALUES (?, ?)", (write.job_id, body))
            self._hint.value = 1  # before the commit: never False while the entry exists
        return dropped

    def first(self, job_id: str | None = None) -> Entry | None:
        with self._reading() as conn:
            if job_id is None:
                rows = conn.execute("SELECT seq, job_id, body FROM writes ORDER BY seq LIMIT 1")
            else:
                query = "SELECT seq, job_id, body FROM writes WHERE job_id = ? ORDER BY seq LIMIT 1"
                rows = conn.execute(query, (job_id,))
            found = rows.fetchone()
        if found is None:
            if job_id is None:
                self.holds()  # clears the hint if the journal is still empty
            return None
        return Entry(found[0], _journaled(found[1], found[2]))

    def remove(self, key: int) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM writes WHERE seq = ?", (key,))

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """This process's thread lock, then the journal's replay ``flock`` (blocking)."""
        with self._threads:
            with _fork_lock:
                self._connection()  # opens this process's replay lock file too
            assert self._replay_fd is not None
            fcntl.flock(self._replay_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._replay_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close this process's connection and files (and give up ownership, if held)."""
        with _fork_lock:
            if self._pid == os.getpid() and self._conn is not None:
                self._conn.close()
                if self._replay_fd is not None:
                    os.close(self._replay_fd)
            self._conn, self._replay_fd, self._pid = None, None, -1
            if self._owner_fd is not None:
                os.close(self._owner_fd)
                self._owner_fd = None

    # -- connections ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One immediate (write-locked) transaction, committed on success; the fork lock is
        held meanwhile, so no pool process is forked while this process holds a SQLite lock."""
        with _fork_lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """This process's connection for one statement (its own implicit transaction)."""
        with _fork_lock:
            yield self._connection()

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid() or self._conn is None:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # durable before "deferred" is answered
            self._replay_fd = os.open(_replay_file(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @staticmethod
    def _count(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM writes").fetchone()[0])


def _journaled(job_id: str, body: str) -> Write:
    try:
        write = decode(json.loads(body))
    except Exception as exc:  # another version's entry: replayed as a failure, then dropped
        return Unreadable(job_id, f"{type(exc).__name__}: {exc}")
    return write  # type: ignore[no-any-return]


def _owner_file(path: Path) -> Path:
    return path.with_name(path.name + ".owner")


def _replay_file(path: Path) -> Path:
    return path.with_name(path.name + ".replay")


def replay_orphans(journal: Journal, store: Callable[[], Store]) -> int:
    """Replay the journals of ``journal``'s directory whose owner is gone; the writes still
    left (the ledger went away again), or how many of them."""
    left = 0
    for path in journal.orphans():
        orphan = Journal(path, limit=journal.limit)
        try:
            pending = PendingWrites(store, log=orphan, replay_on_add=False)
            if orphan.holds():
                log.warning("replaying %d ledger writes left in %s", len(orphan), path)
                pending.flush()
                left += len(orphan)
        finally:
            orphan.close()
    return left


# -- fork safety -------------------------------------------------------------------------------
#: Held around every SQLite call of this module and taken around every fork: SQLite keeps its
#: file locks' bookkeeping and its own mutexes per process, and a child forked while another
#: thread is inside SQLite (a lock held, or a connection being opened) would wait forever for
#: what that thread held. (The sweep's read of the other journals once ran unguarded: an RQ
#: work horse forked during it never claimed its job.)
_fork_lock = threading.RLock()
_journals: weakref.WeakSet[Journal] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child keeps its parent's connections and lock files open, unused (closing them
    would drop the parent's SQLite locks), and opens its own on first use."""
    global _fork_lock
    _fork_lock = threading.RLock()
    for journal in list(_journals):
        if journal._conn is not None:
            _inherited.append(journal._conn)
        journal._conn, journal._pid = None, -1
        if journal._replay_fd is not None:
            os.close(journal._replay_fd)  # a copy: the parent's lock stays the parent's
            journal._replay_fd = None
        journal._threads = threading.Lock()


_inherited: list[sqlite3.Connection] = []
os.register_at_fork(
    before=lambda: _fork_lock.acquire(),
    after_in_parent=lambda: _fork_lock.release(),
    after_in_child=_after_fork_in_child,
)
