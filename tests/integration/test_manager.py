"""The Manager on SQLite, PostgreSQL and MariaDB: the seed JobManager's listings, durations
against known timestamps, restart/cancel by ids, filter and age (with dry-run), and pruning.

Each test builds its Manager on a private :class:`Registry`, so no integration registered here
leaks into another test.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import select

from jobledger.config import Settings
from jobledger.errors import ConfigError, IntegrationMissing, JobNotFound, PublishError
from jobledger.integrations.base import KNOWN, Known, Registry
from jobledger.lifecycle import Lifecycle
from jobledger.manager import Manager
from jobledger.model import Instance, JobRecord, JobState, Republish
from jobledger.query import JobQuery
from jobledger.stores.schema import instances, jobs, locks
from jobledger.stores.sql import SQLStore

S = JobState
BASE = datetime(2024, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
LIVE = Instance(name="live", nonce="a1", hostname="h1", pid=1, queues=("default",))
GONE = Instance(name="gone", nonce="b2", hostname="h2", pid=2)


def at(seconds: float) -> datetime:
    return BASE + timedelta(seconds=seconds)


def ago(store: SQLStore, seconds: float) -> datetime:
    """A moment ``seconds`` before now on the database's clock."""
    return datetime.fromtimestamp(store.now() - seconds, tz=timezone.utc)


@dataclass
class Recorder:
    """An integration whose broker is a list; it notes the ledger's state at each publish."""

    store: SQLStore
    system: str = "celery"
    refuse: set[str] = field(default_factory=set)
    published: list[tuple[str, JobState]] = field(default_factory=list)
    records: list[JobRecord] = field(default_factory=list)

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        if record.id in self.refuse:
            raise PublishError(f"broker down for {record.id}")
        current = self.store.get(record.id)
        assert current is not None
        self.published.append((record.id, current.state))
        self.records.append(record)


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture
def recorder(sql_store: SQLStore, registry: Registry) -> Recorder:
    integration = Recorder(sql_store)
    registry.register(integration)
    return integration


@pytest.fixture
def manager(sql_store: SQLStore, registry: Registry) -> Manager:
    return Manager(sql_store, integrations=registry, settings=Settings())


def snapshot(store: SQLStore) -> dict[str, list[tuple[Any, ...]]]:
    with store.engine.connect() as conn:
        return {
            t.name: [tuple(r) for r in conn.execute(select(t).order_by(*t.primary_key.columns))]
            for t in (jobs, instances, locks)
        }


def ids(records: Iterator[JobRecord]) -> list[str]:
    return [r.id for r in records]


def seed(store: SQLStore, *specs: tuple[str, JobState, dict[str, Any]]) -> list[str]:
    """Create jobs in order (each one second newer than the last); return their ids newest
    first, the order every listing uses."""
    start = store.now() - 1000
    for k, (job_id, state, extra) in enumerate(specs):
        extra = {"name": "task", "system": "celery", **extra}
        extra.setdefault("created_at", datetime.fromtimestamp(start + k, tz=timezone.utc))
        assert store.create(JobRecord(id=job_id, state=state, **extra))
    return [job_id for job_id, _, _ in reversed(specs)]


def beat(store: SQLStore) -> None:
    """``LIVE`` beats now; ``GONE`` last beat an hour ago."""
    store.heartbeat(LIVE)
    store.heartbeat(GONE)
    with store.engine.begin() as conn:
        conn.execute(
            instances.update()
            .where(instances.c.id == GONE.id)
            .values(heartbeat_at=instances.c.heartbeat_at - 3600)
        )


# -- listings --------------------------------------------------------------------------------


