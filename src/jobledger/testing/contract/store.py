"""The Store contract: one suite every Store implementation must pass unchanged.

Subclass :class:`StoreContract` in a test module (its name must start with ``Test``) and give
it a ``store`` fixture that yields an empty, migrated store; pytest runs every test against
it. Every test talks to the store through the Store API only, so a store that passes here can
sit under lifecycle, recovery, the manager and the server::

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self) -> Iterator[Store]:
            store = MyStore(...)
            store.migrate()
            yield store
            store.close()

Needs pytest and hypothesis (``pip install 'jobledger[testing]'``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobledger.errors import ConfigError, InvalidTransition, UniqueKeyHeld
from jobledger.model import (
    CLAIMABLE_STATES,
    ERROR_MAX_LENGTH,
    HISTORY_ERROR_MAX_LENGTH,
    HISTORY_KEPT,
    TRANSITIONS,
    DurationStats,
    HistoryEntry,
    HistoryEvent,
    Instance,
    InstanceState,
    JobRecord,
    JobState,
)
from jobledger.query import JobQuery
from jobledger.stores.base import Store, Transition
from jobledger.testing import wait_for
from jobledger.testing.contract.records import (
    CLOCK_SLACK,
    all_ids,
    dt,
    epoch,
    ids,
    job,
    started,
)

__all__ = ["StoreContract"]

S = JobState


def only(*states: JobState) -> frozenset[JobState]:
    return frozenset(states)


def claim(owner: str) -> Transition:
    return Transition(to=S.STARTED, expect=CLAIMABLE_STATES, owner=owner)


def found(store: Store, **query: object) -> set[str]:
    """Ids the query selects, read both through paging and ``count`` (which must agree)."""
    q = JobQuery(**query)  # type: ignore[arg-type]
    selected = all_ids(store, q)
    assert store.count(q) == len(selected)
    return selected


#: Characters that are special somewhere: to LIKE, to SQL quoting, to JSON, to a driver.
_special = st.sampled_from(list("ab%_'\"\\\x00\x01\n\tZoë東京🚀"))
_search_text = st.text(st.one_of(_special, st.characters(exclude_categories=["Cs"])), max_size=8)
_example_ids = itertools.count()


#: Moves that leave a job unfinished: it keeps holding its unique key through them.
UNFINISHED_MOVES = [
    Transition(to=S.STARTED, expect=CLAIMABLE_STATES, owner="w:1"),
    Transition(to=S.RETRYING, expect=only(S.STARTED), expect_owner="w:1", error="boom"),
    Transition(to=S.QUEUED, expect=only(S.RETRYING)),
    Transition(to=S.STARTED, expect=CLAIMABLE_STATES, owner="w:2"),
]
#: The moves that end a job: each frees its key in the same compare-and-set.
ENDINGS = [
    Transition(to=S.SUCCEEDED, expect=only(S.STARTED), expect_owner="w:1"),
    Transition(to=S.FAILED, expect=only(S.STARTED), expect_owner="w:1", error="boom"),
    Transition(to=S.DEAD, expect=only(S.STARTED), error="recovered too often"),
    Transition(to=S.CANCELLED, expect=only(S.STARTED)),
]


def refused_by(store: Store, record: JobRecord) -> str:
    """Create ``record``, which must be refused for its unique key; the holder named."""
    with pytest.raises(UniqueKeyHeld) as refused:
        store.create(record)
    assert refused.value.key == record.unique_key
    assert store.get(record.id) is None
    return refused.value.holder


class StoreContract:
    """The tests; a subclass provides the ``store`` fixture (and may override
    :meth:`bulk_create` with a faster way to insert many records)."""

    def bulk_create(self, store: Store, records: Iterable[JobRecord]) -> None:
        """Insert many records (setup only: tests assert through the Store API). Default:
        the store's ``create_many`` if it has one, else :meth:`Store.create` one by one."""
        records = list(records)
        create_many = getattr(store, "create_many", None)
        if create_many is not None:
            assert create_many(records) == len(records)
            return
        for record in records:
            assert store.create(record)

    # -- create / get --------------------------------------------------------------------------

    def test_create_then_get_round_trips_every_field(self, store: Store) -> None:
        record = JobRecord(
            id="job-1",
            name="tasks.send",
            system="celery",
            queue="mail",
            args=[1, "two", {"three": 3.5}, None, True],
            kwargs={"to": "a@example.com", "nested": {"list": [1, 2]}},
            options={"priority": 5, "countdown": None},
            tags={"tenant": "t1"},
        )
        before = store.now()
        assert store.create(record)
        after = store.now()
        got = store.get("job-1")
        assert got is not None
        for name in ("id", "name", "system", "queue", "args", "kwargs", "options", "tags"):
            assert getattr(got, name) == getattr(record, name), name
        assert got.state is S.QUEUED
        assert (got.owner, got.attempts, got.recoveries, got.restarts, got.error) == (
            None,
            0,
            0,
            0,
            None,
        )
        for stamp in (got.created_at, got.queued_at, got.first_queued_at, got.updated_at):
            assert before - CLOCK_SLACK <= epoch(stamp) <= after + CLOCK_SLACK
        assert got.queued_at == got.first_queued_at
        assert (got.staged_at, got.started_at, got.finished_at, got.recovered_at) == (None,) * 4

    def test_create_keeps_the_times_a_record_carries(self, store: Store) -> None:
        base = float(int(store.now())) - 1000.0
        record = job(
            "job-1",
            state=S.SUCCEEDED,
            owner="w:1",
            attempts=2,
            recoveries=1,
            restarts=1,
            error="old",
            created_at=dt(base),
            first_queued_at=dt(base + 0.5),
            queued_at=dt(base + 1),
            started_at=dt(base + 2.25),
            finished_at=dt(base + 3.5),
            recovered_at=dt(base + 1.75),
        )
        assert store.create(record)
        got = store.get("job-1")
        assert got is not None
        assert dataclasses.replace(got, updated_at=None) == record
        # The job entered its state when it finished: that is what ``older_than`` measures.
        assert got.updated_at == dt(base + 3.5)
        assert got.started_to_finished == 1.25

    def test_create_defaults_the_phase_time_of_the_state(self, store: Store) -> None:
        now = store.now()
        for state in S:
            owner = "w:1" if state is S.STARTED else None
            assert store.create(job(f"j-{state.value}", state=state, owner=owner))
        for state, stamp in [
            (S.STAGED, "staged_at"),
            (S.QUEUED, "queued_at"),
            (S.STARTED, "started_at"),
            (S.SUCCEEDED, "finished_at"),
            (S.FAILED, "finished_at"),
            (S.DEAD, "finished_at"),
            (S.CANCELLED, "finished_at"),
        ]:
            got = store.get(f"j-{state.value}")
            assert got is not None
            assert abs(epoch(getattr(got, stamp)) - now) < CLOCK_SLACK, state
            assert got.updated_at == getattr(got, stamp)
            assert (got.first_queued_at is not None) == (state is S.QUEUED)
        retrying = store.get("j-retrying")
        assert retrying is not None and abs(epoch(retrying.updated_at) - now) < CLOCK_SLACK

    def test_duplicate_create_is_refused_and_changes_nothing(self, store: Store) -> None:
        assert store.create(job("job-1", name="first", args=[1]))
        assert not store.create(job("job-1", name="second", args=[2], state=S.FAILED))
        got = store.get("job-1")
        assert got is not None
        assert (got.name, got.args, got.state) == ("first", [1], S.QUEUED)
        assert store.count(JobQuery()) == 1

    def test_create_refuses_arguments_that_are_not_json(self, store: Store) -> None:
        with pytest.raises(ConfigError, match="JSON"):
            store.create(job("job-1", args=[object()]))
        assert store.get("job-1") is None

    def test_get_of_an_unknown_job_is_none(self, store: Store) -> None:
        assert store.get("nope") is None

    # -- transitions ---------------------------------------------------------------------------

    def test_every_allowed_transition_is_applied(self, store: Store) -> None:
        for source, targets in TRANSITIONS.items():
            for target in sorted(targets):
                job_id = f"{source.value}-to-{target.value}"
                owner = "w:old" if source is S.STARTED else None
                assert store.create(job(job_id, state=source, owner=owner))
                change = Transition(
                    to=target, expect=only(source), owner="w:new" if target is S.STARTED else None
                )
                assert store.transition(job_id, change), job_id
                got = store.get(job_id)
                assert got is not None and got.state is target, job_id
                if target in (S.QUEUED, S.STAGED):
                    assert got.owner is None, job_id
                elif target is S.STARTED:
                    assert got.owner == "w:new", job_id
                else:  # a finished job shows who ran it
                    assert got.owner == owner, job_id

    def test_a_forbidden_transition_is_refused_before_it_reaches_the_store(
        self, store: Store
    ) -> None:
        assert store.create(job("done", state=S.SUCCEEDED))
        forbidden = [(a, b) for a, b in itertools.product(S, S) if b not in TRANSITIONS[a]]
        assert forbidden
        for source, target in forbidden:
            with pytest.raises(InvalidTransition):
                Transition(to=target, expect=only(source), owner="w:1")
        with pytest.raises(InvalidTransition):
            Transition(to=S.QUEUED, expect=only(S.QUEUED, S.SUCCEEDED))
        with pytest.raises(ValueError):
            Transition(to=S.STARTED, expect=only(S.QUEUED))  # a start names its owner
        got = store.get("done")
        assert got is not None and got.state is S.SUCCEEDED

    def test_compare_and_set_on_state(self, store: Store) -> None:
        assert store.create(job("job-1"))
        before = store.get("job-1")
        assert not store.transition("job-1", Transition(to=S.CANCELLED, expect=only(S.STARTED)))
        assert store.get("job-1") == before
        assert not store.transition("missing", Transition(to=S.CANCELLED, expect=only(S.QUEUED)))
        assert store.transition("job-1", claim("w:a"))
        assert not store.transition("job-1", claim("w:b")), "the second claim must lose"
        got = store.get("job-1")
        assert got is not None and (got.owner, got.attempts) == ("w:a", 1)

    def test_compare_and_set_on_owner(self, store: Store) -> None:
        assert store.create(started("job-1", "w:a"))
        before = store.get("job-1")
        for wrong in ("w:b", None):
            finish = Transition(to=S.SUCCEEDED, expect=only(S.STARTED), expect_owner=wrong)
            assert not store.transition("job-1", finish)
        assert store.get("job-1") == before
        finish = Transition(to=S.SUCCEEDED, expect=only(S.STARTED), expect_owner="w:a")
        assert store.transition("job-1", finish)
        got = store.get("job-1")
        assert got is not None and (got.state, got.owner) == (S.SUCCEEDED, "w:a")

        assert store.create(job("job-2"))
        cancel_held = Transition(to=S.CANCELLED, expect=only(S.QUEUED), expect_owner="w:a")
        assert not store.transition("job-2", cancel_held)
        cancel_free = Transition(to=S.CANCELLED, expect=only(S.QUEUED), expect_owner=None)
        assert store.transition("job-2", cancel_free)

    def test_phase_timestamps_and_counters(self, store: Store) -> None:
        base = float(int(store.now())) - 1000.0
        assert store.create(job("job-1", created_at=dt(base), queued_at=dt(base)))

        def move(change: Transition) -> JobRecord:
            assert store.transition("job-1", change), change
            got = store.get("job-1")
            assert got is not None
            assert got.updated_at == dt(change.at or 0)
            return got

        got = move(Transition(to=S.STARTED, expect=only(S.QUEUED), owner="w:1", at=base + 1))
        assert (got.started_at, got.attempts, got.owner) == (dt(base + 1), 1, "w:1")
        assert got.first_queued_at == dt(base)

        got = move(Transition(to=S.QUEUED, expect=only(S.STARTED), reason="recovery", at=base + 2))
        assert (got.queued_at, got.recovered_at, got.recoveries) == (dt(base + 2), dt(base + 2), 1)
        assert (got.first_queued_at, got.owner, got.attempts, got.restarts) == (
            dt(base),
            None,
            1,
            0,
        )

        got = move(Transition(to=S.STARTED, expect=only(S.QUEUED), owner="w:2", at=base + 3))
        assert (got.attempts, got.recoveries, got.started_at) == (2, 1, dt(base + 3))

        fail = Transition(
            to=S.FAILED, expect=only(S.STARTED), expect_owner="w:2", error="boom", at=base + 4
        )
        got = move(fail)
        assert (got.finished_at, got.error, got.owner) == (dt(base + 4), "boom", "w:2")

        got = move(Transition(to=S.QUEUED, expect=only(S.FAILED), reason="restart", at=base + 5))
        assert (got.restarts, got.recoveries, got.queued_at) == (1, 1, dt(base + 5))
        # a restarted job is not finished: no stale finish time, no negative duration
        assert (got.error, got.owner, got.finished_at) == ("boom", None, None)
        assert got.queued_to_finished is None

        got = move(Transition(to=S.STARTED, expect=only(S.QUEUED), owner="w:3", at=base + 6))
        got = move(Transition(to=S.SUCCEEDED, expect=only(S.STARTED), error=None, at=base + 7.5))
        assert (got.attempts, got.error, got.owner, got.finished_at) == (
            3,
            None,
            "w:3",
            dt(base + 7.5),
        )
        assert (got.queued_to_finished, got.started_to_finished) == (2.5, 1.5)
        assert got.first_queued_at == dt(base) and got.created_at == dt(base)

        # Without ``at`` the store stamps its own clock.
        assert store.create(job("job-2", created_at=dt(base), queued_at=dt(base)))
        assert store.transition("job-2", claim("w:1"))
        now = store.now()
        fresh = store.get("job-2")
        assert fresh is not None
        assert abs(epoch(fresh.started_at) - now) < CLOCK_SLACK
        assert fresh.updated_at == fresh.started_at

    def test_history_keeps_failures_recoveries_and_restarts_but_not_successes(
        self, store: Store
    ) -> None:
        """Each move that closes an attempt without success, each recovery and restart appends
        one entry in its own compare-and-set; claims and successes append none (the hot path)."""
        base = float(int(store.now())) - 1000.0
        assert store.create(job("job-1", created_at=dt(base), queued_at=dt(base)))

        def move(change: Transition) -> tuple[HistoryEntry, ...]:
            assert store.transition("job-1", change), change
            got = store.get("job-1")
            assert got is not None
            return got.history

        assert move(Transition(to=S.STARTED, expect=only(S.QUEUED), owner="w:1", at=base + 1)) == ()
        retry = Transition(
            to=S.RETRYING, expect=only(S.STARTED), expect_owner="w:1", error="boom 1", at=base + 2
        )
        (first,) = move(retry)
        assert first == HistoryEntry(
            event=HistoryEvent.RETRYING,
            at=dt(base + 2),
            came_from=S.STARTED,
            to=S.RETRYING,
            attempt=1,
            owner="w:1",
            started_at=dt(base + 1),
            error="boom 1",
        )
        assert first.ran_for == 1.0
        move(Transition(to=S.STARTED, expect=only(S.RETRYING), owner="w:2", at=base + 3))
        history = move(Transition(to=S.QUEUED, expect=only(S.STARTED), reason="recovery"))
        assert [(e.event, e.owner, e.attempt) for e in history] == [
            (HistoryEvent.RETRYING, "w:1", 1),
            (HistoryEvent.RECOVERED, "w:2", 2),
        ]
        assert history[1].started_at == dt(base + 3) and history[1].error is None
        move(Transition(to=S.STARTED, expect=only(S.QUEUED), owner="w:3"))
        move(Transition(to=S.FAILED, expect=only(S.STARTED), error="x" * 50_000))
        history = move(Transition(to=S.QUEUED, expect=only(S.FAILED), reason="restart"))
        assert [e.event for e in history[2:]] == [HistoryEvent.FAILED, HistoryEvent.RESTARTED]
        assert len(history[2].error or "") == HISTORY_ERROR_MAX_LENGTH
        assert (history[3].came_from, history[3].owner, history[3].started_at) == (
            S.FAILED,
            None,
            None,
        )
        move(Transition(to=S.STARTED, expect=only(S.QUEUED), owner="w:4"))
        assert len(move(Transition(to=S.SUCCEEDED, expect=only(S.STARTED)))) == 4

        # bounded: the oldest entries go
        assert store.create(started("job-2", "w:1"))
        for _ in range(HISTORY_KEPT + 3):
            assert store.transition("job-2", Transition(to=S.RETRYING, expect=only(S.STARTED)))
            assert store.transition("job-2", claim("w:1"))
        got = store.get("job-2")
        assert got is not None and len(got.history) == HISTORY_KEPT
        assert got.history[-1].attempt == HISTORY_KEPT + 3

    def test_a_long_error_is_bounded(self, store: Store) -> None:
        assert store.create(started("job-1", "w:1"))
        error = "Traceback (most recent call last):\n" + "x" * 50_000 + "\nValueError: the cause"
        change = Transition(to=S.FAILED, expect=only(S.STARTED), error=error)
        assert store.transition("job-1", change)
        got = store.get("job-1")
        assert got is not None and got.error is not None
        assert len(got.error) == ERROR_MAX_LENGTH
        assert got.error.startswith("Traceback") and got.error.endswith("ValueError: the cause")
        assert "characters cut" in got.error

    def test_delete_is_compare_and_set(self, store: Store) -> None:
        assert store.create(job("job-1"))
        assert not store.delete("job-1", only(S.STARTED))
        assert not store.delete("job-1", only(S.QUEUED), "w:1")
        assert store.get("job-1") is not None
        assert store.delete("job-1", only(S.QUEUED), None)
        assert store.get("job-1") is None
        assert not store.delete("job-1", only(S.QUEUED))

        assert store.create(started("job-2", "w:1"))
        assert not store.delete("job-2", only(S.STARTED), "w:2")
        assert store.delete("job-2", only(S.STARTED), "w:1")
        assert store.count(JobQuery()) == 0

    def test_the_generation_is_compared_and_set_by_transition_and_delete(
        self, store: Store
    ) -> None:
        """Fencing generations (invariant 2): a move that expects another generation changes
        nothing; a republish's move raises it, with the recovery times it was given."""
        assert store.create(job("job-1", generation=2))
        stale = Transition(to=S.QUEUED, expect=only(S.QUEUED), expect_generation=1, generation=2)
        assert not store.transition("job-1", stale)
        raised = Transition(
            to=S.QUEUED,
            expect=only(S.QUEUED),
            expect_generation=2,
            generation=3,
            reason="recovery",
            recent_recoveries=(100.0, 200.0),
        )
        assert store.transition("job-1", raised)
        record = store.get("job-1")
        assert record is not None
        assert (record.generation, record.recoveries, record.recent_recoveries) == (
            3,
            1,
            (100.0, 200.0),
        )
        assert store.transition("job-1", claim("w:1"))  # no generation asked: any
        assert not store.delete("job-1", only(S.STARTED), "w:1", expect_generation=2)
        assert store.delete("job-1", only(S.STARTED), "w:1", expect_generation=3)

    # -- unique keys ---------------------------------------------------------------------------

    @pytest.mark.parametrize("first", [S.STAGED, S.QUEUED])
    def test_an_unfinished_job_holds_its_unique_key_through_every_move(
        self, store: Store, first: JobState
    ) -> None:
        assert store.create(job("a", unique_key="charge:1", state=first))
        assert store.create(job("other", unique_key="charge:2"))  # another key is free
        assert store.create(job("plain"))  # no key: nothing to hold
        assert refused_by(store, job("b", unique_key="charge:1")) == "a"
        for move in UNFINISHED_MOVES:
            assert store.transition("a", move)
            assert refused_by(store, job("b", unique_key="charge:1", state=S.STAGED)) == "a"
        a = store.get("a")
        assert a is not None and a.unique_key == "charge:1"
        assert store.count(JobQuery()) == 3

    @pytest.mark.parametrize("ending", ENDINGS, ids=lambda t: t.to.value)
    def test_the_move_that_ends_a_job_frees_its_key(self, store: Store, ending: Transition) -> None:
        assert store.create(started("a", "w:1", unique_key="k"))
        assert refused_by(store, job("b", unique_key="k")) == "a"
        assert store.transition("a", ending)
        assert store.create(job("b", unique_key="k"))
        a = store.get("a")
        assert a is not None and (a.state, a.unique_key) == (ending.to, "k")  # kept, to be seen
        assert refused_by(store, job("c", unique_key="k")) == "b"

    def test_deleting_a_job_frees_its_key_and_a_lost_compare_does_not(self, store: Store) -> None:
        assert store.create(job("a", unique_key="k"))
        assert not store.delete("a", only(S.STARTED))
        assert refused_by(store, job("b", unique_key="k")) == "a"
        assert store.delete("a", only(S.QUEUED))
        assert store.create(job("b", unique_key="k"))

    def test_a_lost_compare_and_set_frees_nothing(self, store: Store) -> None:
        assert store.create(started("a", "w:1", unique_key="k"))
        finish = Transition(to=S.SUCCEEDED, expect=only(S.STARTED), expect_owner="w:other")
        assert not store.transition("a", finish)
        assert refused_by(store, job("b", unique_key="k")) == "a"

    def test_a_recovered_job_keeps_its_key_and_a_restarted_one_does_not_take_it_back(
        self,
        store: Store,
    ) -> None:
        """A recovery (or a person's restart of a job whose owner died) is the same job going on:
        it keeps the key. A restart of a job that ended runs it again without the key, which a
        newer job may hold by then."""
        assert store.create(started("a", "w:1", unique_key="k"))
        recover = Transition(
            to=S.QUEUED,
            expect=only(S.STARTED),
            expect_owner="w:1",
            expect_generation=0,
            generation=1,
            reason="recovery",
        )
        assert store.transition("a", recover)
        assert refused_by(store, job("b", unique_key="k")) == "a"
        assert store.transition("a", claim("w:2"))
        rescue = Transition(to=S.QUEUED, expect=only(S.STARTED), generation=2, reason="restart")
        assert store.transition("a", rescue)
        assert refused_by(store, job("b", unique_key="k")) == "a"

        assert store.transition("a", claim("w:1"))
        assert store.transition("a", ENDINGS[1])
        assert store.create(job("b", unique_key="k"))
        restart = Transition(to=S.QUEUED, expect=only(S.FAILED), generation=3, reason="restart")
        assert store.transition("a", restart)
        assert store.transition("a", claim("w:4"))
        assert refused_by(store, job("c", unique_key="k")) == "b"
        assert store.transition("a", Transition(to=S.SUCCEEDED, expect=only(S.STARTED)))
        assert refused_by(store, job("c", unique_key="k")) == "b"  # a's end frees nothing of b's

    def test_a_second_create_of_the_same_job_is_a_duplicate_not_a_held_key(
        self, store: Store
    ) -> None:
        assert store.create(job("a", unique_key="k"))
        assert not store.create(job("a", unique_key="k"))
        assert not store.create(job("a", unique_key="other"))
        assert store.create(job("b", unique_key="other"))
        assert store.create(job("c"))
        assert not store.create(job("c", unique_key="k"))  # its id is taken: that answer first

    def test_staged_jobs_hold_their_keys_until_refused(self, store: Store) -> None:
        for name in ("a", "b"):
            assert store.create(job(name, unique_key=f"k-{name}", state=S.STAGED))
        with store.staged_batch(limit=10) as batch:
            batch.mark_queued(["a"])
            batch.mark_refused({"b": "no such queue"})
        assert refused_by(store, job("c", unique_key="k-a")) == "a"
        assert store.create(job("c", unique_key="k-b"))  # b failed: its key is free

    def test_a_unique_key_is_bounded(self, store: Store) -> None:
        for bad in ("", "k" * 256):
            with pytest.raises(ConfigError, match="unique key"):
                job("a", unique_key=bad)
        assert store.create(job("a", unique_key="k" * 255))

    def test_a_heartbeat_carries_what_the_instance_holds_and_counted(self, store: Store) -> None:
        beat = Instance(name="w", nonce="1", holding=(("job-1", 0), ("job-2", 4)), stats={"x": 2})
        store.heartbeat(beat)
        (found_instance,) = store.instances(ttl=30)
        assert found_instance.holding == (("job-1", 0), ("job-2", 4))
        assert dict(found_instance.stats) == {"x": 2}
        store.heartbeat(dataclasses.replace(beat, holding=(), stats={"x": 3}))
        (again,) = store.instances(ttl=30)
        assert again.holding == () and dict(again.stats) == {"x": 3}

    # -- queries -------------------------------------------------------------------------------

    def test_query_filters_narrow_and_count_agrees(self, store: Store) -> None:
        for record in [
            job("a", state=S.QUEUED, queue="q1", name="n1", system="celery"),
            started("b", "w:1", queue="q1", name="n2", system="rq"),
            job("c", state=S.SUCCEEDED, owner="w:2", queue="q2", name="n1", system="celery"),
            job("d", state=S.FAILED, owner="w:1", queue="q2", name="n2", system="dramatiq"),
            job("e", state=S.STAGED, queue="q3", name="n3", recoveries=1),
        ]:
            assert store.create(record)
        assert found(store) == {"a", "b", "c", "d", "e"}
        assert found(store, states={S.QUEUED, S.STARTED}) == {"a", "b"}
        assert found(store, states={"failed"}) == {"d"}
        assert found(store, queues={"q2"}) == {"c", "d"}
        assert found(store, names={"n1"}) == {"a", "c"}
        assert found(store, systems={"rq", "dramatiq"}) == {"b", "d"}
        assert found(store, systems={"python"}) == {"e"}
        assert found(store, ids={"a", "e", "missing"}) == {"a", "e"}
        assert found(store, owners={"w:1"}) == {"b", "d"}
        assert found(store, queues={"q1"}, names={"n2"}) == {"b"}
        assert found(store, queues={"q3"}, states={S.QUEUED}) == set()
        assert found(store, queues={"Q1"}) == set()  # names are case-sensitive
        assert found(store, recovered=True) == {"e"}

    def test_the_unique_key_filter_selects_every_job_published_with_a_key(
        self, store: Store
    ) -> None:
        """Finished jobs included (a key's history), the holder among them; exact match."""
        assert store.create(started("a", "w:1", unique_key="charge:1", args=["x"]))
        assert store.transition("a", Transition(to=S.SUCCEEDED, expect=frozenset({S.STARTED})))
        assert store.create(job("b", unique_key="charge:1", queue="q2"))  # a's end freed it
        assert store.create(job("c", unique_key="charge:2", args=["x"]))
        assert store.create(job("d", args=["x"]))  # no key
        assert found(store, unique_keys={"charge:1"}) == {"a", "b"}
        assert found(store, unique_keys={"charge:1", "charge:2"}) == {"a", "b", "c"}
        assert found(store, unique_keys={"charge:1"}, states={S.QUEUED}) == {"b"}
        assert found(store, unique_keys={"charge:1"}, queues={"q2"}) == {"b"}
        assert found(store, unique_keys={"charge:1"}, ids={"a", "c", "d"}) == {"a"}
        assert found(store, unique_keys={"charge:1"}, match="x") == {"a"}
        assert found(store, unique_keys={"charge:"}) == set()  # no prefix match
        assert found(store, unique_keys={"CHARGE:1"}) == set()
        for bad in ("", "k" * 256):
            with pytest.raises(ConfigError, match="unique key"):
                JobQuery(unique_keys=frozenset({bad}))

    def test_older_than_measures_time_in_the_current_state(self, store: Store) -> None:
        now = store.now()
        assert store.create(job("old", queued_at=dt(now - 100)))
        assert store.create(job("fresh"))
        assert found(store, older_than=50) == {"old"}
        assert found(store, older_than=1000) == set()
        assert found(store, older_than=50, states={S.STARTED}) == set()
        assert store.transition("old", claim("w:1"))  # entered a new state just now
        assert found(store, older_than=50) == set()

    def test_newer_than_is_the_opposite_bound(self, store: Store) -> None:
        now = store.now()
        assert store.create(job("old", queued_at=dt(now - 100)))
        assert store.create(job("fresh"))
        assert found(store, newer_than=50) == {"fresh"}
        assert found(store, newer_than=1000) == {"old", "fresh"}
        assert found(store, newer_than=1000, older_than=50) == {"old"}
        assert found(store, newer_than=0) == set()

    @pytest.fixture
    def searchable(self, store: Store) -> Store:
        for record in [
            job("pct", args=["100%"]),
            job("pct-decoy", args=["1000"]),
            job("und", args=["a_b"]),
            job("und-decoy", args=["axb"]),
            job("sq", kwargs={"name": "O'Brien"}),
            job("dq", args=['say "hi"']),
            job("bs", args=["C:\\path\\to"]),
            job("uni", tags={"city": "Zoë 東京 🚀"}),
            job("upper", args=["ZOË"]),
            job("num", args=[12345, 6.5]),
            job("ctl", kwargs={"raw": "a\x00b\x01c\nd"}),
        ]:
            assert store.create(record)
        return store

    @pytest.mark.parametrize(
        ("needle", "expected"),
        [
            ("0%", {"pct"}),
            ("%", {"pct"}),
            ("a_b", {"und"}),
            ("_", {"und"}),
            ("O'Brien", {"sq"}),
            ("'", {"sq"}),
            ('"name": "O\'Brien"', {"sq"}),  # a JSON fragment
            ('say "hi"', {"dq"}),  # the raw value of a string argument
            ('\\"hi\\"', {"dq"}),  # the same as the stored JSON has it
            ("C:\\path\\to", {"bs"}),
            ("path\\to", {"bs"}),
            ("\\", {"bs", "dq", "ctl"}),  # a backslash is in these stored texts
            ("Zoë 東京 🚀", {"uni"}),
            ("東京", {"uni"}),
            ("🚀", {"uni"}),
            ("zoë", set()),  # case-sensitive
            ("ZOË", {"upper"}),
            ("12345, 6.5", {"num"}),
            ("\x00", {"ctl"}),  # control characters, as typed (PostgreSQL refuses a raw NUL)
            ("b\x01c\nd", {"ctl"}),
            ("\\u0000b", {"ctl"}),  # and as the stored JSON escapes them
            ("no such text", set()),
        ],
    )
    def test_match_is_a_literal_case_sensitive_substring(
        self, searchable: Store, needle: str, expected: set[str]
    ) -> None:
        assert found(searchable, match=needle) == expected

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(
        prefix=_search_text, needle=st.text(_special, min_size=1, max_size=6), suffix=_search_text
    )
    def test_any_text_as_match_finds_the_argument_that_contains_it(
        self, store: Store, prefix: str, needle: str, suffix: str
    ) -> None:
        job_id = f"h-{next(_example_ids)}"
        assert store.create(job(job_id, args=[prefix + needle + suffix], kwargs={"k": needle}))
        assert job_id in found(store, match=needle)

    def test_match_narrows_with_other_filters(self, searchable: Store) -> None:
        assert searchable.transition("pct", claim("w:1"))
        assert found(searchable, match="%", states={S.QUEUED}) == set()
        assert found(searchable, match="%", owners={"w:1"}) == {"pct"}

    def test_match_on_large_arguments(self, store: Store) -> None:
        blob = "a" * 1_000_000
        assert store.create(job("big", args=[blob], kwargs={"tail": blob + "Zoë-end%"}))
        assert store.create(job("small", args=["a" * 10]))
        assert found(store, match="Zoë-end%") == {"big"}
        assert found(store, match="a" * 20 + "Zoë") == {"big"}
        got = store.get("big")
        assert got is not None and got.args == [blob] and got.kwargs["tail"].endswith("end%")

    def test_regex_match(self, store: Store) -> None:
        assert store.create(job("r1", args=["order-123"]))
        assert store.create(job("r2", args=["order-12x"]))
        assert store.create(job("r3", kwargs={"ref": "ORDER-999"}))
        assert found(store, match="order-[0-9]{3}", regex=True) == {"r1"}
        assert found(store, match="ORDER-[0-9]+", regex=True) == {"r3"}
        assert found(store, match="(123|999)", regex=True) == {"r1", "r3"}
        assert found(store, match='^\\["order-12x"\\]$', regex=True) == {"r2"}
        assert found(store, match="order-1", regex=False) == {"r1", "r2"}
        assert found(store, match="order-[0-9]", regex=False) == set()

    def test_keyset_paging_over_many_rows_misses_and_repeats_nothing(self, store: Store) -> None:
        total = 20_000
        base = float(int(store.now())) - 100_000.0
        created: dict[str, float] = {}
        records = []
        for i in range(total):
            # Fifty jobs share each created_at, and ids are shuffled against insertion order.
            job_id = f"job-{(i * 7919) % total:05d}"
            created[job_id] = base + (i // 50) * 0.5
            state = S.QUEUED if i % 2 else S.SUCCEEDED
            records.append(
                job(job_id, state=state, created_at=dt(created[job_id]), queued_at=dt(base))
            )
        self.bulk_create(store, records)
        expected = sorted(created, key=lambda i: (created[i], i), reverse=True)

        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = store.query(JobQuery(), limit=997, cursor=cursor)
            pages += 1
            seen.extend(record.id for record in page.items)
            if page.next_cursor is None:
                break
            assert len(page.items) == 997
            cursor = page.next_cursor
        assert pages == total // 997 + 1
        assert seen == expected

        queued_ids = {r.id for r in records if r.state is S.QUEUED}
        queued = [
            r.id for r in store.iter_jobs(JobQuery(states=frozenset({S.QUEUED})), page_size=1000)
        ]
        assert queued == [i for i in expected if i in queued_ids]
        assert store.count(JobQuery(states=frozenset({S.QUEUED}))) == total // 2

    def test_paging_through_ties_with_tiny_pages(self, store: Store) -> None:
        moment = dt(store.now() - 10)
        for n in range(7):
            assert store.create(job(f"tie-{n}", created_at=moment))
        assert store.create(job("newer"))
        seen: list[str] = []
        cursor: str | None = None
        while True:
            page = store.query(JobQuery(), limit=2, cursor=cursor)
            seen.extend(r.id for r in page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == ["newer", *(f"tie-{n}" for n in reversed(range(7)))]
        last = store.query(JobQuery(), limit=8)
        assert len(last.items) == 8 and last.next_cursor is None

    def test_page_size_and_cursor_are_validated(self, store: Store) -> None:
        with pytest.raises(ConfigError):
            store.query(JobQuery(), limit=0)
        with pytest.raises(ConfigError):
            store.query(JobQuery(), limit=10, cursor="not-a-cursor!")
        with pytest.raises(ConfigError):
            store.durations(JobQuery(), "started", limit=0)
        with pytest.raises(ConfigError):
            store.durations(JobQuery(), "finished", limit=10)  # type: ignore[arg-type]

    # -- aggregates ----------------------------------------------------------------------------

    def test_queue_stats_counts_and_lag(self, store: Store) -> None:
        assert store.queue_stats() == []
        now = store.now()
        for record in [
            job("a1", queue="alpha", queued_at=dt(now - 100)),
            job("a2", queue="alpha", queued_at=dt(now - 50)),
            job("a3", queue="alpha", state=S.RETRYING, queued_at=dt(now - 500)),
            job("a4", queue="alpha", state=S.STAGED, staged_at=dt(now - 30)),
            started("a5", "w:1", queue="alpha", queued_at=dt(now - 900)),
            job("a6", queue="alpha", state=S.SUCCEEDED),
            job("a7", queue="alpha", state=S.SUCCEEDED),
            job("b1", queue="beta", state=S.SUCCEEDED),
            job("b2", queue="beta", state=S.FAILED),
        ]:
            assert store.create(record)
        after = store.now()
        alpha, beta = store.queue_stats()
        assert alpha.queue == "alpha"
        assert alpha.counts == {
            S.QUEUED: 2,
            S.RETRYING: 1,
            S.STAGED: 1,
            S.STARTED: 1,
            S.SUCCEEDED: 2,
        }
        assert alpha.total == 7
        assert alpha.oldest_queued_age is not None and alpha.oldest_staged_age is not None
        # (less a hair: ``now - 100`` was rounded to a double when it was stored)
        assert 100 - 1e-3 <= alpha.oldest_queued_age <= 100 + (after - now) + CLOCK_SLACK
        assert 30 - 1e-3 <= alpha.oldest_staged_age <= 30 + (after - now) + CLOCK_SLACK
        assert beta.queue == "beta"
        assert beta.counts == {S.SUCCEEDED: 1, S.FAILED: 1}
        assert (beta.oldest_queued_age, beta.oldest_staged_age) == (None, None)

    @pytest.fixture
    def finished_jobs(self, store: Store) -> float:
        """20 succeeded ``fast`` jobs waiting i/4 s and running i s (i = 1..20), one ``slow``, one
        that never recorded a start, a failed one and an unfinished one. Returns the base time."""
        base = float(int(store.now())) - 100_000.0
        for i in range(1, 21):
            queued = base + 100 * i
            assert store.create(
                job(
                    f"fast-{i:02d}",
                    name="fast",
                    state=S.SUCCEEDED,
                    created_at=dt(queued),
                    queued_at=dt(queued),
                    started_at=dt(queued + i / 4),
                    finished_at=dt(queued + i / 4 + i),
                )
            )
        records = [
            job(
                "slow",
                name="slow",
                state=S.SUCCEEDED,
                created_at=dt(base),
                queued_at=dt(base),
                started_at=dt(base + 0.5),
                finished_at=dt(base + 1000.5),
            ),
            job(
                "nostart",
                name="nostart",
                state=S.SUCCEEDED,
                created_at=dt(base),
                queued_at=dt(base),
                finished_at=dt(base + 7),
            ),
            job(
                "fast-failed",
                name="fast",
                state=S.FAILED,
                created_at=dt(base),
                queued_at=dt(base),
                started_at=dt(base),
                finished_at=dt(base + 5000),
            ),
            started("fast-running", "w:1", name="fast", started_at=dt(base)),
        ]
        for record in records:
            assert store.create(record)
        return base

    def test_durations_pages_through_finished_jobs(
        self, store: Store, finished_jobs: float
    ) -> None:
        seen: list[tuple[str, float]] = []
        cursor: str | None = None
        while True:
            page = store.durations(
                JobQuery(names=frozenset({"fast"})), "started", limit=7, cursor=cursor
            )
            seen.extend((record.id, seconds) for record, seconds in page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == [(f"fast-{i:02d}", float(i)) for i in range(20, 0, -1)]

        page = store.durations(JobQuery(names=frozenset({"fast"})), "queued", limit=100)
        assert [(r.id, s) for r, s in page.items] == [
            (f"fast-{i:02d}", i / 4 + i) for i in range(20, 0, -1)
        ]
        # A job with no recorded start has a queued duration only.
        queued = store.durations(JobQuery(ids=frozenset({"nostart"})), "queued", limit=10)
        assert [(r.id, s) for r, s in queued.items] == [("nostart", 7.0)]
        assert (
            store.durations(JobQuery(ids=frozenset({"nostart"})), "started", limit=10).items == []
        )
        # Other final states only when asked for; unfinished jobs never.
        failed = store.durations(
            JobQuery(states=frozenset({S.FAILED, S.STARTED})), "started", limit=10
        )
        assert [(r.id, s) for r, s in failed.items] == [("fast-failed", 5000.0)]

    def test_duration_stats_nearest_rank(self, store: Store, finished_jobs: float) -> None:
        assert store.duration_stats(JobQuery(), "started") == [
            DurationStats("fast", 20, 10.0, 19.0, 20.0),
            DurationStats("slow", 1, 1000.0, 1000.0, 1000.0),
        ]
        assert store.duration_stats(JobQuery(), "queued") == [
            DurationStats("fast", 20, 12.5, 23.75, 25.0),
            DurationStats("nostart", 1, 7.0, 7.0, 7.0),
            DurationStats("slow", 1, 1000.5, 1000.5, 1000.5),
        ]
        assert store.duration_stats(JobQuery(states=frozenset({S.FAILED})), "started") == [
            DurationStats("fast", 1, 5000.0, 5000.0, 5000.0)
        ]
        assert store.duration_stats(JobQuery(match="no such text"), "started") == []

    def test_prune_deletes_only_old_finished_jobs(self, store: Store) -> None:
        now = store.now()
        old = dt(now - 10_000)
        pending = [
            job("staged", state=S.STAGED, staged_at=old),
            job("queued", queued_at=old),
            started("started", "w:1", started_at=old),
            job("retrying", state=S.RETRYING, updated_at=old),
        ]
        finished = [
            *(job(f"ok-{n}", state=S.SUCCEEDED, finished_at=old) for n in range(3)),
            job("failed", state=S.FAILED, finished_at=old),
            job("dead", state=S.DEAD, finished_at=old),
            job("cancelled", state=S.CANCELLED, finished_at=old),
        ]
        for record in [*pending, *finished, job("ok-fresh", state=S.SUCCEEDED)]:
            assert store.create(record)

        assert (
            store.prune(JobQuery(states=frozenset({S.QUEUED, S.STARTED, S.STAGED}), older_than=60))
            == 0
        )
        assert (
            store.prune(JobQuery(states=frozenset({S.SUCCEEDED}), older_than=60), batch_size=2) == 3
        )
        assert "ok-fresh" in all_ids(store)
        assert store.prune(JobQuery(older_than=60), batch_size=1) == 3
        assert all_ids(store) == {"staged", "queued", "started", "retrying", "ok-fresh"}
        assert store.prune(JobQuery()) == 1
        assert store.prune(JobQuery()) == 0
        assert all_ids(store) == ids(pending)
        with pytest.raises(ConfigError):
            store.prune(JobQuery(), batch_size=0)

    # -- instances -----------------------------------------------------------------------------

    def test_heartbeat_registers_and_refreshes_an_instance(self, store: Store) -> None:
        worker = Instance(
            name="worker-a", nonce="n1", hostname="host-a", pid=123, queues=("q", "m")
        )
        before = store.now()
        store.heartbeat(worker)
        [got] = store.instances(ttl=30)
        assert (got.id, got.hostname, got.pid, got.queues) == (
            "worker-a:n1",
            "host-a",
            123,
            ("q", "m"),
        )
        assert got.state is InstanceState.RUNNING and got.alive
        assert got.heartbeat_age is not None and 0 <= got.heartbeat_age < CLOCK_SLACK
        assert abs(epoch(got.heartbeat_at) - before) < CLOCK_SLACK
        assert got.started_at == got.heartbeat_at

        draining = dataclasses.replace(worker, state=InstanceState.DRAINING, queues=("q",))
        store.heartbeat(draining)
        [again] = store.instances(ttl=30)
        assert (again.state, again.queues, again.started_at) == (
            InstanceState.DRAINING,
            ("q",),
            got.started_at,
        )
        assert epoch(again.heartbeat_at) >= epoch(got.heartbeat_at)

        other = Instance(name="worker-0", nonce="n2")
        store.heartbeat(other)
        assert [i.id for i in store.instances(ttl=30)] == ["worker-0:n2", "worker-a:n1"]
        assert store.is_alive("worker-a:n1", ttl=30)
        assert not store.is_alive("nobody:x", ttl=30)

        assert store.deregister("worker-a:n1")
        assert not store.deregister("worker-a:n1")
        assert [i.id for i in store.instances(ttl=30)] == ["worker-0:n2"]
        assert not store.is_alive("worker-a:n1", ttl=30)

    def test_a_silent_instance_is_dead_after_its_ttl(self, store: Store) -> None:
        worker = Instance(name="worker-a", nonce="n1")
        store.heartbeat(worker)
        assert store.is_alive(worker.id, ttl=30)
        wait_for("instance silent past ttl", lambda: not store.is_alive(worker.id, ttl=0.2), 10)
        [got] = store.instances(ttl=0.2)
        assert not got.alive and got.heartbeat_age is not None and got.heartbeat_age > 0.2
        [same] = store.instances(ttl=3600)
        assert same.alive

    def test_orphans_are_started_jobs_of_gone_or_silent_owners(self, store: Store) -> None:
        live = Instance(name="live", nonce="1")
        gone = Instance(name="gone", nonce="1")
        store.heartbeat(live)
        store.heartbeat(gone)
        assert store.deregister(gone.id)
        now = store.now()
        for record in [
            started("mine", live.id, started_at=dt(now - 3)),
            started("ghost", "ghost:never-beat", started_at=dt(now - 2)),
            started("left", gone.id, started_at=dt(now - 1)),
            job("waiting"),
            job("done", state=S.SUCCEEDED, owner="ghost:never-beat"),
        ]:
            assert store.create(record)
        assert [r.id for r in store.orphans(ttl=30)] == ["ghost", "left"]
        assert [r.id for r in store.orphans(ttl=30, limit=1)] == ["ghost"]

        def silent() -> bool:
            return [r.id for r in store.orphans(ttl=0.2)] == ["mine", "ghost", "left"]

        wait_for("the silent owner's job is an orphan", silent, 10)
        store.heartbeat(live)
        assert [r.id for r in store.orphans(ttl=30)] == ["ghost", "left"]

    # -- locks ---------------------------------------------------------------------------------

    def test_lock_is_held_by_one_token(self, store: Store) -> None:
        assert store.acquire_lock("recovery", "A", ttl=30)
        assert not store.acquire_lock("recovery", "B", ttl=30)
        assert store.acquire_lock("recovery", "A", ttl=30), "the holder renews"
        assert store.acquire_lock("relay", "B", ttl=30), "locks are independent"
        assert not store.release_lock("recovery", "B")
        assert not store.acquire_lock("recovery", "B", ttl=30)
        assert store.release_lock("recovery", "A")
        assert not store.release_lock("recovery", "A")
        assert store.acquire_lock("recovery", "B", ttl=30)
        assert not store.release_lock("missing", "B")

    def test_an_expired_lock_is_taken_by_another(self, store: Store) -> None:
        assert store.acquire_lock("sweep", "A", ttl=0.2)
        wait_for("lock expiry", lambda: store.acquire_lock("sweep", "B", ttl=30), 10)
        assert not store.acquire_lock("sweep", "A", ttl=30), "the old holder lost it"
        assert not store.release_lock("sweep", "A")
        assert store.release_lock("sweep", "B")
