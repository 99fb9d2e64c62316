"""What the Redis store promises beyond the Store contract (``tests/contract`` runs that):
scripts that survive a restart or ``SCRIPT FLUSH``, nothing committed lost by a restart with
an append-only file, one hash slot per ledger, and one-line errors for a ledger that is not
there, not migrated, or on too old a server."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from e2e.celery.services import PrivateRedis
from jobledger.errors import SchemaMissing, StagingError, StoreError, StoreUnavailable
from jobledger.model import Instance, JobRecord, JobState
from jobledger.outbox import Outbox
from jobledger.query import JobQuery
from jobledger.stores import open_store
from jobledger.stores.base import Transition
from jobledger.stores.redis import RedisStore
from jobledger.stores.redis.keys import order_head
from jobledger.stores.redis.scripts import source
from ledgerdb import discard_store, empty_store, redis_ledger_url

CLAIM = Transition(to=JobState.STARTED, expect=frozenset({JobState.QUEUED}), owner="w:1")


@pytest.fixture
def store() -> Iterator[RedisStore]:
    opened = empty_store(redis_ledger_url())
    assert isinstance(opened, RedisStore)
    yield opened
    discard_store(opened)


def test_scripts_are_loaded_again_after_a_script_flush(store: RedisStore) -> None:
    assert store.create(JobRecord(id="a", name="t"))
    store.client.script_flush()
    assert store.transition("a", CLAIM)
    assert not store.create(JobRecord(id="a", name="t"))
    assert store.get("a").state is JobState.STARTED  # type: ignore[union-attr]


def test_every_key_of_a_ledger_is_in_one_hash_slot(store: RedisStore) -> None:
    """So every script touches one slot: what Redis Cluster requires of a script."""
    store.heartbeat(Instance(name="w", nonce="1"))
    for n in range(20):
        assert store.create(JobRecord(id=f"job-{n}", name="t", queue=f"q{n % 3}"))
    assert store.transition("job-1", Transition(**{**CLAIM.__dict__, "owner": "w:1"}))
    assert store.acquire_lock("recovery", "token", ttl=30)
    keys = list(store.client.scan_iter(store.keys.pattern))
    assert len(keys) > 20
    assert {key_slot(k.encode()) for k in keys} == {key_slot(store.keys.meta.encode())}


def test_a_restart_with_an_append_only_file_loses_nothing_committed(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)  # appendonly yes, appendfsync always; SIGKILLed below
    server.start()
    try:
        store = open_store(server.url, auto_migrate=True)
        for n in range(200):
            assert store.create(JobRecord(id=f"job-{n}", name="t", args=[n]))
        for n in range(0, 200, 2):
            assert store.transition(f"job-{n}", CLAIM)
        store.heartbeat(Instance(name="w", nonce="1", holding=(("job-0", 0),)))
        assert store.acquire_lock("recovery", "token", ttl=600)
        before = list(store.iter_jobs(JobQuery()))
        counts = [q.counts for q in store.queue_stats()]
        server.kill()
        server.start()
        assert list(store.iter_jobs(JobQuery())) == before  # the same client reconnects
        assert [q.counts for q in store.queue_stats()] == counts
        assert store.count(JobQuery(states={JobState.STARTED})) == 100
        assert [i.holding for i in store.instances(ttl=600)] == [(("job-0", 0),)]
        assert not store.acquire_lock("recovery", "other", ttl=600)
        assert store.transition("job-1", CLAIM), "the scripts load again on the new server"
        store.close()
    finally:
        server.kill()


def test_a_ledger_never_migrated_names_jobledger_migrate(store: RedisStore) -> None:
    fresh = open_store(redis_ledger_url())
    with pytest.raises(SchemaMissing, match="jobledger migrate"):
        fresh.get("a")
    fresh.close()
    auto = open_store(redis_ledger_url(), auto_migrate=True)
    assert auto.create(JobRecord(id="a", name="t"))
    assert isinstance(auto, RedisStore) and len(auto.ledger_id()) == 32
    discard_store(auto)


def test_migrate_refuses_a_server_older_than_6_2(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store.client, "info", lambda section: {"redis_version": "6.0.16"})
    with pytest.raises(StoreError, match=r"version 6\.0\.16; jobledger needs 6\.2"):
        store.migrate()


def test_an_unreachable_redis_is_unavailable_in_one_line() -> None:
    store = open_store("redis://:s3cret@127.0.0.1:1/0", connect_timeout=0.5)
    with pytest.raises(StoreUnavailable) as raised:
        store.get("a")
    assert "\n" not in str(raised.value) and "s3cret" not in str(raised.value)


def test_staging_in_a_sql_transaction_is_refused_on_a_redis_ledger(
    store: RedisStore, tmp_path: Path
) -> None:
    """The job would be written to the SQL database, where no relay of this ledger looks."""
    engine = create_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    refused = pytest.raises(StagingError, match="staging in a transaction needs a SQL ledger")
    with Session(engine) as session, session.begin(), refused:
        Outbox(store).stage(JobRecord(id="a", name="t"), using=session)
    engine.dispose()
    assert store.get("a") is None


def test_staging_without_a_transaction_goes_through_the_relay(store: RedisStore) -> None:
    """No transaction to join: the job is written staged and leased like any relay batch."""
    record = dataclasses.replace(JobRecord(id="a", name="t"), state=JobState.STAGED)
    assert store.create(record)
    with store.staged_batch(limit=10) as batch:
        assert [r.id for r in batch.records] == ["a"]
        batch.mark_queued(["a"])
    assert store.get("a").state is JobState.QUEUED  # type: ignore[union-attr]


def test_the_scripts_order_heads_are_the_clients(store: RedisStore) -> None:
    """Cursors are made in Python and members in Lua: the two must agree to the bit."""
    common = source("lock").split("\n-- Take the lock")[0]
    for moment in (0.0, 1.5, 1764770000.123456, -3.25, 1e-300, 2.5e9):
        lua = store.client.eval(
            common + "\nreturn order_head(tonumber(ARGV[2]))", 0, "x", repr(moment)
        )
        assert lua == order_head(moment), moment
