"""The SQL store: one code path for SQLite, PostgreSQL (psycopg 3) and MariaDB/MySQL (PyMySQL).

Every job transition is a single ``UPDATE … WHERE id = ? AND state IN (…) [AND owner = ?]``
whose row count says who won, so concurrent writers from any number of threads and processes
never both win. Every time comes from :class:`~jobledger.stores.schema.db_now`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from dataclasses import replace
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Double,
    Engine,
    Row,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    make_url,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import URL, CursorResult, Dialect
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql.dml import Insert, Update

from jobledger.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT
from jobledger.errors import (
    ConfigError,
    SchemaMissing,
    StoreError,
    StoreUnavailable,
    UniqueKeyHeld,
)
from jobledger.model import DurationStats, Instance, JobRecord, JobState, QueueStats, nearest_rank
from jobledger.query import (
    Cursor,
    JobQuery,
    Page,
    check_page_size,
    finished_query,
    match_needles,
    page_of,
    prunable_states,
)
from jobledger.stores.base import (
    ANY,
    DEFAULT_LEASE,
    LEASE_PREFIX,
    DurationKind,
    LeasedBatch,
    StagedBatch,
    Store,
    Transition,
    _Sentinel,
)
from jobledger.stores.rows import (
    HISTORY_INPUTS,
    SEARCH_FIELDS,
    UNIQUE_HOLD,
    creation_row,
    duration_start,
    history_after,
    history_event,
    instance_beat_values,
    instance_from_row,
    record_from_row,
    transition_values,
)
from jobledger.stores.schema import (
    LEDGER_ID,
    LEDGER_ID_EXPIRES,
    SCHEMA_REVISION,
    VERSION_TABLE,
    db_now,
    instances,
    job_search,
    jobs,
    key_holder,
    ledger_id_select,
    locks,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Which extra brings the driver for a URL's dialect, for the error a person sees without it.
_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}
#: The driver jobledger picks when a URL names only the database (``postgresql://…``).
_DEFAULT_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}

#: SQLite's busy timeout while migrating (seconds): other writers may hold the lock a while.
_SQLITE_MIGRATE_BUSY = 30.0

#: How often a create with a unique key inserts again when the key's holder ended between
#: the refused insert and the read of who holds it.
_KEY_TRIES = 5

#: How often a move that appends history reads again when another move changed the job
#: between its read and its write.
_HISTORY_TRIES = 5

#: Errors worth one more try: deadlocks and serialization failures (PostgreSQL, MySQL).
_TRANSIENT_CODES = {"40P01", "40001", 1213, 1205}
#: MySQL/MariaDB's duplicate key: a create whose job exists.
_DUPLICATE_KEY = 1062


def parse_url(url: str | URL) -> URL:
    """A SQLAlchemy URL with jobledger's default driver filled in (``postgres://``, the
    spelling of Heroku, libpq and many hosts, read as ``postgresql://``); :class:`ConfigError`
    if the text is not a database URL."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):
        raise ConfigError(
            f"malformed database URL {str(url)!r}: expected e.g. sqlite:///jobledger.db or "
            "postgresql://user@host/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
        parsed = parsed.set(drivername=parsed.drivername.replace("postgres", backend, 1))
    if "+" not in parsed.drivername and backend in _DEFAULT_DRIVERS:
        parsed = parsed.set(drivername=f"{backend}+{_DEFAULT_DRIVERS[backend]}")
    if backend in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed


def database_identity(url: URL) -> str:
    """``backend:database`` (a SQLite file by its absolute path): enough to tell that a
    caller's transaction and the ledger are not in the same database, which would leave staged
    jobs where no relay looks (host spellings vary too much to compare)."""
    backend = url.get_backend_name()
    backend = "mysql" if backend == "mariadb" else backend  # one server family, two spellings
    name = url.database or ""
    if backend == "sqlite" and name not in ("", ":memory:"):
        name = os.path.abspath(name)
    return f"{backend}:{name}"


class SQLStore(Store):
    """The ledger in a SQL database reached through SQLAlchemy Core.

    ``auto_migrate`` applies the shipped migrations on first use instead of refusing with
    :class:`SchemaMissing`. ``connect_timeout`` (seconds) bounds how long a connection attempt to
    a database server may take, ``statement_timeout`` how long one statement may run or wait for
    a lock (past it the call raises :class:`StoreUnavailable`, as for an outage).
    ``engine_options`` go to :func:`sqlalchemy.create_engine`.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        auto_migrate: bool = False,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
        engine_options: Mapping[str, Any] | None = None,
        synchronous_publish: bool = True,
    ) -> None:
        self.url = parse_url(url)
        self.auto_migrate = auto_migrate
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self.synchronous_publish = synchronous_publish
        self._engine_options = dict(engine_options or {})
        self._schema_checked = False
        self._schema_lock = threading.Lock()
        self._ledger_id: str | None = None
        self.engine = self._create_engine(statement_timeout)
        self.dialect = self.engine.dialect.name
        self._hot = self._create_hot_engine()
        self._statements: dict[Hashable, _Prepared] = {}

    def __repr__(self) -> str:
        return f"SQLStore({self.safe_url!r})"

    @property
    def database(self) -> str:
        """Which database the ledger is in (see :func:`database_identity`)."""
        return database_identity(self.url)

    @property
    def serialize_across_fork(self) -> bool:
        """SQLite only (see :attr:`Store.serialize_across_fork`)."""
        return self.dialect == "sqlite"

    @property
    def safe_url(self) -> str:
        """The URL with its password hidden, for messages and logs."""
        return self.url.render_as_string(hide_password=True)

    # -- connections -----------------------------------------------------------------------
    def _create_hot_engine(self) -> Engine:
        """The engine of the per-job writes and reads: autocommit (a single statement is its own
        transaction, no BEGIN or COMMIT round trip), no pre-ping (:meth:`_on_hot` replaces a
        dropped connection and tries once more) and no reset on return (nothing is open)."""
        if self.dialect == "sqlite" and self.url.database in (None, "", ":memory:"):
            return self.engine.execution_options(isolation_level="AUTOCOMMIT")  # one database
        options: dict[str, Any] = {"pool_pre_ping": False, "pool_reset_on_return": None}
        if not self._hot_in_transaction:
            options["isolation_level"] = "AUTOCOMMIT"
        return self._create_engine(self.statement_timeout, **options)

    @property
    def _hot_in_transaction(self) -> bool:
        """MySQL/MariaDB keep each hot statement in a transaction of its own (the statement and
        a COMMIT): their statement timeout is the client's, which leaves a statement running
        on the server, and an autocommit one would still commit after the caller was told it
        failed; a transaction the client dropped is rolled back."""
        return self.dialect in ("mysql", "mariadb")

    def _create_engine(self, statement_timeout: float | None, **overrides: Any) -> Engine:
        """An engine whose every connection has the connect timeout and, unless None (for
        migrations), the statement timeout: a ledger host that answers slowly or not at all
        must not hold a publish or a worker for minutes (invariant 7)."""
        options = {**self._engine_options, **overrides}
        connect_args: dict[str, Any] = dict(options.get("connect_args", {}))
        options["connect_args"] = connect_args
        options.setdefault("pool_pre_ping", True)
        backend = self.url.get_backend_name()
        if backend == "sqlite":
            if self.url.database in (None, "", ":memory:"):
                options.setdefault("poolclass", StaticPool)
                connect_args.setdefault("check_same_thread", False)
            # How long a write waits for another's lock (SQLite has no other slow statement).
            busy = statement_timeout if statement_timeout is not None else _SQLITE_MIGRATE_BUSY
            connect_args.setdefault("timeout", busy)
        else:
            connect_args.setdefault("connect_timeout", max(1, round(self.connect_timeout)))
            if backend in ("mysql", "mariadb"):
                # Sessions in UTC, so any time the server shows (logs, NOW()) matches db_now.
                connect_args.setdefault("init_command", "SET time_zone = '+00:00'")
                if statement_timeout is not None:  # PyMySQL gives up on a silent socket
                    connect_args.setdefault("read_timeout", statement_timeout)
                    connect_args.setdefault("write_timeout", statement_timeout)
            elif backend == "postgresql" and statement_timeout is not None:
                setting = f"-c statement_timeout={max(1, round(statement_timeout * 1000))}"
                given = connect_args.get("options", self.url.query.get("options"))
                connect_args["options"] = f"{given} {setting}" if given else setting
        try:
            engine = create_engine(self.url, **options)
        except (sa_exc.NoSuchModuleError, ModuleNotFoundError, ImportError) as exc:
            extra = _EXTRAS.get(backend)
            hint = f"; install it with: pip install 'jobledger[{extra}]'" if extra else ""
            raise ConfigError(f"no driver for database URL {self.safe_url}: {exc}{hint}") from None
        except (sa_exc.ArgumentError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad database URL {self.safe_url}: {exc}") from None
        if backend == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    @contextlib.contextmanager
    def _migration_engine(self) -> Iterator[Engine]:
        """An engine without the statement timeout, for migrations (building an index on a
        large ledger may take minutes); an in-memory SQLite database exists only in its own."""
        if self.dialect == "sqlite" and self.url.database in (None, "", ":memory:"):
            yield self.engine
            return
        engine = self._create_engine(None)
        try:
            yield engine
        finally:
            engine.dispose()

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        """Turn driver errors into jobledger's: unreachable → :class:`StoreUnavailable`."""
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            if _is_missing_table(exc):
                raise self._missing_schema() from None
            if _sqlstate(exc) in _TRANSIENT_CODES:
                raise StoreError(
                    f"ledger write on {self.safe_url} kept conflicting (deadlock or lock "
                    f"timeout): {_first_line(exc)}"
                ) from exc
            raise StoreUnavailable(
                f"the ledger database at {self.safe_url} is unavailable: {_first_line(exc)}"
            ) from exc
        except sa_exc.ProgrammingError as exc:
            if _is_missing_table(exc):
                raise self._missing_schema() from None
            raise StoreError(f"ledger query failed on {self.safe_url}: {_first_line(exc)}") from exc
        except sa_exc.DBAPIError as exc:
            raise StoreError(f"ledger query failed on {self.safe_url}: {_first_line(exc)}") from exc
        except sa_exc.TimeoutError as exc:  # every pooled connection busy: the ledger is slow
            raise StoreUnavailable(
                f"no free connection to the ledger at {self.safe_url}: {_first_line(exc)}"
            ) from exc
        except sa_exc.SQLAlchemyError as exc:
            raise StoreError(f"ledger call failed on {self.safe_url}: {_first_line(exc)}") from exc

    def _missing_schema(self) -> SchemaMissing:
        self._schema_checked = False
        return SchemaMissing(
            f"the ledger tables are missing in {self.safe_url}; run `jobledger migrate` "
            "(or set JOBLEDGER_AUTO_MIGRATE=true)"
        )

    def _ready(self) -> None:
        if self._schema_checked:
            return
        with self._schema_lock:
            if self._schema_checked:
                return
            if self.auto_migrate:
                self.migrate()
            else:
                self._check_schema()
            self._schema_checked = True

    def _check_schema(self) -> None:
        with self._translate(), self.engine.connect() as conn:
            try:
                with conn.begin_nested() if conn.in_transaction() else contextlib.nullcontext():
                    found = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
            except (sa_exc.ProgrammingError, sa_exc.OperationalError) as exc:
                if _is_missing_table(exc):
                    raise self._missing_schema() from None
                raise
        if found is None:
            raise self._missing_schema()
        if found != SCHEMA_REVISION:
            raise SchemaMissing(
                f"the ledger schema in {self.safe_url} is at revision {found}, this jobledger "
                f"needs {SCHEMA_REVISION}: run `jobledger migrate` (or upgrade jobledger if the "
                "database is newer)"
            )

    @contextlib.contextmanager
    def _write(self, isolation_level: str | None = None) -> Iterator[Connection]:
        """A connection in a transaction that commits on success (see :meth:`_retrying`)."""
        self._ready()
        with self._translate(), self.engine.connect() as conn:
            if isolation_level is not None:
                conn.execution_options(isolation_level=isolation_level)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        self._ready()
        with self._translate(), self.engine.connect() as conn:
            yield conn

    def _retrying(self, operation: Any, *args: Any, isolation_level: str | None = None) -> Any:
        """Run a one-transaction write, up to three times while the database breaks deadlocks
        or lock waits with it (compare-and-set writes are safe to repeat)."""
        for attempt in range(3):
            try:
                with self._write(isolation_level) as conn:
                    return operation(conn, *args)
            except StoreError as exc:
                if attempt == 2 or _sqlstate(exc.__cause__) not in _TRANSIENT_CODES:
                    raise
        raise AssertionError("unreachable")

    def _on_hot(self, work: Callable[[Connection], T]) -> tuple[T, bool]:
        """``work`` on an autocommit connection, and whether its answer may have been lost: a
        connection found dropped is replaced and ``work`` runs once more (a pooled connection
        is not pinged before use), and a deadlock is tried again up to three times, as in
        :meth:`_retrying`. After a drop the first try may have committed, so the caller checks
        a lost compare-and-set against what it would have left (:meth:`Transition.landed`)."""
        self._ready()
        uncertain = False
        with self._translate():
            for attempt in range(3):
                try:
                    with self._hot.connect() as conn:
                        if not self._hot_in_transaction:
                            return work(conn), uncertain
                        with conn.begin():
                            return work(conn), uncertain
                except sa_exc.DBAPIError as exc:
                    dropped = exc.connection_invalidated and not uncertain
                    if attempt == 2 or not (dropped or _sqlstate(exc) in _TRANSIENT_CODES):
                        raise
                    uncertain = uncertain or dropped
        raise AssertionError("unreachable")

    def _prepared(self, key: Hashable, build: Callable[[], Any]) -> _Prepared:
        """The statement of ``key``, compiled on first use for this store's dialect."""
        found = self._statements.get(key)
        if found is None:
            found = self._statements[key] = _Prepared(build(), self._hot.dialect)
        return found

    # -- schema ----------------------------------------------------------------------------
    def migrate(self) -> None:
        """Create or upgrade the ledger tables (idempotent). See :meth:`migrate_report`."""
        self.migrate_report()

    def migrate_report(self) -> str:
        """Migrate, and say how argument search is served (trigram index or a scan)."""
        from alembic.util.exc import CommandError

        from jobledger.stores import migrations  # Alembic: only needed here, slow to import

        try:
            with self._translate(), self._migration_engine() as engine, engine.begin() as conn:
                report = migrations.upgrade(conn)
        except CommandError as exc:  # e.g. a database migrated by a newer jobledger
            raise SchemaMissing(
                f"cannot migrate the ledger in {self.safe_url}: {exc}; if a newer jobledger "
                "migrated it, upgrade jobledger"
            ) from None
        self._schema_checked = True
        self.ledger_id()
        return report

    def ledger_id(self) -> str:
        """This ledger's id (see :data:`~jobledger.stores.schema.LEDGER_ID`), written on first
        use if ``migrate`` did not."""
        if self._ledger_id is None:
            with self._read() as conn:
                found = conn.execute(ledger_id_select()).scalar()
            if found is None:
                try:
                    with self._write() as conn:
                        conn.execute(
                            insert(locks).values(
                                name=LEDGER_ID,
                                token=secrets.token_hex(16),
                                expires_at=LEDGER_ID_EXPIRES,
                            )
                        )
                except StoreError as exc:
                    if not isinstance(exc.__cause__, sa_exc.IntegrityError):
                        raise  # else another process wrote it first
                with self._read() as conn:
                    found = conn.execute(ledger_id_select()).scalar_one()
            self._ledger_id = str(found)
        return self._ledger_id

    def close(self) -> None:
        self._hot.dispose()
        self.engine.dispose()

    def now(self) -> float:
        with self._read() as conn:
            return float(conn.execute(select(db_now())).scalar_one())

    # -- jobs ------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> bool:
        """One autocommit ``INSERT … ON CONFLICT DO NOTHING`` (MySQL/MariaDB: a plain INSERT
        whose duplicate-key error is the answer). A queued record with ``synchronous_publish``
        off commits without waiting for PostgreSQL's WAL flush (see
        :attr:`~jobledger.config.Settings.synchronous_publish`). A record that holds a unique
        key and was not inserted reads who holds the key (the unique index decided: exactly
        one of concurrent creates wins); a holder that ended meanwhile means: insert again."""
        row = creation_row(record, _NOW)
        stamped = tuple(name for name, value in row.items() if value is _NOW)
        relaxed = (
            not self.synchronous_publish
            and self.dialect == "postgresql"
            and record.state is JobState.QUEUED
        )
        prepared = self._prepared(
            ("create", stamped, relaxed), lambda: _insert_statement(self.dialect, row, relaxed)
        )
        params = {name: value for name, value in row.items() if value is not _NOW}

        def insert(conn: Connection) -> bool:
            try:
                return bool(prepared.run(conn, params).rowcount == 1)
            except sa_exc.IntegrityError as exc:
                if getattr(exc.orig, "args", ())[:1] == (_DUPLICATE_KEY,):
                    return False
                raise

        hold = row[UNIQUE_HOLD]
        for _ in range(_KEY_TRIES):
            created, uncertain = self._on_hot(insert)
            if created:
                return True
            if not uncertain and hold is None:
                return False
            current = self.get(record.id)
            if current is not None:  # the id is taken (after a dropped answer: maybe by us)
                return (
                    uncertain
                    and current.state is record.state
                    and current.owner == record.owner
                    and current.generation == record.generation
                )
            if hold is None:
                return False
            holder = self._holder(hold)
            if holder is not None and holder != record.id:
                raise UniqueKeyHeld(hold, holder)
        raise StoreError(f"unique key {hold!r} kept changing hands while job {record.id} was made")

    def _holder(self, key: str) -> str | None:
        """The id of the unfinished job that holds unique ``key``, if any."""
        prepared = self._prepared("holder", lambda: key_holder(bindparam("key")))
        found, _ = self._on_hot(lambda conn: prepared.run(conn, {"key": key}).scalar())
        return None if found is None else str(found)

    def get(self, job_id: str) -> JobRecord | None:
        prepared = self._prepared("get", lambda: select(jobs).where(jobs.c.id == bindparam("id")))
        row, _ = self._on_hot(lambda conn: prepared.run(conn, {"id": job_id}).first())
        return None if row is None else _to_record(row)

    def transition(self, job_id: str, change: Transition) -> bool:
        """One autocommit compare-and-set ``UPDATE``; a move that appends history (a failure,
        a recovery, a restart: never a success) reads the entry's inputs first and writes only
        if they are unchanged, reading again when a concurrent move came in between."""
        if history_event(change) is None:  # the hot path
            won, uncertain = self._on_hot(lambda conn: self._transition(conn, job_id, change))
            return won or (uncertain and change.landed(self.get(job_id)))
        for _ in range(_HISTORY_TRIES):
            with self._read() as conn:
                before = _history_inputs(conn, job_id, change)
            if before is None:
                return False
            if self._retrying(self._with_history, job_id, change, before):
                return True
        raise StoreError(f"job {job_id} kept changing while its history was written")

    def _with_history(
        self, conn: Connection, job_id: str, change: Transition, before: Mapping[Any, Any] | None
    ) -> bool:
        """``change`` with its history entry, if the job still has the inputs ``before`` read."""
        if before is None:
            return self._transition(conn, job_id, change)
        at = before["now"] if change.at is None else change.at
        values = _moved(replace(change, at=at))
        values["history"] = history_after(before, change, at)
        where = _compare(change.expect, change.expect_owner, change.expect_generation, job_id)
        where += [_same(jobs.c[name], before[name]) for name in HISTORY_INPUTS]
        params = _compare_params(job_id, change.expect_owner, change.expect_generation)
        del params["id"]
        return conn.execute(update(jobs).where(*where).values(**values), params).rowcount == 1

    def _transition(self, conn: Connection, job_id: str, change: Transition) -> bool:
        marks: object = _NOW  # the moment, to be rendered by the prebuilt statement
        values = transition_values(change, marks, increment=_Increment, if_empty=_IfEmpty)
        shape = tuple((name, v if isinstance(v, _Marks) else None) for name, v in values.items())
        key = (
            "transition",
            shape,
            *_compare_shape(change.expect, change.expect_owner, change.expect_generation),
            change.at is None,
        )
        prepared = self._prepared(key, lambda: _update_statement(change, values))
        params = {f"set_{k}": v for k, v in values.items() if not isinstance(v, _Marks)}
        params.update(_compare_params(job_id, change.expect_owner, change.expect_generation))
        if change.at is not None:
            params["at"] = float(change.at)
        return bool(prepared.run(conn, params).rowcount == 1)

    def delete(
        self,
        job_id: str,
        expect: frozenset[JobState],
        expect_owner: str | _Sentinel | None = ANY,
        expect_generation: int | None = None,
    ) -> bool:
        """One autocommit compare-and-set ``DELETE``."""
        compare = _compare_shape(expect, expect_owner, expect_generation)
        prepared = self._prepared(
            ("delete", *compare),
            lambda: delete(jobs).where(*_compare(expect, expect_owner, expect_generation)),
        )
        params = _compare_params(job_id, expect_owner, expect_generation)
        gone, uncertain = self._on_hot(lambda conn: prepared.run(conn, params).rowcount == 1)
        return bool(gone) or (uncertain and self.get(job_id) is None)

    def _where(self, query: JobQuery) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = []
        if query.states:
            clauses.append(_state_in(query.states))
        for column, wanted in (
            (jobs.c.queue, query.queues),
            (jobs.c.name, query.names),
            (jobs.c.system, query.systems),
            (jobs.c.id, query.ids),
            (jobs.c.owner, query.owners),
            (jobs.c.unique_key, query.unique_keys),
        ):
            if wanted:
                clauses.append(column.in_(sorted(wanted)))
        if query.older_than is not None:
            clauses.append(jobs.c.updated_at <= db_now() - query.older_than)
        if query.newer_than is not None:
            clauses.append(jobs.c.updated_at > db_now() - query.newer_than)
        if query.match is not None:
            clauses.append(self._match(query.match, query.regex))
        if query.recovered:
            clauses.append(jobs.c.recoveries > 0)
        return clauses

    def _match(self, needle: str, regex: bool) -> ColumnElement[bool]:
        """The argument search; on PostgreSQL in the indexed copy of the arguments."""
        table = job_search if self.dialect == "postgresql" else jobs
        columns = [table.c[name] for name in SEARCH_FIELDS]
        if regex:
            found = or_(*(column.regexp_match(needle) for column in columns))
        else:
            needles = match_needles(needle)
            found = or_(*(self._contains(column, n) for column in columns for n in needles))
        if table is jobs:
            return found
        return jobs.c.id.in_(select(job_search.c.id).where(found))

    def _contains(self, column: ColumnElement[str], needle: str) -> ColumnElement[bool]:
        """A literal, case-sensitive substring test (``%`` and ``_`` match themselves)."""
        if self.dialect == "sqlite":
            return func.instr(column, needle) > 0
        escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        # Backslash is LIKE's default escape on PostgreSQL and MySQL; the utf8mb4_bin
        # collation makes MySQL's LIKE case-sensitive like PostgreSQL's.
        return column.like(f"%{escaped}%")

    def query(self, query: JobQuery, *, limit: int, cursor: str | None = None) -> Page[JobRecord]:
        rows = self._page(select(jobs), query, limit, cursor)
        return page_of(rows, limit, _to_record, _position)

    def _page(
        self,
        statement: Any,
        query: JobQuery,
        limit: int,
        cursor: str | None,
        *extra: ColumnElement[bool],
    ) -> list[Row[Any]]:
        """``limit`` + 1 rows newest first after ``cursor`` (the extra row says: more follow)."""
        check_page_size(limit)
        clauses = [*self._where(query), *extra]
        if cursor is not None:
            after = Cursor.decode(cursor)
            clauses.append(
                and_(
                    jobs.c.created_at <= after.created_at,
                    or_(jobs.c.created_at < after.created_at, jobs.c.id < after.id),
                )
            )
        statement = (
            statement.where(*clauses)
            .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
            .limit(limit + 1)
        )
        with self._read() as conn:
            return list(conn.execute(statement))

    def count(self, query: JobQuery) -> int:
        with self._read() as conn:
            statement = select(func.count()).select_from(jobs).where(*self._where(query))
            return int(conn.execute(statement).scalar_one())

    def queue_stats(self) -> list[QueueStats]:
        # Counts and the queued lag come from the (queue, state, queued_at) index alone; the
        # staged lag reads only staged rows. No query touches every row of a big ledger's heap.
        counts = select(
            jobs.c.queue, jobs.c.state, func.count(), func.min(jobs.c.queued_at)
        ).group_by(jobs.c.queue, jobs.c.state)
        staged = (
            select(jobs.c.queue, func.min(jobs.c.staged_at))
            .where(jobs.c.state == JobState.STAGED.value)
            .group_by(jobs.c.queue)
        )
        with self._read() as conn:
            now = float(conn.execute(select(db_now())).scalar_one())
            rows = conn.execute(counts).all()
            oldest_staged: dict[str, float] = {q: t for q, t in conn.execute(staged)}
        stats: dict[str, dict[str, Any]] = {}
        for queue, state, count, oldest_queued in rows:
            entry = stats.setdefault(queue, {"counts": {}, "queued": None})
            entry["counts"][JobState(state)] = int(count)
            if state == JobState.QUEUED.value and oldest_queued is not None:
                entry["queued"] = max(0.0, now - oldest_queued)
        return [
            QueueStats(
                queue,
                entry["counts"],
                entry["queued"],
                None if oldest_staged.get(queue) is None else max(0.0, now - oldest_staged[queue]),
                now,
            )
            for queue, entry in sorted(stats.items())
        ]

    def durations(
        self, query: JobQuery, kind: DurationKind, *, limit: int, cursor: str | None = None
    ) -> Page[tuple[JobRecord, float]]:
        seconds = _duration(kind)
        statement = select(jobs, seconds.label("seconds"))
        rows = self._page(statement, finished_query(query), limit, cursor, seconds.is_not(None))
        return page_of(rows, limit, lambda r: (_to_record(r), float(r.seconds)), _position)

    def duration_stats(self, query: JobQuery, kind: DurationKind) -> list[DurationStats]:
        seconds = _duration(kind)
        clauses = [*self._where(finished_query(query)), seconds.is_not(None)]
        if self.dialect == "postgresql":
            # One pass: percentile_disc is the nearest-rank percentile.
            statement = (
                select(
                    jobs.c.name,
                    func.count(),
                    func.percentile_disc(0.5).within_group(seconds),
                    func.percentile_disc(0.95).within_group(seconds),
                    func.max(seconds),
                )
                .where(*clauses)
                .group_by(jobs.c.name)
                .order_by(jobs.c.name)
            )
            with self._read() as conn:
                return [
                    DurationStats(name, int(n), float(p50), float(p95), float(longest))
                    for name, n, p50, p95, longest in conn.execute(statement)
                ]
        result: list[DurationStats] = []
        with self._read() as conn:
            groups = conn.execute(
                select(jobs.c.name, func.count(), func.max(seconds))
                .where(*clauses)
                .group_by(jobs.c.name)
                .order_by(jobs.c.name)
            ).all()
            for name, count, longest in groups:

                def rank(p: float, name: str = name, count: int = count) -> float:
                    statement = (
                        select(seconds)
                        .where(*clauses, jobs.c.name == name)
                        .order_by(seconds)
                        .offset(nearest_rank(p, count))
                        .limit(1)
                    )
                    return float(conn.execute(statement).scalar_one())

                result.append(
                    DurationStats(name, int(count), rank(0.5), rank(0.95), float(longest))
                )
        return result

    def prune(self, query: JobQuery, *, batch_size: int = 1000) -> int:
        check_page_size(batch_size)
        states = prunable_states(query)
        if not states:
            return 0
        clauses = self._where(query.narrowed(states=states))
        removed = 0
        while True:
            with self._write() as conn:
                ids = list(
                    conn.execute(select(jobs.c.id).where(*clauses).limit(batch_size)).scalars()
                )
                if ids:
                    # The state test again: a restart between the two statements keeps its job.
                    removed += conn.execute(
                        delete(jobs).where(jobs.c.id.in_(ids), _state_in(states))
                    ).rowcount
            if len(ids) < batch_size:
                return removed

    # -- the outbox ------------------------------------------------------------------------
    @contextlib.contextmanager
    def staged_batch(
        self,
        *,
        limit: int,
        older_than: float = 0.0,
        ids: Collection[str] | None = None,
        systems: Collection[str] | None = None,
        lease: float = DEFAULT_LEASE,
    ) -> Iterator[StagedBatch]:
        check_page_size(limit)
        token = f"{LEASE_PREFIX}{secrets.token_hex(8)}"
        # MySQL/MariaDB: READ COMMITTED, or InnoDB would also lock the rows and gaps the scan
        # passed, holding up claims, staging inserts and the other relays.
        isolation = "READ COMMITTED" if self.dialect in ("mysql", "mariadb") else None
        records = self._retrying(
            self._lease, token, limit, older_than, ids, systems, lease, isolation_level=isolation
        )
        batch = LeasedBatch(records)
        try:
            yield batch
        except BaseException:
            self._retrying(self._end_lease, token, LeasedBatch(records))
            raise
        self._retrying(self._end_lease, token, batch)

    def _lease(
        self,
        conn: Connection,
        token: str,
        limit: int,
        older_than: float,
        ids: Collection[str] | None,
        systems: Collection[str] | None,
        lease: float,
    ) -> list[JobRecord]:
        """Take up to ``limit`` staged jobs nobody holds (or whose holder's lease ran out) in
        one short transaction: ``owner`` = the batch's token, ``updated_at`` = now."""
        free = or_(jobs.c.owner.is_(None), jobs.c.updated_at <= db_now() - lease)
        statement = select(jobs).where(jobs.c.state == JobState.STAGED.value, free)
        if ids is not None:
            statement = statement.where(jobs.c.id.in_(sorted(ids)))
        else:  # the relay: the oldest first, as the (state, updated_at) index has them
            statement = statement.order_by(jobs.c.updated_at)
        if older_than > 0:
            statement = statement.where(jobs.c.updated_at <= db_now() - older_than)
        if systems is not None:
            statement = statement.where(jobs.c.system.in_(sorted(systems)))
        statement = statement.limit(limit)
        if self.dialect != "sqlite":
            # Row locks for the moment of the lease only; MySQL/MariaDB lock what they scan,
            # so the fast path's jobs go by primary key and the relay's by the staged index.
            statement = statement.with_for_update(skip_locked=True)
            hint = "PRIMARY" if ids is not None else _STAGED_INDEX
            for dialect in ("mysql", "mariadb"):
                statement = statement.with_hint(jobs, f"FORCE INDEX ({hint})", dialect)
        found = [_to_record(row) for row in conn.execute(statement)]
        if not found:
            return []
        chosen = [r.id for r in found]
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(chosen), jobs.c.state == JobState.STAGED.value, free)
            .values(owner=token, updated_at=db_now())
        )
        if self.dialect == "sqlite":  # no row locks: another batch may have taken some first
            taken = select(jobs.c.id).where(jobs.c.id.in_(chosen), jobs.c.owner == token)
            mine = set(conn.execute(taken).scalars())
            found = [r for r in found if r.id in mine]
        return found

    def _end_lease(self, conn: Connection, token: str, batch: LeasedBatch) -> None:
        """The published jobs → queued, the refused → failed, the others free again, as they
        were before the lease (``updated_at`` back to when they were staged)."""
        if batch.marked:
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(sorted(batch.marked)), *_leased_by(token))
                .values(**_moved(_TO_QUEUED))
            )
        for job_id in batch.refused:  # leased by us: nobody else moves them meanwhile
            refusal = batch.refusal(job_id, token)
            self._with_history(conn, job_id, refusal, _history_inputs(conn, job_id, refusal))
        rest = sorted({r.id for r in batch.records} - set(batch.marked) - set(batch.refused))
        if rest:
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(rest), *_leased_by(token))
                .values(owner=None, updated_at=func.coalesce(jobs.c.staged_at, jobs.c.updated_at))
            )

    # -- instances -------------------------------------------------------------------------
    def heartbeat(self, instance: Instance) -> None:
        self._retrying(self._heartbeat, instance)

    def _heartbeat(self, conn: Connection, instance: Instance) -> None:
        values = {**instance_beat_values(instance), "heartbeat_at": db_now()}
        found = conn.execute(
            update(instances).where(instances.c.id == instance.id).values(**values)
        ).rowcount
        if found:
            return
        with conn.begin_nested():
            conn.execute(
                insert(instances).values(
                    id=instance.id,
                    name=instance.name,
                    nonce=instance.nonce,
                    hostname=instance.hostname,
                    pid=instance.pid,
                    started_at=db_now(),
                    **values,
                )
            )

    def deregister(self, instance_id: str) -> bool:
        with self._write() as conn:
            statement = delete(instances).where(instances.c.id == instance_id)
            return bool(conn.execute(statement).rowcount == 1)

    def instances(self, ttl: float) -> list[Instance]:
        age = (db_now() - instances.c.heartbeat_at).label("age")
        with self._read() as conn:
            rows = conn.execute(
                select(instances, age).order_by(instances.c.name, instances.c.started_at)
            ).all()
        return [instance_from_row(r._mapping, float(r.age), ttl) for r in rows]

    def is_alive(self, instance_id: str, ttl: float) -> bool:
        statement = select(instances.c.id).where(
            instances.c.id == instance_id, instances.c.heartbeat_at >= db_now() - ttl
        )
        with self._read() as conn:
            return conn.execute(statement).first() is not None

    def orphans(self, ttl: float, *, limit: int = 1000) -> list[JobRecord]:
        owner = jobs.outerjoin(instances, jobs.c.owner == instances.c.id)
        statement = (
            select(jobs)
            .select_from(owner)
            .where(
                jobs.c.state == JobState.STARTED.value,
                or_(instances.c.id.is_(None), instances.c.heartbeat_at < db_now() - ttl),
            )
            .order_by(jobs.c.started_at, jobs.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [_to_record(r) for r in conn.execute(statement)]

    # -- locks -----------------------------------------------------------------------------
    def acquire_lock(self, name: str, token: str, ttl: float) -> bool:
        won: bool = self._retrying(self._acquire_lock, name, token, ttl)
        return won

    def _acquire_lock(self, conn: Connection, name: str, token: str, ttl: float) -> bool:
        if self.dialect in ("mysql", "mariadb"):
            return _acquire_lock_mysql(conn, name, token, ttl)
        taken = conn.execute(
            update(locks)
            .where(locks.c.name == name, or_(locks.c.token == token, locks.c.expires_at < db_now()))
            .values(token=token, expires_at=db_now() + ttl)
        ).rowcount
        if taken:
            return True
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(locks).values(name=name, token=token, expires_at=db_now() + ttl)
                )
        except sa_exc.IntegrityError:
            return False
        return True

    def release_lock(self, name: str, token: str) -> bool:
        with self._write() as conn:
            statement = delete(locks).where(locks.c.name == name, locks.c.token == token)
            return bool(conn.execute(statement).rowcount == 1)


class _Prepared:
    """A Core statement compiled once for one dialect and run as the driver's own SQL: no
    statement object, cache key or parameter processing per call (psycopg prepares it on the
    server after a few runs on a connection). Its columns need no bind processing (text,
    integers, doubles), which the compiled statement's types would otherwise add."""

    __slots__ = ("_fixed", "_order", "sql")

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        #: Values bound when the statement was built (the expected states, ``+ 1``).
        self._fixed: dict[str, Any] = dict(compiled.construct_params(_check=False))
        self._order: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positiontup is not None else None
        )

    def run(self, conn: Connection, values: Mapping[str, Any]) -> CursorResult[Any]:
        merged = {**self._fixed, **values}
        params = merged if self._order is None else tuple(merged[n] for n in self._order)
        return conn.exec_driver_sql(self.sql, params)