def test_listings_by_state_and_match(manager: Manager, sql_store: SQLStore) -> None:
    order = seed(
        sql_store,
        ("q-alpha", S.QUEUED, {"args": ["alpha", 1]}),
        ("q-beta", S.QUEUED, {"args": ["beta"]}),
        ("r-alpha", S.RETRYING, {"args": ["alpha"]}),
        ("s-alpha", S.STAGED, {"kwargs": {"key": "alpha"}}),
        ("st-alpha", S.STARTED, {"args": ["alpha"], "owner": LIVE.id}),
        ("ok-alpha", S.SUCCEEDED, {"tags": {"model_id": "alpha"}}),
        ("ok-beta", S.SUCCEEDED, {"args": ["beta"]}),
        ("f-alpha", S.FAILED, {"args": ["alpha"], "error": "boom"}),
        ("d-beta", S.DEAD, {"args": ["beta"]}),
        ("c-alpha", S.CANCELLED, {"args": ["alpha"]}),
    )

    def expect(*wanted: str) -> list[str]:
        return [i for i in order if i in wanted]

    assert ids(manager.queued_jobs()) == expect("q-alpha", "q-beta", "r-alpha")
    assert ids(manager.queued_jobs("alpha")) == expect("q-alpha", "r-alpha")
    assert ids(manager.uncompleted_jobs()) == expect(
        "q-alpha", "q-beta", "r-alpha", "s-alpha", "st-alpha"
    )
    assert ids(manager.uncompleted_jobs("alpha")) == expect(
        "q-alpha", "r-alpha", "s-alpha", "st-alpha"
    )
    assert ids(manager.completed_jobs()) == expect("ok-alpha", "ok-beta")
    assert ids(manager.completed_jobs("alpha")) == ["ok-alpha"]  # found in the tags
    assert ids(manager.failed_jobs()) == expect("f-alpha", "d-beta")
    assert ids(manager.failed_jobs("beta")) == ["d-beta"]
    assert ids(manager.jobs()) == order
    assert ids(manager.jobs("beta")) == expect("q-beta", "ok-beta", "d-beta")
    assert ids(manager.jobs("alp_a")) == []  # literal: _ is no wildcard
    assert ids(manager.jobs("alpha", JobQuery(states=frozenset({S.CANCELLED})))) == ["c-alpha"]
    assert ids(manager.jobs(None, JobQuery(match="beta", queues=frozenset({"other"})))) == []

    record = manager.get("f-alpha")
    assert (record.state, record.error, record.args) == (S.FAILED, "boom", ["alpha"])
    with pytest.raises(JobNotFound, match="no-such-job"):
        manager.get("no-such-job")
    with pytest.raises(ConfigError, match="malformed job id"):
        manager.get("../x")

    stats = {s.queue: s for s in manager.stats()}
    assert list(stats) == ["default"]
    assert stats["default"].total == 10
    assert stats["default"].counts[S.QUEUED] == 2


def test_listings_page_through_more_than_a_page(manager: Manager, sql_store: SQLStore) -> None:
    order = seed(sql_store, *((f"job-{i:04d}", S.QUEUED, {"args": [i]}) for i in range(1203)))
    listed = manager.queued_jobs()
    assert isinstance(listed, Iterator)  # lazy: pages are fetched as it is consumed
    assert ids(listed) == order
    assert len(set(order)) == 1203


def test_instances(manager: Manager, sql_store: SQLStore) -> None:
    beat(sql_store)
    found = {i.id: i for i in manager.instances()}
    assert set(found) == {LIVE.id, GONE.id}
    assert found[LIVE.id].alive and not found[GONE.id].alive
    assert found[LIVE.id].queues == ("default",)
    assert found[GONE.id].heartbeat_age is not None and found[GONE.id].heartbeat_age >= 3600


# -- durations -------------------------------------------------------------------------------


def test_durations_against_known_timestamps(manager: Manager, sql_store: SQLStore) -> None:
    def done(queued: float, started: float, finished: float, **kw: Any) -> dict[str, Any]:
        return {
            "queued_at": at(queued),
            "started_at": at(started),
            "finished_at": at(finished),
            "updated_at": at(finished),
            **kw,
        }

    seed(
        sql_store,
        ("a", S.SUCCEEDED, done(0, 10, 70)),
        ("b", S.SUCCEEDED, done(100, 100.5, 102.25)),
        ("c", S.FAILED, done(0, 1, 5, name="other")),
        ("d", S.SUCCEEDED, done(200, 230, 330, args=["needle"])),
        ("e", S.QUEUED, {"queued_at": at(300)}),
        ("f", S.SUCCEEDED, done(400, 400, 400, name="instant")),
    )

    def seconds(pairs: Iterator[tuple[JobRecord, float]]) -> list[tuple[str, float]]:
        return [(r.id, pytest.approx(s, abs=1e-6)) for r, s in pairs]

    assert seconds(manager.queued_to_completion_durations()) == [
        ("f", 0), ("d", 130), ("b", 2.25), ("a", 70),
    ]  # fmt: skip
    assert seconds(manager.started_to_completion_durations()) == [
        ("f", 0), ("d", 100), ("b", 1.75), ("a", 60),
    ]  # fmt: skip
    assert seconds(manager.queued_to_completion_durations("needle")) == [("d", 130)]
    assert seconds(manager.started_to_completion_durations("needle")) == [("d", 100)]
    failed = JobQuery(states=frozenset({S.FAILED}))
    assert seconds(manager.durations(failed, "started")) == [("c", 4)]
    assert seconds(manager.durations(JobQuery(), "queued", page_size=1)) == [
        ("f", 0), ("d", 130), ("b", 2.25), ("a", 70),
    ]  # fmt: skip

    record, _ = next(iter(manager.started_to_completion_durations("needle")))
    assert (record.queued_at, record.started_at, record.finished_at) == (at(200), at(230), at(330))

    stats = {s.name: s for s in manager.duration_stats(JobQuery(), "queued")}
    assert set(stats) == {"task", "instant"}
    task = stats["task"]  # a, b, d: 70, 2.25, 130 (nearest rank)
    assert (task.count, task.p50, task.p95, task.max) == (
        3, pytest.approx(70), pytest.approx(130), pytest.approx(130),
    )  # fmt: skip
    started = {s.name: s for s in manager.duration_stats(JobQuery(), "started")}["task"]
    assert (started.p50, started.p95, started.max) == (
        pytest.approx(60), pytest.approx(100), pytest.approx(100),
    )  # fmt: skip


