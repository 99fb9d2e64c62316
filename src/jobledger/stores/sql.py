"""The SQL store: one code path for SQLite, PostgreSQL (psycopg 3) and MariaDB/MySQL (PyMySQL).

Every job transition is a single ``UPDATE … WHERE id = ? AND state IN (…) [AND owner = ?]``
whose row count says who won, so concurrent writers from any number of threads and processes
never both win. Every time comes from :class:`~jobledger.stores.schema.db_now`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    and_,
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
from sqlalchemy.engine import URL
from sqlalchemy.pool import StaticPool

from jobledger.errors import ConfigError, SchemaMissing, StoreError, StoreUnavailable
from jobledger.model import (
    FINAL_STATES,
    DurationStats,
    Instance,
    InstanceState,
    JobRecord,
    JobState,
    QueueStats,
    to_datetime,
    to_epoch,
)
from jobledger.query import Cursor, JobQuery, Page
from jobledger.stores import migrations
from jobledger.stores.base import ANY, KEEP, DurationKind, Store, Transition, _Sentinel
from jobledger.stores.schema import (
    SCHEMA_REVISION,
    SEARCH_COLUMNS,
    VERSION_TABLE,
    db_now,
    instances,
    jobs,
    locks,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Which extra brings the driver for a URL's dialect, for the error a person sees without it.
_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}
#: The driver jobledger picks when a URL names only the database (``postgresql://…``).
_DEFAULT_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}

#: The phase timestamp a transition to each state stamps.
_PHASE_STAMP = {
    JobState.STAGED: "staged_at",
    JobState.QUEUED: "queued_at",
    JobState.STARTED: "started_at",
    JobState.SUCCEEDED: "finished_at",
    JobState.FAILED: "finished_at",
    JobState.DEAD: "finished_at",
    JobState.CANCELLED: "finished_at",
}

#: Errors worth one more try: deadlocks and serialization failures (PostgreSQL, MySQL).
_TRANSIENT_CODES = {"40P01", "40001", 1213, 1205}


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"job arguments must be JSON-serializable: {exc}") from None


def parse_url(url: str | URL) -> URL:
    """A SQLAlchemy URL with jobledger's default driver filled in; :class:`ConfigError` if the
    text is not a database URL."""
    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):
        raise ConfigError(
            f"malformed database URL {str(url)!r}: expected e.g. sqlite:///jobledger.db or "
            "postgresql://user@host/db"
        ) from None
    backend = parsed.get_backend_name()
    if "+" not in parsed.drivername and backend in _DEFAULT_DRIVERS:
        parsed = parsed.set(drivername=f"{backend}+{_DEFAULT_DRIVERS[backend]}")
    if backend in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return parsed


class SQLStore(Store):
    """The ledger in a SQL database reached through SQLAlchemy Core.

    ``auto_migrate`` applies the shipped migrations on first use instead of refusing with
    :class:`SchemaMissing`. ``engine_options`` go to :func:`sqlalchemy.create_engine`.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        auto_migrate: bool = False,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = parse_url(url)
        self.auto_migrate = auto_migrate
        self._schema_checked = False
        self._schema_lock = threading.Lock()
        self.engine = self._create_engine(dict(engine_options or {}))
        self.dialect = self.engine.dialect.name

    def __repr__(self) -> str:
        return f"SQLStore({self.safe_url!r})"

    @property
    def safe_url(self) -> str:
        """The URL with its password hidden, for messages and logs."""
        return self.url.render_as_string(hide_password=True)

    # -- connections -----------------------------------------------------------------------
    def _create_engine(self, options: dict[str, Any]) -> Engine:
        options.setdefault("pool_pre_ping", True)
        backend = self.url.get_backend_name()
        if backend == "sqlite":
            if self.url.database in (None, "", ":memory:"):
                options.setdefault("poolclass", StaticPool)
                options.setdefault("connect_args", {"check_same_thread": False})
            else:
                options.setdefault("connect_args", {"timeout": 30})
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
    def _translate(self) -> Iterator[None]:
        """Turn driver errors into jobledger's: unreachable → :class:`StoreUnavailable`."""
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            if _is_missing_table(exc):
                raise self._missing_schema() from None
            raise StoreUnavailable(
                f"the ledger database at {self.safe_url} is unavailable: {_first_line(exc)}"
            ) from exc
        except sa_exc.ProgrammingError as exc:
            if _is_missing_table(exc):
                raise self._missing_schema() from None
            raise StoreError(f"ledger query failed on {self.safe_url}: {_first_line(exc)}") from exc
        except sa_exc.DBAPIError as exc:
            raise StoreError(f"ledger query failed on {self.safe_url}: {_first_line(exc)}") from exc

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
    def _write(self) -> Iterator[Connection]:
        """A connection in a transaction that commits on success; retried once on deadlock."""
        self._ready()
        with self._translate(), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        self._ready()
        with self._translate(), self.engine.connect() as conn:
            yield conn

    def _retrying(self, operation: Any, *args: Any) -> Any:
        """Run a one-transaction write, once more if the database broke a deadlock with it."""
        for attempt in range(3):
            try:
                with self._write() as conn:
                    return operation(conn, *args)
            except StoreError as exc:
                if attempt == 2 or _sqlstate(exc.__cause__) not in _TRANSIENT_CODES:
                    raise
        raise AssertionError("unreachable")

    # -- schema ----------------------------------------------------------------------------
    def migrate(self) -> None:
        """Create or upgrade the ledger tables (idempotent). See :meth:`migrate_report`."""
        self.migrate_report()

    def migrate_report(self) -> str:
        """Migrate, and say how argument search is served (trigram index or a scan)."""
        with self._translate(), self.engine.begin() as conn:
            report = migrations.upgrade(conn)
        self._schema_checked = True
        return report

    def close(self) -> None:
        self.engine.dispose()

    def now(self) -> float:
        with self._read() as conn:
            return float(conn.execute(select(db_now())).scalar_one())

    # -- jobs ------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> bool:
        values = _record_values(record)
        now = db_now()
        row: dict[str, Any] = {
            key: (now if value is None and key in ("created_at", "updated_at") else value)
            for key, value in values.items()
        }
        stamp = _PHASE_STAMP.get(record.state)
        if stamp and row.get(stamp) is None:
            row[stamp] = now
        if record.state is JobState.QUEUED and row.get("first_queued_at") is None:
            row["first_queued_at"] = row["queued_at"]
        try:
            with self._write() as conn:
                conn.execute(insert(jobs).values(**row))
        except StoreError as exc:
            if isinstance(exc.__cause__, sa_exc.IntegrityError):
                return False
            raise
        return True

    def get(self, job_id: str) -> JobRecord | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return None if row is None else _to_record(row)

    def transition(self, job_id: str, change: Transition) -> bool:
        won: bool = self._retrying(self._transition, job_id, change)
        return won

    def _transition(self, conn: Connection, job_id: str, change: Transition) -> bool:
        at: ColumnElement[float] = db_now() if change.at is None else literal(change.at)
        values: dict[str, Any] = {"state": change.to.value, "updated_at": at}
        stamp = _PHASE_STAMP.get(change.to)
        if stamp:
            values[stamp] = at
        if change.to is JobState.QUEUED:
            values["first_queued_at"] = func.coalesce(jobs.c.first_queued_at, at)
            values["owner"] = None
        elif change.to is JobState.STAGED:
            values["owner"] = None
        elif change.to is JobState.STARTED:
            values["owner"] = change.owner
            values["attempts"] = jobs.c.attempts + 1
        if change.reason == "recovery":
            values["recoveries"] = jobs.c.recoveries + 1
            values["recovered_at"] = at
        elif change.reason == "restart":
            values["restarts"] = jobs.c.restarts + 1
        if change.error is not KEEP:
            values["error"] = change.error
        statement = (
            update(jobs)
            .where(jobs.c.id == job_id, _state_in(change.expect), *_owner_is(change.expect_owner))
            .values(**values)
        )
        return conn.execute(statement).rowcount == 1

    def delete(
        self, job_id: str, expect: frozenset[JobState], expect_owner: str | _Sentinel | None = ANY
    ) -> bool:
        with self._write() as conn:
            statement = delete(jobs).where(
                jobs.c.id == job_id, _state_in(expect), *_owner_is(expect_owner)
            )
            return bool(conn.execute(statement).rowcount == 1)

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
        ):
            if wanted:
                clauses.append(column.in_(sorted(wanted)))
        if query.older_than is not None:
            clauses.append(jobs.c.updated_at <= db_now() - query.older_than)
        if query.match is not None:
            clauses.append(self._match(query.match, query.regex))
        return clauses

    def _match(self, needle: str, regex: bool) -> ColumnElement[bool]:
        columns = [jobs.c[name] for name in SEARCH_COLUMNS]
        if regex:
            return or_(*(column.regexp_match(needle) for column in columns))
        # As typed, and as the same text reads inside a JSON string (quotes and backslashes
        # escaped), so both a JSON fragment and the raw value of a string argument match.
        needles = dict.fromkeys([needle, json.dumps(needle, ensure_ascii=False)[1:-1]])
        return or_(*(self._contains(column, n) for column in columns for n in needles))

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
        return _paged(rows, limit, _to_record)

    def _page(
        self,
        statement: Any,
        query: JobQuery,
        limit: int,
        cursor: str | None,
        *extra: ColumnElement[bool],
    ) -> list[Row[Any]]:
        """``limit`` + 1 rows newest first after ``cursor`` (the extra row says: more follow)."""
        if limit < 1:
            raise ConfigError(f"page size must be at least 1, not {limit}")
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
        statement = select(
            jobs.c.queue,
            jobs.c.state,
            func.count(),
            func.min(jobs.c.queued_at),
            func.min(jobs.c.staged_at),
        ).group_by(jobs.c.queue, jobs.c.state)
        with self._read() as conn:
            now = float(conn.execute(select(db_now())).scalar_one())
            rows = conn.execute(statement).all()
        stats: dict[str, dict[str, Any]] = {}
        for queue, state, count, oldest_queued, oldest_staged in rows:
            entry = stats.setdefault(queue, {"counts": {}, "queued": None, "staged": None})
            entry["counts"][JobState(state)] = int(count)
            if state == JobState.QUEUED.value and oldest_queued is not None:
                entry["queued"] = max(0.0, now - oldest_queued)
            if state == JobState.STAGED.value and oldest_staged is not None:
                entry["staged"] = max(0.0, now - oldest_staged)
        return [
            QueueStats(queue, entry["counts"], entry["queued"], entry["staged"])
            for queue, entry in sorted(stats.items())
        ]

    def durations(
        self, query: JobQuery, kind: DurationKind, *, limit: int, cursor: str | None = None
    ) -> Page[tuple[JobRecord, float]]:
        seconds = _duration(kind)
        statement = select(jobs, seconds.label("seconds"))
        rows = self._page(statement, _finished(query), limit, cursor, seconds.is_not(None))
        return _paged(rows, limit, lambda r: (_to_record(r), float(r.seconds)))

    def duration_stats(self, query: JobQuery, kind: DurationKind) -> list[DurationStats]:
        seconds = _duration(kind)
        clauses = [*self._where(_finished(query)), seconds.is_not(None)]
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
                    offset = max(0, math.ceil(p * count) - 1)
                    statement = (
                        select(seconds)
                        .where(*clauses, jobs.c.name == name)
                        .order_by(seconds)
                        .offset(offset)
                        .limit(1)
                    )
                    return float(conn.execute(statement).scalar_one())

                result.append(DurationStats(name, int(count), rank(0.5), rank(0.95), longest))
        return result

    def prune(self, query: JobQuery, *, batch_size: int = 1000) -> int:
        states = (query.states or FINAL_STATES) & FINAL_STATES
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

    # -- instances -------------------------------------------------------------------------
    def heartbeat(self, instance: Instance) -> None:
        self._retrying(self._heartbeat, instance)

    def _heartbeat(self, conn: Connection, instance: Instance) -> None:
        values = {
            "state": instance.state.value,
            "queues": _dumps(list(instance.queues)),
            "heartbeat_at": db_now(),
        }
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
        return [
            Instance(
                name=r.name,
                nonce=r.nonce,
                hostname=r.hostname,
                pid=r.pid,
                queues=tuple(json.loads(r.queues)),
                state=InstanceState(r.state),
                started_at=to_datetime(r.started_at),
                heartbeat_at=to_datetime(r.heartbeat_at),
                heartbeat_age=max(0.0, float(r.age)),
                alive=float(r.age) <= ttl,
            )
            for r in rows
        ]

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
            .order_by(jobs.c.started_at)
            .limit(limit)
        )
        with self._read() as conn:
            return [_to_record(r) for r in conn.execute(statement)]

    # -- locks -----------------------------------------------------------------------------
    def acquire_lock(self, name: str, token: str, ttl: float) -> bool:
        won: bool = self._retrying(self._acquire_lock, name, token, ttl)
        return won

    def _acquire_lock(self, conn: Connection, name: str, token: str, ttl: float) -> bool:
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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers work beside the one writer; the busy timeout makes writers queue."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
        with contextlib.suppress(Exception):  # an in-memory database has no WAL
            cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _state_in(states: frozenset[JobState]) -> ColumnElement[bool]:
    return jobs.c.state.in_(sorted(s.value for s in states))


