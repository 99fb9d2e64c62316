"""Staging through a caller's SQLAlchemy transaction: the outbox's SQLAlchemy adapter.

``using=`` may be a :class:`~sqlalchemy.orm.Session` or a :class:`~sqlalchemy.Connection`; the
job row is inserted through that connection, inside the caller's transaction. SQLAlchemy has
no "after commit" hook on a Connection (its ``commit`` event fires *before* the COMMIT), so the
ids staged on a connection wait in its ``info`` until the commit is done: the connection's next
``begin`` or its return to the pool, whichever comes first, hands them to the fast path (from
outside any transaction of the caller's, so it never waits on the caller's own locks). A
Session commits through the same connection events, so one mechanism serves both, and a
Session joined to an outer Connection's transaction publishes when the outer one commits. A
rollback forgets them; a savepoint rollback needs no care, since the fast path reads the rows
back and a rolled-back one is not there.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from sqlalchemy import Connection, Engine, event, insert, inspect
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert

from jobledger.errors import StagingError
from jobledger.model import JobRecord
from jobledger.staging import Flush, TransactionHolder, hand_over, holders
from jobledger.stores.rows import creation_row
from jobledger.stores.schema import db_now, jobs, key_holder, ledger_id_select
from jobledger.stores.sql import database_identity

#: Keys in ``Connection.info`` (kept per DBAPI connection): ids staged in the open transaction,
#: and ids committed but not yet handed to the fast path.
_STAGED = "jobledger.staged"
_COMMITTED = "jobledger.committed"

_watched: weakref.WeakSet[Engine] = weakref.WeakSet()
_has_tables: weakref.WeakSet[Engine] = weakref.WeakSet()
_begun: weakref.WeakSet[Connection] = weakref.WeakSet()
_ledger_ids: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
_watch_lock = threading.Lock()


def staged_insert(record: JobRecord, dialect: str) -> Insert:
    """The INSERT that stages ``record``, times from the database clock (also what the Django
    adapter runs, compiled for its connection). On PostgreSQL a job id that exists already, or
    a unique key another unfinished job holds, inserts and returns no row (``ON CONFLICT DO
    NOTHING``): a failed statement would abort the caller's whole transaction, and a later
    COMMIT would quietly roll back its data. MySQL and SQLite undo only the failed statement,
    so a plain INSERT's IntegrityError says the same there; :func:`refusal` then tells which
    (from :func:`~jobledger.stores.schema.key_holder`, read in the caller's transaction: a
    job it staged itself holds its key there too)."""
    row = creation_row(record, db_now())
    if dialect == "postgresql":  # RETURNING: the driver's rowcount of DO NOTHING is unreliable
        statement = postgresql.insert(jobs).values(**row)
        return statement.on_conflict_do_nothing().returning(jobs.c.id)
    return insert(jobs).values(**row)


def refusal(record: JobRecord, holder: object) -> str:
    """After ``record``'s staging inserted nothing: the id of the job that holds its unique key
    (``holder``, what :func:`~jobledger.stores.schema.key_holder` found), which the caller gets
    back instead; else its id was taken, and :class:`StagingError` says so."""
    if holder is not None and str(holder) != record.id:
        return str(holder)
    raise StagingError(f"job {record.id} exists already; staging needs a new job id")


class ConnectionHolder:
    """The transaction of a SQLAlchemy Connection (a Session's, or the caller's own)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.database: str | None = database_identity(conn.engine.url)

    def _check(self) -> None:
        """Before any statement of ours: on PostgreSQL a failing one would abort the caller's
        transaction."""
        if self.conn.closed or self.conn.invalidated:
            raise StagingError("cannot stage a job on a closed SQLAlchemy connection")
        engine = self.conn.engine
        if engine not in _has_tables:
            if not inspect(self.conn).has_table(jobs.name):
                raise StagingError(
                    f"the ledger tables are not in {engine.url.render_as_string()}: run "
                    "`jobledger migrate` against the database your transaction writes to"
                )
            _has_tables.add(engine)

    def insert(self, record: JobRecord) -> str | None:
        self._check()
        dialect = self.conn.dialect.name
        try:
            result = self.conn.execute(staged_insert(record, dialect))
            if dialect != "postgresql" or result.first() is not None:
                return None
        except sa_exc.IntegrityError:
            pass  # MySQL, SQLite: only the statement failed, not the transaction
        except sa_exc.SQLAlchemyError as exc:
            raise StagingError(f"staging job {record.id} failed: {exc}") from exc
        held = None if record.unique_key is None else key_holder(record.unique_key)
        return refusal(record, None if held is None else self.conn.execute(held).scalar())

    def ledger_id(self) -> str | None:
        self._check()
        engine = self.conn.engine
        found = _ledger_ids.get(engine)
        if found is None:
            found = self.conn.execute(ledger_id_select()).scalar()
            if found is not None:
                _ledger_ids[engine] = found
        return found

    def after_commit(self, job_id: str, flush: Flush) -> None:
        _watch(self.conn.engine)
        if self.conn not in _begun:
            # On the connection, and first: an engine-level listener runs after the caller's
            # own, and one of those (SQLite's BEGIN IMMEDIATE recipe) takes the write lock the
            # fast path would then wait on.
            event.listen(self.conn, "begin", _on_begin, insert=True)
            _begun.add(self.conn)
        self.conn.info.setdefault(_STAGED, []).append((job_id, flush))


def adapt(using: object) -> TransactionHolder | None:
    """A holder for a Session or a Connection; None for anything else."""
    if isinstance(using, Session):
        try:
            return ConnectionHolder(using.connection())
        except sa_exc.SQLAlchemyError as exc:
            raise StagingError(f"the Session has no usable transaction: {exc}") from None
    if isinstance(using, Connection):
        return ConnectionHolder(using)
    if isinstance(using, Engine):
        raise StagingError(
            "an Engine holds no transaction: pass the Session or Connection whose transaction "
            "the job commits with, or leave using= out to stage through the ledger's own"
        )
    return None


def _watch(engine: Engine) -> None:
    """Listen once per engine for the commits, rollbacks and returns of its connections."""
    if engine in _watched:
        return
    with _watch_lock:
        if engine in _watched:
            return
        event.listen(engine, "commit", _on_commit)
        event.listen(engine, "rollback", _on_rollback)
        event.listen(engine.pool, "checkin", _on_checkin)
        _watched.add(engine)


def _on_commit(conn: Connection) -> None:
    staged = conn.info.pop(_STAGED, None)
    if staged:
        conn.info.setdefault(_COMMITTED, []).extend(staged)


def _on_rollback(conn: Connection) -> None:
    conn.info.pop(_STAGED, None)


def _on_begin(conn: Connection) -> None:
    _hand_over(conn.info)


def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
    _hand_over(record.info)


def _hand_over(info: dict[str, Any]) -> None:
    """Give the committed ids to their fast paths, one call per outbox."""
    committed = info.pop(_COMMITTED, None)
    if committed:
        hand_over(committed)


holders.register(adapt)
