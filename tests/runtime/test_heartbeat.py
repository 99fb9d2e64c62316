"""Heartbeat: registration, beating, invariant 4 (drain before deregister), invariant 9."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from jobledger.config import Settings
from jobledger.errors import StoreUnavailable
from jobledger.heartbeat import Health, Heartbeat, new_instance
from jobledger.model import Instance, InstanceState
from jobledger.stores.sql import SQLStore
from ledgerdb import database_url, empty_sql_store


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlakyStore:
    """Wraps a store; heartbeat writes fail while ``down`` is set."""

    def __init__(self, store: SQLStore) -> None:
        self.store = store
        self.down = False
        self.fails_with: Exception | None = None
        self.beats = 0

    def heartbeat(self, instance: Instance) -> None:
        if self.down:
            raise StoreUnavailable("ledger down (test)")
        if self.fails_with is not None:
            raise self.fails_with
        self.beats += 1
        self.store.heartbeat(instance)

    def deregister(self, instance_id: str) -> bool:
        return self.store.deregister(instance_id)


@pytest.fixture
def store(tmp_path: Path) -> SQLStore:
    s = empty_sql_store(database_url("sqlite", tmp_path))
    yield s
    s.close()


def test_new_instance_has_a_fresh_nonce_per_boot() -> None:
    settings = Settings(instance_name="pod-7")
    a, b = new_instance(settings, ["q1"]), new_instance(settings, ["q1"])
    assert a.name == b.name == "pod-7"
    assert a.nonce != b.nonce
    assert a.id.startswith("pod-7:") and a.queues == ("q1",)


def test_start_registers_synchronously_and_beats(store: SQLStore) -> None:
    flaky = FlakyStore(store)
    hb = Heartbeat(flaky, new_instance(Settings(instance_name="w")), interval=0.02, ttl=1.0)  # type: ignore[arg-type]
    hb.start()
    try:
        assert store.is_alive(hb.instance_id, 1.0)  # registered before start() returned
        done = threading.Event()
        for _ in range(200):
            if flaky.beats >= 3:
                done.set()
                break
            done.wait(0.02)
        assert done.is_set(), "the thread did not beat"
    finally:
        hb.stop()
    assert store.is_alive(hb.instance_id, 1.0)  # halt does not deregister


def test_drain_keeps_beating_until_jobs_are_done_then_deregisters(store: SQLStore) -> None:
    in_flight = [2]
    waits: list[float] = []
    flaky = FlakyStore(store)

    def wait(seconds: float) -> None:
        waits.append(seconds)
        # while draining: the instance is still registered, and says it is draining
        (row,) = store.instances(ttl=10)
        assert row.state is InstanceState.DRAINING
        in_flight[0] -= 1

    hb = Heartbeat(  # type: ignore[arg-type]
        flaky,
        new_instance(Settings(instance_name="w")),
        interval=0.05,
        ttl=1.0,
        in_flight=lambda: in_flight[0],
        wait=wait,
    )
    hb.start()
    assert hb.drain() is True
    assert len(waits) == 2
    assert store.instances(ttl=10) == []


def test_drain_with_jobs_left_at_the_deadline_keeps_the_row(store: SQLStore) -> None:
    clock = FakeClock()

    def wait(seconds: float) -> None:
        clock.now += 1.0

    hb = Heartbeat(  # type: ignore[arg-type]
        FlakyStore(store),
        new_instance(Settings(instance_name="w")),
        interval=0.05,
        ttl=1.0,
        in_flight=lambda: 1,
        clock=clock,
        wait=wait,
    )
    hb.start()
    assert hb.drain(timeout=3.0) is False
    assert [i.id for i in store.instances(ttl=10)] == [hb.instance_id]


def test_cannot_claim_after_beats_fail_longer_than_the_ttl(store: SQLStore) -> None:
    clock = FakeClock()
    flaky = FlakyStore(store)
    hb = Heartbeat(flaky, new_instance(Settings(instance_name="w")), interval=1, ttl=3, clock=clock)  # type: ignore[arg-type]
    assert not hb.can_claim  # never beat yet
    assert hb.beat() and hb.can_claim
    flaky.down = True
    clock.now += 2.0
    assert not hb.beat() and hb.can_claim  # failing, but within the TTL
    clock.now += 1.5
    assert not hb.beat() and not hb.can_claim  # silent for longer than the TTL
    flaky.down = False
    assert hb.beat() and hb.can_claim


def test_an_unexpected_error_does_not_stop_the_beating(store: SQLStore) -> None:
    flaky = FlakyStore(store)
    hb = Heartbeat(flaky, new_instance(Settings(instance_name="w")), interval=1, ttl=3)  # type: ignore[arg-type]
    flaky.fails_with = RuntimeError("a bug below the store seam")
    assert not hb.beat()  # logged, counted, not raised
    assert hb.failures == 1
    flaky.fails_with = None
    assert hb.beat() and hb.can_claim


def test_a_failing_holding_callback_keeps_the_last_report_and_the_beat(store: SQLStore) -> None:
    held = [("j1", 0)]
    broken = False

    def holding() -> list[tuple[str, int]]:
        if broken:
            raise RuntimeError("a bug in the adapter's callback")
        return held

    hb = Heartbeat(
        store, new_instance(Settings(instance_name="w")), interval=1, ttl=3, holding=holding
    )
    assert hb.beat()
    broken = True
    assert hb.beat() and hb.can_claim  # alive: the beat went, with the last known report
    assert hb.failures == 0
    (found,) = [i for i in store.instances(ttl=3) if i.id == hb.instance_id]
    assert tuple(found.holding) == (("j1", 0),)


def test_health_is_shared_with_a_forked_child() -> None:
    """A prefork child sees the beats its parent's thread records after the fork."""
    import os

    health = Health(ttl=5)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never beat at fork time; waits for the parent's beat
        os.read(read_end, 1)
        os._exit(0 if health.can_claim else 1)
    assert not health.can_claim
    health.mark_ok()
    os.write(write_end, b"x")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