class _Increment(NamedTuple):
    """In a prebuilt SET clause: the column plus one."""

    column: str


class _IfEmpty(NamedTuple):
    """In a prebuilt SET clause: the column, or the move's time where it has none."""

    column: str


class _Now:
    """In a prebuilt statement: the move's time (the database clock, or the ``at`` given)."""


_NOW = _Now()
_Marks = (_Increment, _IfEmpty, _Now)


def _insert_statement(dialect: str, row: Mapping[str, Any], relaxed: bool) -> Insert:
    """The create of a row shaped like ``row`` (``_NOW`` where the database clock stamps it).

    ``relaxed`` (PostgreSQL): the row comes from a one-row SELECT over
    ``set_config('synchronous_commit', 'off', true)``, so this statement's own transaction
    commits without waiting for the WAL flush, in the same single round trip."""
    values = {
        name: db_now() if value is _NOW else bindparam(name, type_=jobs.c[name].type)
        for name, value in row.items()
    }
    if dialect == "postgresql":
        statement = postgresql.insert(jobs)
        if relaxed:
            setting = select(func.set_config("synchronous_commit", "off", True)).subquery()
            source = select(*values.values()).select_from(setting)
            return statement.from_select(list(values), source).on_conflict_do_nothing()
        # no conflict target: a held unique key inserts nothing either (create tells which)
        return statement.values(values).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(jobs).values(values).on_conflict_do_nothing()
    return insert(jobs).values(values)


