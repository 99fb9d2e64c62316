"""The ``store`` fixture: every Store implementation, so one suite proves they all agree."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from jobledger.stores.base import Store
from jobledger.stores.memory import MemoryStore
from jobledger.stores.sql import SQLStore

STORE_BACKENDS = ["sqlite", "postgresql", "mariadb", "memory"]


@pytest.fixture(params=STORE_BACKENDS)
def store(request: pytest.FixtureRequest, make_sql_store: Callable[[str], SQLStore]) -> Store:
    """An empty ledger on each store: SQLite, PostgreSQL, MariaDB (migrated) and memory."""
    if request.param == "memory":
        return MemoryStore()
    return make_sql_store(str(request.param))
