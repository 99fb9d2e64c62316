"""The sweep's decisions that rest on facts recorded in the ledger: generations, what a dead
instance held, the windowed poison-pill cap, the ledger's uptime and each job's orphan policy.
Real SQL stores (SQLite and PostgreSQL); the ``publish`` seam records what would be sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobledger.model import (
    ORPHAN_OPTION,
    Instance,
    JobRecord,
    JobState,
    OrphanPolicy,
    Republish,
)
from jobledger.recovery import Outcome, Recovery
from jobledger.stores.base import Transition
from jobledger.stores.schema import instances
from jobledger.stores.sql import SQLStore
from ledgerdb import database_url, empty_sql_store

TTL = 5.0
S = JobState


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStore]:
    s = empty_sql_store(database_url(request.param, tmp_path))
    yield s
    s.close()


class Sent:
    """What the sweep published: (id, generation, reason), with the ledger's state then."""

    def __init__(self, store: SQLStore) -> None:
        self.store = store
        self.messages: list[tuple[str, int, Republish]] = []

    def __call__(self, record: JobRecord, *, reason: Republish) -> None:
        current = self.store.get(record.id)
        assert current is not None and current.generation == record.generation - 1  # first
        self.messages.append((record.id, record.generation, reason))


def sweeper(store: SQLStore, sent: Sent, **kw: object) -> Recovery:
    options: dict[str, object] = {"ttl": TTL, "max_recoveries": 3, "recovery_window": 3600.0}
    options.update(kw)
    return Recovery(store, publish=sent, **options)  # type: ignore[arg-type]


def dead_instance(store: SQLStore, name: str, holding: tuple[tuple[str, int], ...] = ()) -> str:
    """An instance whose last beat is older than the TTL (its heartbeat row backdated)."""
    instance = Instance(name=name, nonce="1", holding=holding)
    store.heartbeat(instance)
    with store.engine.begin() as conn:
        conn.execute(
            instances.update()
            .where(instances.c.id == instance.id)
            .values(heartbeat_at=instances.c.heartbeat_at - 10 * TTL)
        )
    return instance.id


def orphaned(store: SQLStore, job_id: str, owner: str, **fields: object) -> None:
    """A job started by ``owner`` (a dead instance)."""
    record = JobRecord(id=job_id, name="t", state=S.STARTED, owner=owner, **fields)  # type: ignore[arg-type]
    assert store.create(record)


def test_a_recovery_publishes_the_next_generation_and_raises_the_records(store: SQLStore) -> None:
    owner = dead_instance(store, "gone")
    orphaned(store, "j", owner, generation=4)
    sent = Sent(store)
    assert sweeper(store, sent).sweep_once().outcomes == {"j": Outcome.REQUEUED}
    assert sent.messages == [("j", 5, Republish.RECOVERY)]
    record = store.get("j")
    assert record is not None
    assert (record.state, record.generation, record.recoveries) == (S.QUEUED, 5, 1)
    assert len(record.recent_recoveries) == 1


def test_jobs_a_dead_instance_received_but_never_started_are_put_back(store: SQLStore) -> None:
    """Prefetched: still queued at the generation it was delivered with. A job republished
    since (generation moved), one started elsewhere, and a live instance's holdings stay."""
    for job_id, generation in (("held", 0), ("moved-on", 2), ("started", 0), ("live-held", 0)):
        assert store.create(JobRecord(id=job_id, name="t", generation=generation))
    live = Instance(name="live", nonce="1", holding=(("live-held", 0),))
    store.heartbeat(live)
    assert store.transition(
        "started", Transition(to=S.STARTED, expect=frozenset({S.QUEUED}), owner=live.id)
    )
    dead_instance(store, "gone", holding=(("held", 0), ("moved-on", 1), ("started", 0)))
    sent = Sent(store)
    report = sweeper(store, sent).sweep_once()
    assert report.outcomes == {"held": Outcome.REQUEUED}
    assert sent.messages == [("held", 1, Republish.REQUEUE)]
    held = store.get("held")
    assert held is not None and (held.state, held.generation) == (S.QUEUED, 1)
    # the next sweep finds the holding stale (generation 1 now): nothing twice
    assert sweeper(store, sent).sweep_once().outcomes == {}


def test_no_instance_is_judged_dead_before_the_ledger_was_up_a_full_ttl(store: SQLStore) -> None:
    owner = dead_instance(store, "gone")
    orphaned(store, "j", owner)
    sent = Sent(store)
    up_for = [TTL - 0.1]
    sweep = sweeper(store, sent, ledger_up_for=lambda: up_for[0])
    report = sweep.sweep_once()
    assert report.waiting and report.outcomes == {} and sent.messages == []
    up_for[0] = TTL
    assert sweep.sweep_once().outcomes == {"j": Outcome.REQUEUED}


def test_the_cap_counts_only_recoveries_within_the_window(store: SQLStore) -> None:
    owner = dead_instance(store, "gone")
    now = store.now()
    long_ago = (now - 7200, now - 7100, now - 7000)
    orphaned(
        store,
        "old-pill",
        owner,
        recoveries=3,
        recent_recoveries=long_ago,
    )
    orphaned(
        store,
        "new-pill",
        owner,
        recoveries=4,
        recent_recoveries=(now - 7200, now - 60, now - 30, now - 10),
    )
    report = sweeper(store, Sent(store)).sweep_once()
    assert report.outcomes == {"old-pill": Outcome.REQUEUED, "new-pill": Outcome.DEAD}