# -- restart ---------------------------------------------------------------------------------


def restart_seed(store: SQLStore) -> dict[str, JobRecord]:
    beat(store)
    seed(
        store,
        ("failed-1", S.FAILED, {"args": ["x", {"n": 1}], "kwargs": {"k": "v"},
                                "options": {"priority": 3}, "queue": "billing", "attempts": 3}),
        ("dead-1", S.DEAD, {"recoveries": 4, "restarts": 2}),
        ("queued-old", S.QUEUED, {"updated_at": ago(store, 7200), "queued_at": ago(store, 7200)}),
        ("queued-new", S.QUEUED, {}),
        ("ok-1", S.SUCCEEDED, {}),
        ("cancelled-1", S.CANCELLED, {}),
        ("running", S.QUEUED, {}),
        ("orphan", S.QUEUED, {}),
    )  # fmt: skip
    assert Lifecycle(store, LIVE.id, ttl=30).claim("running").should_run
    assert Lifecycle(store, GONE.id, ttl=30).claim("orphan").should_run
    found = {}
    for record in store.iter_jobs(JobQuery()):
        found[record.id] = record
    return found


def test_restart_by_ids(manager: Manager, sql_store: SQLStore, recorder: Recorder) -> None:
    before = restart_seed(sql_store)
    report = manager.restart([*before, "missing-1"])
    restarted = {"failed-1", "dead-1", "queued-old", "queued-new", "orphan"}
    assert report.action == "restart" and not report.dry_run and report.ok
    assert sorted(report.done) == sorted(restarted)
    assert report.skipped == {
        "missing-1": "not found",
        "ok-1": "is succeeded",
        "cancelled-1": "is cancelled",
        "running": f"running on live instance {LIVE.id}; restart it with --force",
    }
    # Published once each, with the ledger still showing the old state (invariant 1), and the
    # record as stored: id, name, args, queue and options unchanged.
    assert sorted(recorder.published) == sorted((i, before[i].state) for i in restarted)
    assert {r.id: r for r in recorder.records} == {
        i: replace(before[i], generation=before[i].generation + 1) for i in restarted
    }
    for job_id, old in before.items():
        new = sql_store.get(job_id)
        assert new is not None
        if job_id not in restarted:
            assert new == old
            continue
        assert new.state is S.QUEUED and new.owner is None
        assert new.restarts == old.restarts + 1
        assert new.generation == old.generation + 1  # the restart's message is the current one
        assert (new.args, new.kwargs, new.options, new.queue, new.attempts) == (
            old.args, old.kwargs, old.options, old.queue, old.attempts,
        )  # fmt: skip
    assert sql_store.get("dead-1").restarts == 3  # type: ignore[union-attr]


