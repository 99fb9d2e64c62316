"""The orphan sweep: publish first, then compare-and-set; the lock; the poison-pill cap."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobledger.errors import PublishError
from jobledger.model import Instance, JobRecord, JobState, Republish
from jobledger.query import JobQuery
from jobledger.recovery import LOCK_NAME, Outcome, Recovery
from jobledger.runtime.maintenance import RecoveryLoop
from jobledger.stores.base import Transition
from jobledger.stores.sql import SQLStore
from ledgerdb import database_url, empty_sql_store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStore]:
    s = empty_sql_store(database_url(request.param, tmp_path))
    yield s
    s.close()


def started(
    store: SQLStore, job_id: str, owner: str, recoveries: int = 0, system: str = "test"
) -> None:
    record = JobRecord(
        id=job_id,
        name="t.work",
        system=system,
        state=JobState.STARTED,
        owner=owner,
        recoveries=recoveries,
        args=[1],
        kwargs={"k": "v"},
    )
    assert store.create(record)


class Recorder:
    """A publisher that checks invariant 1: the job is still started when it is published."""

    def __init__(self, store: SQLStore, fail: bool = False) -> None:
        self.store = store
        self.fail = fail
        self.published: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        if self.fail:
            raise PublishError("broker down (test)")
        current = self.store.get(record.id)
        assert current is not None and current.state is JobState.STARTED
        with self.lock:
            self.published.append(record.id)


def recovery(store: SQLStore, publish: Recorder, **kw: object) -> Recovery:
    options: dict[str, object] = {"ttl": 5.0, "max_recoveries": 3, "recovery_window": 3600.0}
    options.update(kw)
    return Recovery(store, publish=publish, **options)  # type: ignore[arg-type]


def test_orphans_are_published_then_queued_and_live_jobs_left(store: SQLStore) -> None:
    live = Instance(name="live", nonce="1")
    store.heartbeat(live)
    started(store, "orphan-1", "dead:0")
    started(store, "orphan-2", "dead:0")
    started(store, "running", live.id)
    publish = Recorder(store)
    report = recovery(store, publish).sweep_once()
    assert sorted(publish.published) == ["orphan-1", "orphan-2"]
    assert report.ids(Outcome.REQUEUED) == ["orphan-1", "orphan-2"]
    for job_id in ("orphan-1", "orphan-2"):
        job = store.get(job_id)
        assert job is not None
        assert job.state is JobState.QUEUED and job.owner is None
        assert job.recoveries == 1 and job.recovered_at is not None
    running = store.get("running")
    assert running is not None and running.state is JobState.STARTED


def test_over_the_cap_a_job_is_dead_not_requeued(store: SQLStore) -> None:
    started(store, "poison", "dead:0", recoveries=0)
    publish = Recorder(store)
    r = recovery(store, publish, max_recoveries=2)
    for _ in range(2):  # two recoveries allowed; each time the "worker" dies again
        assert r.sweep_once().outcomes == {"poison": Outcome.REQUEUED}
        store.transition(
            "poison",
            Transition(to=JobState.STARTED, expect=frozenset({JobState.QUEUED}), owner="dead:1"),
        )
    assert r.sweep_once().outcomes == {"poison": Outcome.DEAD}
    job = store.get("poison")
    assert job is not None and job.state is JobState.DEAD
    assert job.error is not None and "poison pill" in job.error
    assert publish.published == ["poison", "poison"]


def test_a_sweep_limited_to_its_systems_leaves_other_orphans_alone(store: SQLStore) -> None:
    started(store, "mine", "dead:0")
    started(store, "seed", "dead:0", system="http")  # from the supervisor's seed endpoints
    publish = Recorder(store)
    report = recovery(store, publish, systems={"test"}).sweep_once()
    assert report.outcomes == {"mine": Outcome.REQUEUED} and publish.published == ["mine"]
    seed = store.get("seed")
    assert seed is not None and seed.state is JobState.STARTED and seed.owner == "dead:0"


def test_a_failed_publish_leaves_the_job_started(store: SQLStore) -> None:
    started(store, "orphan", "dead:0")
    report = recovery(store, Recorder(store, fail=True)).sweep_once()
    assert report.outcomes == {"orphan": Outcome.PUBLISH_FAILED}
    job = store.get("orphan")
    assert job is not None and job.state is JobState.STARTED and job.recoveries == 0


def test_a_held_lock_keeps_a_second_sweeper_out(store: SQLStore) -> None:
    started(store, "orphan", "dead:0")
    assert store.acquire_lock(LOCK_NAME, "someone-else", 30)
    publish = Recorder(store)
    report = recovery(store, publish).sweep_once()
    assert report.locked_out and publish.published == []


def test_racing_recoverers_publish_each_orphan_once(store: SQLStore) -> None:
    for i in range(40):
        started(store, f"orphan-{i}", "dead:0")
    publish = Recorder(store)
    sweepers = [recovery(store, publish) for _ in range(4)]
    barrier = threading.Barrier(len(sweepers))

    def sweep(r: Recovery) -> None:
        barrier.wait()
        for _ in range(3):
            r.sweep_once()

    threads = [threading.Thread(target=sweep, args=(r,)) for r in sweepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    counts = Counter(publish.published)
    assert len(counts) == 40 and set(counts.values()) == {1}
    assert all(j.state is JobState.QUEUED for j in store.iter_jobs(JobQuery()))


def test_the_loop_sweeps_soon_after_start_and_periodically(store: SQLStore) -> None:
    started(store, "orphan", "dead:0")
    publish = Recorder(store)
    loop = RecoveryLoop(recovery(store, publish), interval=0.05, first_delay=0.01)
    loop.start()
    try:
        done = threading.Event()
        for _ in range(400):
            if loop.sweeps >= 3:
                done.set()
                break
            done.wait(0.01)
        assert done.is_set()
    finally:
        loop.stop()
    assert publish.published == ["orphan"]


def test_the_sweep_forgets_long_dead_instances_that_hold_nothing() -> None:
    from jobledger.recovery import PRUNE_AFTER_TTLS
    from jobledger.testing import ManualClock, MemoryStore

    clock = ManualClock()
    memory = MemoryStore(clock)
    for name in ("crashed", "holding", "recent", "live"):
        memory.heartbeat(Instance(name=name, nonce="1"))
    memory.create(JobRecord(id="held", name="t", state=JobState.STARTED, owner="holding:1"))
    clock.advance(PRUNE_AFTER_TTLS * 5.0 + 1)
    memory.heartbeat(Instance(name="live", nonce="1"))
    memory.heartbeat(Instance(name="recent", nonce="1"))
    clock.advance(6.0)  # "recent" is dead now, but only just
    memory.heartbeat(Instance(name="live", nonce="1"))
    publish = Recorder(memory, fail=True)  # type: ignore[arg-type]
    report = recovery(memory, publish).sweep_once()  # type: ignore[arg-type]
    assert report.outcomes == {"held": Outcome.PUBLISH_FAILED}  # still held by its dead owner
    assert report.pruned == ["crashed:1"]
    assert sorted(i.id for i in memory.instances(5.0)) == ["holding:1", "live:1", "recent:1"]
