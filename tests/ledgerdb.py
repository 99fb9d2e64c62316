"""Real databases for the tests, importable from any test module or subprocess helper.

The servers default to the ones CI and the developer machines run; override with
``JOBLEDGER_TEST_POSTGRES_URL`` / ``JOBLEDGER_TEST_MYSQL_URL``. Each test session creates its own
database on each server (dropped at the end by ``conftest``), so concurrent runs never see each
other's rows. A server that cannot be reached fails the tests that need it: a skipped test
proves nothing.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, select, text

from jobledger.stores import Store, open_store
from jobledger.stores.redis import RedisStore
from jobledger.stores.schema import instances, jobs, locks
from jobledger.stores.sql import SQLStore

POSTGRES_URL = os.environ.get(
    "JOBLEDGER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("JOBLEDGER_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
#: The Redis a Redis ledger is made on (each under a prefix of its own, so the broker's is fine).
REDIS_URL = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

SQL_BACKENDS = ["sqlite", "postgresql", "mariadb"]
#: Every store on a real server: the SQL ones and Redis.
LEDGER_BACKENDS = [*SQL_BACKENDS, "redis"]


_RUN_DATABASE = f"jl_test_{uuid.uuid4().hex[:10]}"
_created: dict[str, str] = {}


def _server_database(server_url: str) -> str:
    """A database of this test session's own on the server at ``server_url`` (created once)."""
    if server_url not in _created:
        from jobledger.stores.sql import parse_url

        url = parse_url(server_url)
        admin = create_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {_RUN_DATABASE}"))
        admin.dispose()
        _created[server_url] = url.set(database=_RUN_DATABASE).render_as_string(hide_password=False)
    return _created[server_url]


def drop_session_databases() -> None:
    """Drop the databases this session created."""
    from jobledger.stores.sql import parse_url

    for server_url in list(_created):
        admin = create_engine(parse_url(server_url), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            if make_url(server_url).get_backend_name() == "postgresql":
                conn.execute(text(f"DROP DATABASE IF EXISTS {_RUN_DATABASE} WITH (FORCE)"))
            else:
                conn.execute(text(f"DROP DATABASE IF EXISTS {_RUN_DATABASE}"))
        admin.dispose()
        del _created[server_url]


def redis_ledger_url(server_url: str = REDIS_URL) -> str:
    """A Redis ledger of its own on ``server_url``: a fresh key prefix in the URL."""
    separator = "&" if "?" in server_url else "?"
    return f"{server_url}{separator}prefix=jl-test-{uuid.uuid4().hex[:12]}"


def drop_redis_ledger(store: RedisStore) -> None:
    """Delete every key of the store's ledger (its prefix's)."""
    keys = list(store.client.scan_iter(store.keys.pattern, count=1000))
    for start in range(0, len(keys), 1000):
        store.client.delete(*keys[start : start + 1000])


def database_url(backend: str, tmp_path: Path) -> str:
    """The URL of a ledger for ``backend`` (SQLite: a fresh file under ``tmp_path``; Redis: a
    fresh prefix; a SQL server: this session's own database on it)."""
    if backend == "redis":
        return redis_ledger_url()
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return _server_database(server_url(backend))


def server_url(backend: str) -> str:
    """The URL of the test server for a SQL ``backend`` (``postgresql`` or ``mariadb``)."""
    return {"postgresql": POSTGRES_URL, "mariadb": MYSQL_URL}[backend]


@contextlib.contextmanager
def throwaway_database(server: str, name: str) -> Iterator[str]:
    """A database ``name`` created on the server at ``server`` for one test (one that migrates
    down and up, or must start without the ledger's tables); dropped afterwards."""
    from jobledger.stores.sql import parse_url

    url = parse_url(server)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        force = " WITH (FORCE)" if url.get_backend_name() == "postgresql" else ""
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
        admin.dispose()


@contextlib.contextmanager
def own_database(backend: str, tmp_path: Path, tag: str) -> Iterator[str]:
    """A database of one test's own on a SQL ``backend``: a new SQLite file under ``tmp_path``,
    or a throwaway database named after ``tag`` on the backend's server."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / f'{tag}.db'}"
        return
    with throwaway_database(server_url(backend), f"jl_{tag}_{uuid.uuid4().hex[:8]}") as url:
        yield url


def migrate_to(url: str, revision: str, *, up: bool = True) -> None:
    """Run the ledger's Alembic migrations on ``url`` up (or down) to ``revision``."""
    from alembic import command

    from jobledger.stores import migrations
    from jobledger.stores.sql import parse_url

    engine = create_engine(parse_url(url))
    with engine.begin() as conn:
        config = migrations.alembic_config(conn)
        (command.upgrade if up else command.downgrade)(config, revision)
    engine.dispose()


def empty_sql_store(url: str) -> SQLStore:
    """A migrated store on ``url`` with every ledger table emptied."""
    store = SQLStore(url)
    store.migrate()
    with store.engine.begin() as conn:
        for table in (jobs, instances, locks):
            conn.execute(table.delete())
    return store


def empty_store(url: str) -> Store:
    """A migrated, empty ledger at ``url``, SQL or Redis (a Redis URL names a fresh prefix:
    see :func:`redis_ledger_url`)."""
    if not url.startswith("redis"):
        return empty_sql_store(url)
    store = open_store(url)
    store.migrate()
    return store


def discard_store(store: Store) -> None:
    """Close a store a test opened (a Redis ledger's keys go too)."""
    if isinstance(store, RedisStore):
        drop_redis_ledger(store)
    store.close()


def ledger_url(store: Store) -> str:
    """The URL that opens ``store``'s ledger again (in a child process, say)."""
    if isinstance(store, RedisStore):
        separator = "&" if "?" in REDIS_URL else "?"
        return f"{REDIS_URL}{separator}prefix={store.keys.prefix}"
    assert isinstance(store, SQLStore)
    return store.url.render_as_string(hide_password=False)


def age_heartbeat(store: Store, instance_id: str, seconds: float) -> None:
    """Move an instance's last heartbeat ``seconds`` into the past (setup for "silent for an
    hour" without waiting an hour)."""
    if isinstance(store, RedisStore):
        key = store.keys.instance(instance_id)
        moment = float(store.client.hget(key, "heartbeat_at")) - seconds  # type: ignore[arg-type]
        store.client.hset(key, "heartbeat_at", repr(moment))
        store.client.zadd(store.keys.beats, {instance_id: moment})
        return
    assert isinstance(store, SQLStore)
    with store.engine.begin() as conn:
        conn.execute(
            instances.update()
            .where(instances.c.id == instance_id)
            .values(heartbeat_at=instances.c.heartbeat_at - seconds)
        )


def snapshot(store: Store) -> dict[str, Any]:
    """Everything the ledger stores (SQL: every row of every table, in primary-key order;
    Redis: every key of the ledger with its value), to prove a call changed nothing."""
    if isinstance(store, RedisStore):
        client = store.client
        found: dict[str, Any] = {}
        for key in sorted(client.scan_iter(store.keys.pattern, count=1000)):
            kind = client.type(key)
            read = {
                "hash": client.hgetall,
                "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
                "set": lambda k: sorted(client.smembers(k)),
                "string": client.get,
            }[kind]
            found[key] = read(key)
        return found
    assert isinstance(store, SQLStore)
    with store.engine.connect() as conn:
        return {
            table.name: [
                tuple(row)
                for row in conn.execute(select(table).order_by(*table.primary_key.columns))
            ]
            for table in (jobs, instances, locks)
        }