def test_restart_by_filter_and_age_with_dry_run(
    manager: Manager, sql_store: SQLStore, recorder: Recorder
) -> None:
    restart_seed(sql_store)
    before = snapshot(sql_store)
    needs_a_person = JobQuery(states=frozenset({S.FAILED, S.DEAD}))
    old = JobQuery(older_than=3600)

    preview = manager.restart(query=needs_a_person, dry_run=True)
    assert preview.dry_run and sorted(preview.done) == ["dead-1", "failed-1"]
    aged = manager.restart(query=old, dry_run=True)
    assert aged.done == ["queued-old"]
    everything = manager.restart(query=JobQuery(), dry_run=True)
    assert sorted(everything.done) == [
        "dead-1", "failed-1", "orphan", "queued-new", "queued-old",
    ]  # fmt: skip
    assert everything.skipped["running"] == (
        f"running on live instance {LIVE.id}; restart it with --force"
    )
    assert recorder.published == []
    assert snapshot(sql_store) == before  # a dry run changes nothing

    assert manager.restart(query=old).done == ["queued-old"]
    assert [i for i, _ in recorder.published] == ["queued-old"]
    assert sorted(manager.restart(["queued-new"], needs_a_person).done) == [
        "dead-1", "failed-1", "queued-new",
    ]  # fmt: skip
    for job_id in ("queued-old", "queued-new", "dead-1", "failed-1"):
        assert sql_store.get(job_id).state is S.QUEUED  # type: ignore[union-attr]
    assert sql_store.get("orphan").state is S.STARTED  # type: ignore[union-attr]


