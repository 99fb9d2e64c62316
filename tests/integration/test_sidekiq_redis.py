"""The Sidekiq integration against a real redis-server, as a Sidekiq 7 app with a
redis-namespace would leave it: pushes where Sidekiq's fetch looks, and the watcher's
judgement of a killed process (pushed back once) and of a clean shutdown (left alone)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis

from e2e.celery.services import PrivateRedis, free_port
from e2e.sidekiq.sidekiq_harness import sidekiq_redis_fixture  # noqa: F401  (a fixture)
from jobledger.config import Settings
from jobledger.errors import PublishError
from jobledger.integrations.base import ProcessWatch, Registry
from jobledger.integrations.sidekiq import SidekiqIntegration, install
from jobledger.integrations.sidekiq.payload import AT_OPTION
from jobledger.integrations.sidekiq.watcher import ProcessWatcher
from jobledger.lifecycle import Lifecycle
from jobledger.model import JobRecord, JobState, Republish
from jobledger.recovery import Recovery
from jobledger.stores.memory import MemoryStore
from jobledger.testing import ManualClock, wait_for

TTL = 0.5


@pytest.fixture(name="sidekiq")
def sidekiq_fixture(sidekiq_redis: PrivateRedis) -> Iterator[SidekiqIntegration]:
    settings = Settings(
        sidekiq_redis_url=sidekiq_redis.url, sidekiq_namespace="myapp", sidekiq_process_ttl=TTL
    )
    integration = SidekiqIntegration.from_settings(settings)
    yield integration
    integration.close()


def _job(jid: str, **fields: object) -> JobRecord:
    return JobRecord(id=jid, name="HardJob", system="sidekiq", queue="crit", args=[1], **fields)


def test_publish_pushes_where_sidekiq_fetches(sidekiq: SidekiqIntegration) -> None:
    sidekiq.publish(_job("j1", generation=1), reason=Republish.RESTART)
    raw = sidekiq.client.lrange("myapp:queue:crit", 0, -1)
    assert len(raw) == 1 and sidekiq.client.smembers("myapp:queues") == {"crit"}
    payload = json.loads(raw[0])
    assert (payload["jid"], payload["class"], payload["jobledger_generation"]) == (
        "j1",
        "HardJob",
        1,
    )
    assert payload["enqueued_at"] >= payload["created_at"] > 0

    due = float(sidekiq.client.time()[0]) + 3600
    sidekiq.publish(_job("j2", options={AT_OPTION: due}))
    [(member, score)] = sidekiq.client.zrange("myapp:schedule", 0, -1, withscores=True)
    assert json.loads(member)["jid"] == "j2" and score == due
    assert "enqueued_at" not in json.loads(member)


def test_publish_to_a_redis_that_is_down_says_so() -> None:
    settings = Settings(sidekiq_redis_url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1)
    integration = SidekiqIntegration.from_settings(settings)
    with pytest.raises(PublishError, match="JOBLEDGER_SIDEKIQ_REDIS_URL"):
        integration.publish(_job("j1"))


def test_install_registers_a_watching_publisher(sidekiq_redis: PrivateRedis) -> None:
    into = Registry()
    integration = install(Settings(sidekiq_redis_url=sidekiq_redis.url), into)
    assert into.get("sidekiq") is integration and into.watchers() == [integration]
    assert isinstance(integration, ProcessWatch)
    integration.close()


def _beat(
    client: redis.Redis, identity: str, beat: float, work: dict[str, dict[str, object]]
) -> None:
    """Write what a Sidekiq 7 process's heartbeat writes (namespaced)."""
    client.sadd("myapp:processes", identity)
    client.hset(f"myapp:{identity}", mapping={"beat": beat, "busy": len(work)})
    for tid, payload in work.items():
        entry = {"queue": "crit", "payload": json.dumps(payload), "run_at": 1}
        client.hset(f"myapp:{identity}:work", tid, json.dumps(entry))