def _update_statement(change: Transition, values: Mapping[str, Any]) -> Update:
    """The compare-and-set UPDATE of every move shaped like ``change``."""
    at: ColumnElement[Any] = db_now() if change.at is None else bindparam("at", type_=Double())
    assignments: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, _Now):
            assignments[name] = at
        elif isinstance(value, _Increment):
            assignments[name] = jobs.c[value.column] + 1
        elif isinstance(value, _IfEmpty):
            assignments[name] = func.coalesce(jobs.c[value.column], at)
        else:
            assignments[name] = bindparam(f"set_{name}", type_=jobs.c[name].type)
    compare = _compare(change.expect, change.expect_owner, change.expect_generation)
    return update(jobs).where(*compare).values(assignments)


def _compare(
    expect: frozenset[JobState],
    owner: str | _Sentinel | None,
    generation: int | None,
    job_id: str | None = None,
) -> list[ColumnElement[bool]]:
    """The compare of a compare-and-set, with the id (unless given: an UPDATE built per call
    cannot bind a parameter named like its column), owner and generation as parameters."""
    states: list[ColumnElement[str]] = [
        bindparam(f"expect_{i}", s.value) for i, s in enumerate(sorted(expect))
    ]
    id_is = jobs.c.id == (bindparam("id") if job_id is None else job_id)
    clauses = [id_is, jobs.c.state.in_(states)]
    if owner is None:
        clauses.append(jobs.c.owner.is_(None))
    elif owner is not ANY:
        clauses.append(jobs.c.owner == bindparam("expect_owner"))
    if generation is not None:
        clauses.append(jobs.c.generation == bindparam("expect_generation"))
    return clauses