def test_integration_missing_fails_only_its_jobs(
    manager: Manager, sql_store: SQLStore, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk restart restarts what it can and says, job by job, what it could not and why."""
    # a queue system jobledger ships an integration for, not installed in this process
    monkeypatch.setitem(KNOWN, "rq", Known(extra="rq", module="jobledger.integrations.rq", app="-"))
    restart_seed(sql_store)
    assert sql_store.create(JobRecord(id="rq-1", name="t", system="rq", state=S.FAILED))
    assert sql_store.create(JobRecord(id="odd-1", name="t", system="homegrown", state=S.FAILED))
    before = snapshot(sql_store)
    dry = manager.restart(query=JobQuery(states=frozenset({S.FAILED})), dry_run=True)
    assert sorted(dry.done) == ["failed-1"]
    assert re.search(r"'rq'.*pip install 'jobledger\[rq\]'", dry.failed["rq-1"])
    assert "register an integration for it" in dry.failed["odd-1"]
    assert recorder.published == [] and snapshot(sql_store) == before

    done = manager.restart(["failed-1", "dead-1", "rq-1"])
    assert sorted(done.done) == ["dead-1", "failed-1"] and list(done.failed) == ["rq-1"]
    assert sorted(i for i, _ in recorder.published) == ["dead-1", "failed-1"]
    assert sql_store.get("rq-1").state is S.FAILED  # type: ignore[union-attr]
    with pytest.raises(IntegrationMissing, match="register an integration for it"):
        manager.restart(query=JobQuery(systems=frozenset({"homegrown"})), dry_run=True)


def test_publish_error_leaves_that_record_unchanged(
    manager: Manager, sql_store: SQLStore, recorder: Recorder
) -> None:
    before = restart_seed(sql_store)
    recorder.refuse.add("failed-1")
    report = manager.restart(["failed-1", "dead-1"])
    assert not report.ok
    assert report.failed == {"failed-1": "broker down for failed-1"}
    assert report.done == ["dead-1"]
    assert sql_store.get("failed-1") == before["failed-1"]
    assert sql_store.get("dead-1").state is S.QUEUED  # type: ignore[union-attr]


def test_restart_of_a_job_that_moves_on_while_it_is_published(
    manager: Manager, sql_store: SQLStore, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker claims the job between the publish and the compare-and-set: the record stays
    the worker's (the claim guard stops the duplicate) and the race is logged."""
    restart_seed(sql_store)

    class ClaimedMeanwhile(Recorder):
        def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
            super().publish(record)
            # the delivery of a restart's message (it carries the restart header)
            claim = Lifecycle(self.store, LIVE.id, ttl=30).claim(record.id, restart=True)
            assert claim.should_run

    registry.register(ClaimedMeanwhile(sql_store))
    with caplog.at_level(logging.WARNING, logger="jobledger.manager"):
        report = manager.restart(["failed-1"])
    assert report.done == ["failed-1"]
    record = sql_store.get("failed-1")
    assert record is not None
    assert (record.state, record.owner, record.restarts) == (S.STARTED, LIVE.id, 0)
    assert "moved on meanwhile" in caplog.text


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_by_ids_filter_and_age(manager: Manager, sql_store: SQLStore) -> None:
    before_records = restart_seed(sql_store)
    before = snapshot(sql_store)

    preview = manager.cancel(["queued-new", "ok-1", "nope"], dry_run=True)
    assert preview.done == ["queued-new"]
    assert preview.skipped == {"ok-1": "is succeeded", "nope": "not found"}
    aged = manager.cancel(query=JobQuery(older_than=3600), dry_run=True)
    assert aged.done == ["queued-old"]
    pending = manager.cancel(query=JobQuery(states=frozenset({S.QUEUED, S.STARTED})), dry_run=True)
    assert sorted(pending.done) == ["orphan", "queued-new", "queued-old", "running"]
    assert snapshot(sql_store) == before

    assert manager.cancel(["queued-new"]).done == ["queued-new"]
    assert manager.cancel(query=JobQuery(older_than=3600)).done == ["queued-old"]
    report = manager.cancel(["failed-1"], JobQuery(states=frozenset({S.STARTED})))
    assert sorted(report.done) == ["orphan", "running"]
    assert report.skipped == {"failed-1": "is failed"}
    for job_id in ("queued-new", "queued-old", "orphan", "running"):
        record = sql_store.get(job_id)
        assert record is not None and record.state is S.CANCELLED
        assert record.finished_at is not None
    assert sql_store.get("failed-1") == before_records["failed-1"]
    # A cancelled job is not restarted, and the worker that held it cannot finish it.
    assert manager.restart(["running"]).skipped == {"running": "is cancelled"}
    assert not Lifecycle(sql_store, LIVE.id, ttl=30).succeed("running")


# -- prune -----------------------------------------------------------------------------------


def prune_seed(store: SQLStore) -> None:
    day = 86400.0
    specs = []
    for job_id, state, age in (
        ("ok-now", S.SUCCEEDED, 0.0),
        ("ok-2d", S.SUCCEEDED, 2 * day),
        ("ok-10d", S.SUCCEEDED, 10 * day),
        ("cancel-10d", S.CANCELLED, 10 * day),
        ("fail-2h", S.FAILED, 7200.0),
        ("fail-30d", S.FAILED, 30 * day),
        ("dead-30d", S.DEAD, 30 * day),
        ("queued-30d", S.QUEUED, 30 * day),
        ("retry-30d", S.RETRYING, 30 * day),
    ):
        specs.append((job_id, state, {"updated_at": ago(store, age)}))
    seed(store, *specs)


def remaining(store: SQLStore) -> set[str]:
    return {r.id for r in store.iter_jobs(JobQuery())}


def test_prune_rules(sql_store: SQLStore, registry: Registry) -> None:
    prune_seed(sql_store)
    everything = remaining(sql_store)

    def prune(dry_run: bool = False, **settings: Any) -> dict[str, int]:
        manager = Manager(sql_store, integrations=registry, settings=Settings(**settings))
        return manager.prune(dry_run=dry_run)

    before = snapshot(sql_store)
    assert prune(dry_run=True) == {"succeeded": 1, "cancelled": 1}  # default: keep 7 days
    assert prune(dry_run=True, keep_succeeded=0) == {"succeeded": 3, "cancelled": 1}
    assert prune(dry_run=True, keep_succeeded=86400, keep_failed=3600) == {
        "succeeded": 2, "cancelled": 1, "dead": 1, "failed": 2,
    }  # fmt: skip
    assert snapshot(sql_store) == before

    assert prune(keep_succeeded=3 * 86400) == {"succeeded": 1, "cancelled": 1}
    assert remaining(sql_store) == everything - {"ok-10d", "cancel-10d"}
    # keep_succeeded=0: every succeeded job goes, even one that finished just now; failed and
    # dead jobs stay while no keep_failed is set.
    assert Lifecycle(sql_store, LIVE.id, ttl=30).claim("queued-30d").should_run
    assert Lifecycle(sql_store, LIVE.id, ttl=30).succeed("queued-30d")
    assert prune(keep_succeeded=0) == {"succeeded": 3, "cancelled": 0}
    assert remaining(sql_store) == {"fail-2h", "fail-30d", "dead-30d", "retry-30d"}
    assert prune(keep_succeeded=0, keep_failed=86400) == {
        "succeeded": 0, "cancelled": 0, "dead": 1, "failed": 1,
    }  # fmt: skip
    assert remaining(sql_store) == {"fail-2h", "retry-30d"}  # pending jobs are never pruned