def _owner_is(owner: str | _Sentinel | None) -> list[ColumnElement[bool]]:
    if owner is ANY:
        return []
    if owner is None:
        return [jobs.c.owner.is_(None)]
    return [jobs.c.owner == owner]


def _duration(kind: DurationKind) -> ColumnElement[float]:
    if kind not in ("queued", "started"):
        raise ConfigError(f"duration kind must be 'queued' or 'started', not {kind!r}")
    start = jobs.c.queued_at if kind == "queued" else jobs.c.started_at
    return jobs.c.finished_at - start


def _finished(query: JobQuery) -> JobQuery:
    """Durations are of completed jobs unless the query names other final states."""
    states = (query.states & FINAL_STATES) or frozenset({JobState.SUCCEEDED})
    return query.narrowed(states=states)


def _paged(rows: Sequence[Row[Any]], limit: int, convert: Callable[[Row[Any]], T]) -> Page[T]:
    """The first ``limit`` rows converted and, if a further row was fetched, the cursor after
    them (made of the raw stored values, so no rounding can skip or repeat a row)."""
    if len(rows) <= limit:
        return Page(items=[convert(r) for r in rows])
    rows = rows[:limit]
    last = rows[-1]._mapping
    return Page(
        items=[convert(r) for r in rows],
        next_cursor=Cursor(float(last["created_at"]), last["id"]).encode(),
    )