def _compare_shape(
    expect: frozenset[JobState], owner: str | _Sentinel | None, generation: int | None
) -> tuple[Hashable, ...]:
    """What the statement of :func:`_compare` depends on, as a cache key."""
    return (expect, owner if owner is None or owner is ANY else "=", generation is None)


def _compare_params(
    job_id: str, owner: str | _Sentinel | None, generation: int | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"id": job_id}
    if isinstance(owner, str):
        params["expect_owner"] = owner
    if generation is not None:
        params["expect_generation"] = generation
    return params


def _acquire_lock_mysql(conn: Connection, name: str, token: str, ttl: float) -> bool:
    """Take or renew a lock on MySQL/MariaDB with one upsert, then read who holds it.

    The update-then-insert of the other databases deadlocks on InnoDB when contenders race for
    a missing lock: each one's UPDATE of the absent row takes a gap lock that blocks the others'
    INSERT, InnoDB kills all but one, and the savepoint dies with its transaction (error 1305
    instead of a lost race). ``ON DUPLICATE KEY UPDATE`` takes the row's exclusive lock at once,
    so contenders queue. Its assignments run left to right: ``token`` first, so ``expires_at``
    moves only when the token is now ours.
    """
    ours = locks.c.token == token
    free = or_(ours, locks.c.expires_at < db_now())
    statement = (
        mysql.insert(locks)
        .values(name=name, token=token, expires_at=db_now() + ttl)
        .on_duplicate_key_update(
            [
                ("token", case((free, token), else_=locks.c.token)),
                ("expires_at", case((ours, db_now() + ttl), else_=locks.c.expires_at)),
            ]
        )
    )
    conn.execute(statement)
    holder = conn.execute(
        select(locks.c.token).where(locks.c.name == name).with_for_update()
    ).scalar()
    return bool(holder == token)