def test_watcher_pushes_back_a_dead_processs_jobs_once(sidekiq: SidekiqIntegration) -> None:
    store = MemoryStore()
    recovery = Recovery(store, ttl=30, max_recoveries=3, recovery_window=3600,
                        publish=sidekiq.publish)  # fmt: skip
    moved: list[int] = []
    loop = sidekiq.watch_loop(recovery, on_moved=moved.append, on_error=lambda: None)
    for jid in ("run-1", "done-1", "live-1"):
        store.create(_job(jid))
        assert Lifecycle(store, owner="http-untracked:stand-in", ttl=30).claim(jid).should_run
    Lifecycle(store, owner="http-untracked:stand-in", ttl=30).succeed("done-1")
    held = {"class": "HardJob", "args": [1], "queue": "crit", "retry": 3}
    _beat(sidekiq.client, "host:1:dead", 100.0, {
        "t1": {**held, "jid": "run-1"}, "t2": {**held, "jid": "done-1"},
    })  # fmt: skip
    _beat(sidekiq.client, "host:2:gone", 100.0, {"t1": {**held, "jid": "live-1"}})
    loop.task()  # first sight of both
    sidekiq.client.srem("myapp:processes", "host:2:gone")  # a clean shutdown
    wait_for("the silent process to be judged dead", lambda: loop.task() or moved, 10)

    assert moved == [1]
    record = store.get("run-1")
    assert record is not None and (record.state, record.recoveries) == (JobState.QUEUED, 1)
    [raw] = sidekiq.client.lrange("myapp:queue:crit", 0, -1)
    pushed = json.loads(raw)
    assert (pushed["jid"], pushed["retry"], pushed["jobledger_generation"]) == ("run-1", 3, 1)
    assert store.get("live-1").state is JobState.STARTED  # type: ignore[union-attr]

    loop.task()  # the same dead process at the next look: nothing twice
    assert sidekiq.client.llen("myapp:queue:crit") == 1 and moved == [1]


def test_a_job_started_after_the_dead_processs_last_report_is_pushed_back(
    sidekiq: SidekiqIntegration,
) -> None:
    """Sidekiq writes a process's work only at its beats: a job it started after its last
    one is in no snapshot. Once every live process has reported since that job started
    without it, it was the dead one's."""
    clock = ManualClock(1000.0)
    store = MemoryStore(clock)
    recovery = Recovery(store, ttl=30, max_recoveries=3, recovery_window=3600,
                        publish=sidekiq.publish)  # fmt: skip
    watcher = ProcessWatcher(sidekiq.client, sidekiq.keys, recovery, ttl=TTL)
    store.create(_job("late-1"))
    assert Lifecycle(store, owner="http-untracked:supervisor", ttl=30).claim("late-1").should_run
    _beat(sidekiq.client, "host:1:dead", 1.0, {})
    _beat(sidekiq.client, "host:2:live", 1.0, {})
    assert watcher.look() == 0
    clock.advance(3)
    _beat(sidekiq.client, "host:2:live", 2.0, {})  # reported after the job started...
    assert watcher.look() == 0  # ...but too close to its start to judge by
    clock.advance(3)
    watcher.look()
    _beat(sidekiq.client, "host:2:live", 3.0, {})

    def pushed_back() -> bool:
        _beat(sidekiq.client, "host:2:live", time.monotonic(), {})  # the live one beats on
        return watcher.look() == 1

    wait_for("the dead process's unreported job to be pushed back", pushed_back, 10)
    record = store.get("late-1")
    assert record is not None and (record.state, record.recoveries) == (JobState.QUEUED, 1)
    assert [json.loads(r)["jid"] for r in sidekiq.client.lrange("myapp:queue:crit", 0, -1)] == [
        "late-1"
    ]


def test_a_job_a_live_process_has_not_reported_yet_is_left_alone(
    sidekiq: SidekiqIntegration,
) -> None:
    clock = ManualClock(1000.0)
    store = MemoryStore(clock)
    recovery = Recovery(store, ttl=30, max_recoveries=3, recovery_window=3600,
                        publish=sidekiq.publish)  # fmt: skip
    watcher = ProcessWatcher(sidekiq.client, sidekiq.keys, recovery, ttl=TTL)
    _beat(sidekiq.client, "host:1:dead", 1.0, {})
    _beat(sidekiq.client, "host:2:live", 1.0, {})
    watcher.look()
    clock.advance(3)
    _beat(sidekiq.client, "host:2:live", 2.0, {})
    watcher.look()
    store.create(_job("new-1"))  # started on the live process after its last report
    assert Lifecycle(store, owner="http-untracked:supervisor", ttl=30).claim("new-1").should_run
    deadline = time.monotonic() + 3 * TTL
    while time.monotonic() < deadline:  # the dead one is judged dead meanwhile
        _beat(sidekiq.client, "host:2:live", time.monotonic(), {})  # the live one beats on,
        assert watcher.look() == 0  # reporting after the ledger's clock stood still
    assert store.get("new-1").state is JobState.STARTED  # type: ignore[union-attr]
    assert sidekiq.client.llen("myapp:queue:crit") == 0