def _record_values(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "system": record.system,
        "name": record.name,
        "queue": record.queue,
        "args": _dumps(record.args),
        "kwargs": _dumps(record.kwargs),
        "tags": _dumps(record.tags),
        "options": _dumps(record.options),
        "state": record.state.value,
        "owner": record.owner,
        "attempts": record.attempts,
        "recoveries": record.recoveries,
        "restarts": record.restarts,
        "error": record.error,
        "created_at": to_epoch(record.created_at),
        "staged_at": to_epoch(record.staged_at),
        "first_queued_at": to_epoch(record.first_queued_at),
        "queued_at": to_epoch(record.queued_at),
        "started_at": to_epoch(record.started_at),
        "finished_at": to_epoch(record.finished_at),
        "recovered_at": to_epoch(record.recovered_at),
        "updated_at": to_epoch(record.updated_at),
    }


def _to_record(row: Row[Any]) -> JobRecord:
    m = row._mapping
    return JobRecord(
        id=m["id"],
        system=m["system"],
        name=m["name"],
        queue=m["queue"],
        args=json.loads(m["args"]),
        kwargs=json.loads(m["kwargs"]),
        tags=json.loads(m["tags"]),
        options=json.loads(m["options"]),
        state=JobState(m["state"]),
        owner=m["owner"],
        attempts=m["attempts"],
        recoveries=m["recoveries"],
        restarts=m["restarts"],
        error=m["error"],
        created_at=to_datetime(m["created_at"]),
        staged_at=to_datetime(m["staged_at"]),
        first_queued_at=to_datetime(m["first_queued_at"]),
        queued_at=to_datetime(m["queued_at"]),
        started_at=to_datetime(m["started_at"]),
        finished_at=to_datetime(m["finished_at"]),
        recovered_at=to_datetime(m["recovered_at"]),
        updated_at=to_datetime(m["updated_at"]),
    )


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
