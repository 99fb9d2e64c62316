"""Liveness is judged on the database's clock, never the caller's.

The calling process's clock is skewed by ten minutes either way (``time.time``,
``time.time_ns`` and ``datetime.now`` wherever jobledger could read them); heartbeats,
``instances``, ``is_alive`` and ``orphans`` must not notice, and a stored heartbeat must sit
next to ``store.now()``, not next to the skewed clock.
"""

from __future__ import annotations

import datetime as dt_module
import sys
import time
from collections.abc import Iterator

import pytest

import jobledger
from jobledger.lifecycle import Claim, Lifecycle
from jobledger.model import Instance, JobState
from jobledger.stores.sql import SQLStore
from jobledger.testing import wait_for
from jobledger.testing.contract.records import CLOCK_SLACK, epoch, job, started

SKEWS = [-600.0, 600.0]
REAL_TIME = time.time


@pytest.fixture(params=SKEWS, ids=["behind", "ahead"])
def skew(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    """Skew this process's clocks by the parameter, in seconds."""
    offset = float(request.param)
    real_time, real_time_ns = time.time, time.time_ns
    real_datetime = dt_module.datetime

    class SkewedDatetime(real_datetime):
        @classmethod
        def now(cls, tz: dt_module.tzinfo | None = None) -> SkewedDatetime:
            return real_datetime.now(tz) + dt_module.timedelta(seconds=offset)  # type: ignore[return-value]

        @classmethod
        def utcnow(cls) -> SkewedDatetime:
            return real_datetime.utcnow() + dt_module.timedelta(seconds=offset)  # type: ignore[return-value]

    monkeypatch.setattr(time, "time", lambda: real_time() + offset)
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + int(offset * 1e9))
    # Modules that imported the names themselves: ``from time import time``, ``from datetime
    # import datetime``.
    for name, module in list(sys.modules.items()):
        if name != "jobledger" and not name.startswith("jobledger."):
            continue
        for attribute, value in list(vars(module).items()):
            if value is real_datetime:
                monkeypatch.setattr(module, attribute, SkewedDatetime)
            elif value is real_time:
                monkeypatch.setattr(module, attribute, time.time)
    assert abs(time.time() - real_time() - offset) < 1
    yield offset


def test_a_beating_instance_is_alive_under_a_skewed_clock(sql_store: SQLStore, skew: float) -> None:
    worker = Instance(name="worker", nonce="skewed", hostname="h", pid=1)
    sql_store.heartbeat(worker)
    db_now = sql_store.now()
    [got] = sql_store.instances(ttl=30)
    assert got.alive
    assert got.heartbeat_age is not None and got.heartbeat_age < CLOCK_SLACK
    assert abs(epoch(got.heartbeat_at) - db_now) < CLOCK_SLACK
    assert abs(epoch(got.heartbeat_at) - time.time()) > 500, "the skew must be visible"
    assert sql_store.is_alive(worker.id, ttl=30)

    assert sql_store.create(started("running", worker.id))
    assert sql_store.orphans(ttl=30) == []
    record = sql_store.get("running")
    assert record is not None and abs(epoch(record.started_at) - db_now) < CLOCK_SLACK

    # The claim guard on top: a redelivery elsewhere sees a live owner and skips.
    assert sql_store.create(job("queued"))
    assert Lifecycle(sql_store, owner=worker.id, ttl=30).claim("queued") is Claim.CLAIMED
    assert Lifecycle(sql_store, owner="other:1", ttl=30).claim("queued") is (
        Claim.RUNNING_ELSEWHERE
    )


def test_genuine_orphans_are_found_under_a_skewed_clock(sql_store: SQLStore, skew: float) -> None:
    stays = Instance(name="stays", nonce="1")
    leaves = Instance(name="leaves", nonce="1")
    sql_store.heartbeat(stays)
    sql_store.heartbeat(leaves)
    assert sql_store.deregister(leaves.id)
    for record in [
        started("never", "never:beat"),
        started("left", leaves.id),
        started("kept", stays.id),
        job("queued", state=JobState.QUEUED),
    ]:
        assert sql_store.create(record)
    assert {r.id for r in sql_store.orphans(ttl=30)} == {"never", "left"}
    assert not sql_store.is_alive(leaves.id, ttl=30)
    # A live owner that falls silent becomes one, after its TTL on the database's clock.
    wait_for(
        "silent owner's job becomes an orphan",
        lambda: {r.id for r in sql_store.orphans(ttl=0.3)} == {"never", "left", "kept"},
        timeout=10,
    )
    assert not sql_store.is_alive(stays.id, ttl=0.3)


def test_the_skew_reaches_the_modules_jobledger_uses(skew: float) -> None:
    """The fixture above must actually skew what jobledger could read, or it proves nothing."""
    assert abs(time.time() - REAL_TIME() - skew) < 1
    assert abs(time.time_ns() / 1e9 - REAL_TIME() - skew) < 1
    utc = dt_module.timezone.utc
    assert abs(jobledger.model.datetime.now(utc).timestamp() - REAL_TIME() - skew) < 1
    assert abs(jobledger.model.datetime.now().timestamp() - REAL_TIME() - skew) < 1
