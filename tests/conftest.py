"""Shared fixtures: a migrated, empty ledger on each real database (see ``ledgerdb``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobledger.stores.base import Store
from jobledger.stores.sql import SQLStore
from ledgerdb import (
    SQL_BACKENDS,
    database_url,
    discard_store,
    drop_session_databases,
    empty_sql_store,
    empty_store,
)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    drop_session_databases()


@pytest.fixture(params=SQL_BACKENDS)
def sql_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def sql_url(sql_backend: str, tmp_path: Path) -> str:
    return database_url(sql_backend, tmp_path)


@pytest.fixture
def sql_store(sql_url: str) -> Iterator[SQLStore]:
    store = empty_sql_store(sql_url)
    yield store
    store.close()


@pytest.fixture
def make_sql_store(make_store: Callable[[str], Store]) -> Callable[[str], SQLStore]:
    """Open a migrated, emptied store on the SQL backend named (``sqlite``, ``postgresql``,
    ``mariadb``), for fixtures that parametrize over more than the SQL backends; each store
    opened is closed at teardown."""

    def make(backend: str) -> SQLStore:
        store = make_store(backend)
        assert isinstance(store, SQLStore)
        return store

    return make


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[[str], Store]]:
    """Open a migrated, empty ledger on the backend named (a SQL one, or ``redis``: a prefix
    of its own on the test Redis); each is closed, a Redis one's keys deleted, at teardown."""
    opened: list[Store] = []

    def make(backend: str) -> Store:
        opened.append(empty_store(database_url(backend, tmp_path)))
        return opened[-1]

    yield make
    for store in opened:
        discard_store(store)