@pytest.mark.parametrize(
    ("policy", "state", "outcome"),
    [("fail", S.FAILED, Outcome.FAILED), ("discard", S.CANCELLED, Outcome.DISCARDED)],
)
def test_a_task_that_must_not_run_twice_is_settled_with_the_reason_not_republished(
    store: SQLStore, policy: str, state: JobState, outcome: Outcome
) -> None:
    owner = dead_instance(store, "gone")
    orphaned(store, "charge", owner, options={ORPHAN_OPTION: policy})
    sent = Sent(store)
    assert sweeper(store, sent).sweep_once().outcomes == {"charge": outcome}
    assert sent.messages == []
    settled = store.get("charge")
    assert settled is not None and settled.state is state
    assert settled.error is not None and f"on_orphan={policy}" in settled.error


def test_the_recoverers_default_policy_applies_to_jobs_that_name_none(store: SQLStore) -> None:
    owner = dead_instance(store, "gone")
    orphaned(store, "plain", owner)
    orphaned(
        store,
        "says-requeue",
        owner,
        options={ORPHAN_OPTION: "requeue"},
    )
    orphaned(store, "garbled", owner, options={ORPHAN_OPTION: "?!"})
    sent = Sent(store)
    report = sweeper(store, sent, on_orphan=OrphanPolicy.FAIL).sweep_once()
    assert report.outcomes == {
        "plain": Outcome.FAILED,
        "says-requeue": Outcome.REQUEUED,
        "garbled": Outcome.FAILED,  # unreadable: the default, with a warning
    }


class Broker:
    """A queue probe: how many messages each queue holds ready (0 unless told), and no
    broker queue at all for a job routed through an exchange."""

    def __init__(self, **ready: int | None) -> None:
        self.ready = ready
        self.asked: list[str] = []

    def broker_queue(self, record: JobRecord) -> str | None:
        return None if record.options.get("exchange") else record.queue

    def ready_messages(self, queue: str) -> int | None:
        self.asked.append(queue)
        return self.ready.get(queue, 0)


def test_a_job_queued_in_an_empty_queue_at_two_sweeps_is_put_back(store: SQLStore) -> None:
    """Lost by the broker: two sightings, unmoved, not held by a live worker. Jobs of a queue
    the broker still holds messages for, of one it cannot count, routed where the probe
    cannot see, held by a live worker, or that moved between the sweeps stay."""
    for job_id, queue in (
        ("lost", "empty"),
        ("held", "empty"),
        ("busy-queue", "busy"),
        ("unknown", "opaque"),
        ("moves", "empty"),
    ):
        assert store.create(JobRecord(id=job_id, name="t", queue=queue))
    assert store.create(JobRecord(id="routed", name="t", queue="empty", options={"exchange": "x"}))
    store.heartbeat(Instance(name="live", nonce="1", holding=(("held", 0),)))
    sent = Sent(store)
    broker = Broker(busy=4, opaque=None)
    sweep = sweeper(store, sent, probe=lambda system: broker)
    assert sweep.sweep_once().outcomes == {}  # first sighting: a publish may be landing
    assert store.transition(  # a retry's move: not the same sighting any more
        "moves",
        Transition(to=S.QUEUED, expect=frozenset({S.QUEUED}), generation=0),
    )
    assert sweep.sweep_once().outcomes == {"lost": Outcome.REQUEUED}
    assert sent.messages == [("lost", 1, Republish.REQUEUE)]
    assert sweep.sweep_once().outcomes == {"moves": Outcome.REQUEUED}
    assert broker.asked.count("empty") == 3  # once per queue and sweep, not per job
    for stays in ("held", "busy-queue", "unknown", "routed"):
        record = store.get(stays)
        assert record is not None and record.generation == 0


def test_no_sweep_puts_back_a_job_whose_outcome_waits_in_a_journal(store: SQLStore) -> None:
    """It ran while the ledger was unreachable, on a worker that then died: its claim and
    success wait in a journal (read by ``journaled``), so neither the dead owner's started
    job, nor what a dead instance held, nor a queued job in an empty queue is put back."""
    owner = dead_instance(store, "gone", holding=(("held", 0),))
    orphaned(store, "orphan", owner)
    for job_id in ("held", "lost"):
        assert store.create(JobRecord(id=job_id, name="t", queue="empty"))
    sent = Sent(store)
    asked: list[set[str]] = []

    def journaled(job_ids: object) -> set[str]:
        asked.append(set(job_ids))  # type: ignore[call-overload]
        return {"orphan", "held", "lost"}

    sweep = sweeper(store, sent, probe=lambda system: Broker(), journaled=journaled)
    for _ in range(3):
        assert sweep.sweep_once().outcomes == {}
    assert sent.messages == []
    assert {"orphan", "held", "lost"} <= set().union(*asked)
    for job_id in ("orphan", "held", "lost"):
        record = store.get(job_id)
        assert record is not None and record.generation == 0
    # once the journal was replayed (nothing waits), the sweep does its work again
    sweep = sweeper(store, sent, probe=lambda system: Broker(), journaled=lambda ids: set())
    assert set(sweep.sweep_once().outcomes) == {"orphan", "held"}
