"""CLI fixtures: the real ``jobledger`` command bound to a migrated, emptied ledger on each of
SQLite, PostgreSQL and MariaDB (``sql_url``/``sql_store`` from the top-level conftest)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobledger.stores.sql import SQLStore

from .helpers import Cli, Ledger, seed_ledger


@pytest.fixture
def cli(sql_url: str, sql_store: SQLStore, tmp_path: Path) -> Cli:
    """``jobledger`` on the test ledger (``sql_store`` first, so the tables exist and are empty)."""
    return Cli(sql_url, tmp_path)


@pytest.fixture
def ledger(sql_store: SQLStore) -> Ledger:
    return seed_ledger(sql_store)


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
