"""CLI fixtures: the real ``jobledger`` command bound to a migrated, emptied ledger on each of
SQLite, PostgreSQL, MariaDB and Redis (``store_url``/``store``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobledger.stores.base import Store
from jobledger.stores.sql import SQLStore
from ledgerdb import LEDGER_BACKENDS, database_url, discard_store, empty_store, ledger_url

from .helpers import Cli, Ledger, seed_ledger


@pytest.fixture(params=LEDGER_BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated, empty ledger on each real server."""
    opened = empty_store(database_url(str(request.param), tmp_path))
    yield opened
    discard_store(opened)


@pytest.fixture
def store_url(store: Store) -> str:
    return ledger_url(store)


@pytest.fixture
def cli(store_url: str, tmp_path: Path) -> Cli:
    """``jobledger`` on the test ledger."""
    return Cli(store_url, tmp_path)


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return seed_ledger(store)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A ledger for checks that do not depend on the database (a prompt, the in-process app)."""
    return f"sqlite:///{tmp_path / 'single.db'}"


@pytest.fixture
def sqlite_store(sqlite_url: str) -> Iterator[SQLStore]:
    store = SQLStore(sqlite_url)
    store.migrate()
    yield store
    store.close()