_TO_QUEUED = Transition(to=JobState.QUEUED, expect=frozenset({JobState.STAGED}))
#: The index a relay batch walks: staged jobs by the time they entered the state.
_STAGED_INDEX = "ix_jobledger_jobs_state_updated"


def _leased_by(token: str) -> list[ColumnElement[bool]]:
    return [jobs.c.state == JobState.STAGED.value, jobs.c.owner == token]


def _moved(change: Transition) -> dict[str, Any]:
    """The SET clause of a won ``change``, stamped with ``change.at`` or the database clock."""
    at: ColumnElement[Any] = db_now() if change.at is None else literal(change.at)
    return transition_values(
        change,
        at,
        increment=lambda name: jobs.c[name] + 1,
        if_empty=lambda name: func.coalesce(jobs.c[name], at),
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers work beside the one writer (who queue for the lock as long as the
    ``timeout`` connect argument, the busy timeout, allows)."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL"):
        with contextlib.suppress(Exception):  # an in-memory database has no WAL
            cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _history_inputs(conn: Connection, job_id: str, change: Transition) -> Mapping[Any, Any] | None:
    """The :data:`HISTORY_INPUTS` of the job and the database's "now", if ``change``'s compare
    matches it."""
    columns = (jobs.c[name] for name in HISTORY_INPUTS)
    compare = _compare(change.expect, change.expect_owner, change.expect_generation)
    params = _compare_params(job_id, change.expect_owner, change.expect_generation)
    row = conn.execute(select(*columns, db_now().label("now")).where(*compare), params).first()
    return None if row is None else row._mapping


def _same(column: ColumnElement[Any], value: Any) -> ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


def _state_in(states: frozenset[JobState]) -> ColumnElement[bool]:
    return jobs.c.state.in_(sorted(s.value for s in states))


def _duration(kind: DurationKind) -> ColumnElement[float]:
    return jobs.c.finished_at - jobs.c[duration_start(kind)]


def _to_record(row: Row[Any]) -> JobRecord:
    return record_from_row(row._mapping)


def _position(row: Row[Any]) -> Cursor:
    """Where ``row`` stands in the newest-first order, from its raw stored values."""
    return Cursor(float(row._mapping["created_at"]), row._mapping["id"])


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return lines[0] if lines else type(original).__name__


def _is_missing_table(exc: BaseException) -> bool:
    message = str(getattr(exc, "orig", exc)).lower()
    return "jobledger_" in message and (
        "no such table" in message or "does not exist" in message or "doesn't exist" in message
    )


def _sqlstate(exc: BaseException | None) -> object:
    original = getattr(exc, "orig", None)
    if original is None:
        return None
    code = getattr(original, "sqlstate", None)  # psycopg
    if code is None and getattr(original, "args", None):
        code = original.args[0]  # PyMySQL: (errno, message)
    return code
