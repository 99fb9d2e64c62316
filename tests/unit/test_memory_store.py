"""What the MemoryStore adds to the contract suite: its injectable clock, copies instead of
shared objects, thread safety, and properties checked over many generated cases."""

from __future__ import annotations

import threading
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobledger.model import CLAIMABLE_STATES, Instance, JobRecord, JobState, to_datetime
from jobledger.query import JobQuery
from jobledger.stores.base import Store, Transition
from jobledger.testing import ManualClock, MemoryStore


def test_it_is_a_store() -> None:
    assert isinstance(MemoryStore(), Store)


def test_the_clock_is_the_database_clock() -> None:
    clock = ManualClock(start=1000.0)
    store = MemoryStore(clock=clock)
    assert store.now() == 1000.0
    assert store.create(JobRecord(id="j", name="t"))
    record = store.get("j")
    assert record is not None and record.created_at is not None
    assert record.created_at.timestamp() == 1000.0
    store.heartbeat(Instance(name="w", nonce="1"))
    clock.advance(30)
    assert store.is_alive("w:1", ttl=30)
    [instance] = store.instances(ttl=30)
    assert instance.heartbeat_age == 30 and instance.alive
    clock.advance(0.001)
    assert not store.is_alive("w:1", ttl=30)
    assert store.count(JobQuery(older_than=30)) == 1
    assert store.acquire_lock("l", "A", ttl=10)
    clock.advance(10)
    assert not store.acquire_lock("l", "B", ttl=10), "expires only after its ttl"
    clock.advance(0.001)
    assert store.acquire_lock("l", "B", ttl=10)


def test_a_clock_going_back_makes_ages_zero_not_negative() -> None:
    clock = ManualClock(start=1000.0)
    store = MemoryStore(clock=clock)
    store.heartbeat(Instance(name="w", nonce="1"))
    clock.set(900.0)
    [instance] = store.instances(ttl=30)
    assert instance.heartbeat_age == 0.0 and instance.alive
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_records_are_copies() -> None:
    store = MemoryStore()
    record = JobRecord(id="j", name="t", args=[[1]], kwargs={"k": {"v": 1}})
    assert store.create(record)
    record.args[0].append(2)
    got = store.get("j")
    assert got is not None and got.args == [[1]]
    got.kwargs["k"]["v"] = 99
    again = store.get("j")
    assert again is not None and again.kwargs == {"k": {"v": 1}}
    assert store.records() == [again]


def test_many_threads_claim_once() -> None:
    store = MemoryStore()
    jobs = [f"j{n}" for n in range(200)]
    for job_id in jobs:
        assert store.create(JobRecord(id=job_id, name="t"))
    wins: list[list[str]] = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def run(thread: int) -> None:
        claim = Transition(to=JobState.STARTED, expect=CLAIMABLE_STATES, owner=f"w:{thread}")
        barrier.wait()
        wins[thread] = [j for j in jobs if store.transition(j, claim)]

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for won in wins for j in won) == sorted(jobs)


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)


@settings(max_examples=300, deadline=None)
@given(prefix=_text, needle=_text.filter(bool), suffix=_text, other=_text)
def test_any_text_as_match_finds_the_job_whose_argument_contains_it(
    prefix: str, needle: str, suffix: str, other: str
) -> None:
    store = MemoryStore()
    assert store.create(JobRecord(id="hit", name="t", args=[prefix + needle + suffix]))
    assert store.create(JobRecord(id="as-kwarg", name="t", kwargs={"k": needle}))
    assert store.create(JobRecord(id="other", name="t", args=[other]))
    found = {r.id for r in store.iter_jobs(JobQuery(match=needle))}
    assert {"hit", "as-kwarg"} <= found
    plain = needle.isalnum() and other.isalnum()  # texts JSON stores unescaped
    if plain and needle not in other:
        assert "other" not in found


@settings(max_examples=60, deadline=None)
@given(
    created=st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=60),
    limit=st.integers(min_value=1, max_value=9),
)
def test_keyset_pages_list_every_job_once_newest_first(created: list[int], limit: int) -> None:
    store = MemoryStore()
    for n, moment in enumerate(created):
        assert store.create(JobRecord(id=f"j{n:03d}", name="t", created_at=_at(moment)))
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = store.query(JobQuery(), limit=limit, cursor=cursor)
        assert len(page.items) <= limit
        seen.extend(r.id for r in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    expected = sorted(
        (f"j{n:03d}" for n in range(len(created))),
        key=lambda i: (created[int(i[1:])], i),
        reverse=True,
    )
    assert seen == expected


def _at(moment: int) -> datetime | None:
    return to_datetime(1_700_000_000.0 + moment)
