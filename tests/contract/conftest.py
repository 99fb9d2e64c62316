"""The ``store`` fixture: every Store implementation, so one suite proves they all agree."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from jobledger.stores.base import Store
from jobledger.stores.memory import MemoryStore
from ledgerdb import LEDGER_BACKENDS

STORE_BACKENDS = [*LEDGER_BACKENDS, "memory"]


@pytest.fixture(params=STORE_BACKENDS)
def store(request: pytest.FixtureRequest, make_store: Callable[[str], Store]) -> Store:
    """An empty ledger on each store: SQLite, PostgreSQL, MariaDB, Redis (migrated) and
    memory."""
    if request.param == "memory":
        return MemoryStore()
    return make_store(str(request.param))
