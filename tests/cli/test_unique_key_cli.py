"""``--unique-key`` on ``jobs``, ``restart`` and ``cancel``, on every ledger: the jobs published
with a key, finished ones included; an empty key is bad input (one line, exit 2)."""

from __future__ import annotations

from jobledger.errors import UniqueKeyHeld
from jobledger.model import JobRecord, JobState
from jobledger.stores.base import Store, Transition
from jobledger.testing.contract.records import started
from ledgerdb import snapshot

from .helpers import Cli


def seed(store: Store) -> None:
    """a: charge:1, succeeded; b: charge:1 again, queued (holds it); c: charge:2; d: no key."""
    for record in (
        started("a", "w:1", unique_key="charge:1"),
        JobRecord(id="c", name="t", unique_key="charge:2"),
        JobRecord(id="d", name="t"),
    ):
        assert store.create(record)
    done = Transition(to=JobState.SUCCEEDED, expect=frozenset({JobState.STARTED}))
    assert store.transition("a", done)
    assert store.create(JobRecord(id="b", name="t", unique_key="charge:1"))


def test_jobs_lists_every_job_of_a_unique_key(cli: Cli, store: Store) -> None:
    seed(store)
    assert set(cli.quick("jobs", "--unique-key", "charge:1", "--json").ids()) == {"a", "b"}
    both = cli.quick("jobs", "-u", "charge:1", "-u", "charge:2", "--json").ids()
    assert set(both) == {"a", "b", "c"}
    assert cli.quick("jobs", "-u", "charge:1", "--state", "queued", "--json").ids() == ["b"]
    assert cli.quick("jobs", "-u", "charge", "--json").ids() == []  # exact, not a prefix
    before = snapshot(store)
    cli("jobs", "--unique-key", "").error("a unique key must be 1-255 characters")
    cli.quick("cancel", "--unique-key", "", "--yes").error("unique key")
    assert snapshot(store) == before


def test_cancel_by_unique_key_frees_the_key(cli: Cli, store: Store) -> None:
    seed(store)
    report = cli.quick("cancel", "--unique-key", "charge:1", "--yes", "--json").json()
    assert report["done"] == ["b"] and report["skipped"] == {"a": "is succeeded"}
    assert store.get("c").state is JobState.QUEUED  # type: ignore[union-attr]
    assert store.create(JobRecord(id="e", name="t", unique_key="charge:1"))
    try:
        store.create(JobRecord(id="f", name="t", unique_key="charge:2"))
    except UniqueKeyHeld as held:
        assert held.holder == "c"
    else:
        raise AssertionError("charge:2 was freed by a cancel of charge:1")
