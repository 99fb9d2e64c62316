"""The shipped Store contract (:mod:`jobledger.testing.contract.store`), run unchanged against
every store jobledger ships: SQLite, PostgreSQL, MariaDB, Redis and memory (``conftest``'s
``store`` fixture)."""

from __future__ import annotations

from collections.abc import Iterable

from jobledger.model import JobRecord
from jobledger.stores.base import Store
from jobledger.stores.rows import creation_row
from jobledger.stores.schema import jobs
from jobledger.stores.sql import SQLStore
from jobledger.testing.contract import StoreContract


class TestStoreContract(StoreContract):
    def bulk_create(self, store: Store, records: Iterable[JobRecord]) -> None:
        """A SQL store's rows go straight into its table (as :meth:`Store.create` writes
        them): 20,000 creates one by one take minutes there."""
        if not isinstance(store, SQLStore):
            super().bulk_create(store, records)
            return
        now = store.now()
        rows = [creation_row(record, now) for record in records]
        with store.engine.begin() as conn:
            for start in range(0, len(rows), 2000):
                conn.execute(jobs.insert(), rows[start : start + 2000])
