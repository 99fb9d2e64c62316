from jobledger.model import JobRecord
from jobledger.query import JobQuery
from jobledger.stores.sql import SQLStore


def test_create_and_count(sql_store: SQLStore) -> None:
    assert sql_store.create(JobRecord(id="j1", name="t"))
    assert sql_store.count(JobQuery()) == 1
