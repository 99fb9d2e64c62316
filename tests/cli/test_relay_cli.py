"""``jobledger relay``: publishes staged jobs the fast path missed, here to a real Redis broker
(a database number of this file's own, a queue name of each test's own), and ``stats`` showing
the outbox backlog. Bad input ends in one ``error:`` line and exit status 2; a broker that
refuses ends a ``--once`` pass with exit status 1 and the jobs still staged.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from jobledger.integrations.celery import TRACKED_HEADER
from jobledger.model import JobRecord, JobState, to_datetime
from jobledger.query import JobQuery
from jobledger.stores.base import Store
from jobledger.stores.sql import SQLStore
from jobledger.testing import wait_for
from ledgerdb import REDIS_URL

from .helpers import RECORDING_APP, Cli, child_env, jobledger_command, read_log

S = JobState
BROKER = REDIS_URL  # each test publishes to a queue of its own there
DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens there


@pytest.fixture
def broker() -> Iterator[Broker]:
    found = Broker(redis.Redis.from_url(BROKER))
    yield found
    found.clean()


class Broker:
    """The Redis database the relay publishes to, seen through one queue of the test's own."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.queue = f"relay-test-{uuid.uuid4().hex[:10]}"

    def messages(self) -> list[dict[str, Any]]:
        """The Celery messages waiting in the queue, oldest first (kombu pushes on the left),
        from its plain list, then its priority lists (``<queue>\\x06\\x16<step>``)."""
        found: list[dict[str, Any]] = []
        for key in [self.queue, *(f"{self.queue}\x06\x16{step}" for step in range(10))]:
            found += [json.loads(raw) for raw in reversed(self.client.lrange(key, 0, -1))]
        return found

    def ids(self) -> list[str]:
        return [m["headers"]["id"] for m in self.messages()]

    def clean(self) -> None:
        keys = list(self.client.scan_iter(match=f"*{self.queue}*"))
        if keys:
            self.client.delete(*keys)
        self.client.close()


def stage(
    store: Store, job_id: str, queue: str, *, age: float = 3600, system: str = "celery"
) -> None:
    record = JobRecord(
        id=job_id,
        name="tasks.confirm_order",
        system=system,
        queue=queue,
        args=[job_id],
        kwargs={"notify": True},
        options={"priority": 4},
        state=S.STAGED,
        staged_at=to_datetime(store.now() - age),
    )
    assert store.create(record)


def states(store: Store) -> dict[str, str]:
    return {r.id: r.state.value for r in store.iter_jobs(JobQuery())}


@pytest.fixture
def single(sqlite_url: str, sqlite_store: SQLStore, tmp_path: Path) -> Cli:
    """``jobledger`` on a SQLite ledger, for what does not depend on the database."""
    return Cli(sqlite_url, tmp_path)


# -- bad input -------------------------------------------------------------------------------------


def test_relay_without_an_integration_is_refused(single: Cli, sqlite_store: SQLStore) -> None:
    stage(sqlite_store, "job-1", "q")
    single("relay", "--once").error("no queue integration", "--app", "--broker")
    assert states(sqlite_store) == {"job-1": "staged"}


@pytest.mark.parametrize("grace", ["soon", "=-5", "=1h-"])
def test_a_bad_grace_is_refused(
    single: Cli, sqlite_store: SQLStore, broker: Broker, grace: str
) -> None:
    stage(sqlite_store, "job-1", broker.queue)
    args = ["relay", "--once", "--broker", BROKER]
    args += [f"--grace{grace}"] if grace.startswith("=") else ["--grace", grace]
    single(*args).error(grace.lstrip("="))
    assert states(sqlite_store) == {"job-1": "staged"}
    assert broker.ids() == []


# -- one pass --------------------------------------------------------------------------------------


def test_relay_once_publishes_the_staged_jobs(cli: Cli, store: Store, broker: Broker) -> None:
    for n in range(3):
        stage(store, f"job-{n}", broker.queue, age=3600 - n)
    stage(store, "fresh", broker.queue, age=0)
    stage(store, "other-system", broker.queue, system="rq")
    env = {"JOBLEDGER_RELAY_GRACE": "10m"}  # the fresh job is the fast path's for now
    report = cli("relay", "--once", "--broker", BROKER, "--json", env=env).json()
    assert report == {"published": 3, "refused": 0, "batches": 1, "error": None}
    assert broker.ids() == ["job-0", "job-1", "job-2"]
    first = broker.messages()[0]
    assert first["headers"]["task"] == "tasks.confirm_order"
    assert first["headers"][TRACKED_HEADER] is True
    assert first["properties"]["priority"] == 4
    assert states(store) == {
        "job-0": "queued",
        "job-1": "queued",
        "job-2": "queued",
        "fresh": "staged",
        "other-system": "staged",  # no integration for rq here: not this relay's
    }
    record = store.get("job-0")
    assert record is not None and record.queued_at is not None and record.owner is None

    again = cli("relay", "--once", "--broker", BROKER, "--grace", "0", env=env).ok()
    assert again.stdout.strip() == "published 1 staged jobs"
    assert broker.ids() == ["job-0", "job-1", "job-2", "fresh"]
    assert states(store)["fresh"] == "queued"

    nothing = cli("relay", "--once", "--broker", BROKER, "--grace", "0", "--json").json()
    assert nothing == {"published": 0, "refused": 0, "batches": 0, "error": None}
    assert len(broker.ids()) == 4


def test_relay_once_with_the_broker_down_exits_1_and_keeps_the_jobs_staged(
    single: Cli, sqlite_store: SQLStore
) -> None:
    stage(sqlite_store, "job-1", "q")
    stage(sqlite_store, "job-2", "q")
    down = single("relay", "--once", "--broker", DEAD_BROKER, timeout=60)
    assert down.returncode == 1, str(down)
    lines = down.stdout.splitlines()
    assert lines[0] == "published 0 staged jobs", str(down)
    assert lines[1].startswith("stopped: ") and "job-1" in lines[1], str(down)
    assert "Traceback" not in down.stderr, str(down)
    as_json = single("relay", "--once", "--broker", DEAD_BROKER, "--json", timeout=60)
    assert as_json.returncode == 1, str(as_json)
    report = json.loads(as_json.stdout)
    assert (report["published"], report["batches"]) == (0, 1)
    assert isinstance(report["error"], str) and "job-1" in report["error"]
    assert states(sqlite_store) == {"job-1": "staged", "job-2": "staged"}


def test_relay_once_with_an_app_publishes_first_and_stops_at_a_refusal(
    single: Cli, sqlite_store: SQLStore, tmp_path: Path
) -> None:
    for n in range(4):
        stage(sqlite_store, f"job-{n}", "q", age=3600 - n)
    log = tmp_path / "published.jsonl"
    env = {
        "RECORDING_APP_LOG": str(log),
        "RECORDING_APP_FAIL": "job-2",
        "RECORDING_APP_LEDGER_URL": single.url,
    }
    refused = single.quick("relay", "--once", "--app", RECORDING_APP, "--json", env=env)
    assert refused.returncode == 1, str(refused)
    report = json.loads(refused.stdout)
    assert (report["published"], report["batches"]) == (2, 1)
    assert "job-2" in report["error"]
    # Published while still staged in the ledger, marked queued only after the broker took it.
    assert [(line["id"], line["ledger_state"]) for line in read_log(log)] == [
        ("job-0", "staged"),
        ("job-1", "staged"),
    ]
    assert states(sqlite_store) == {
        "job-0": "queued",
        "job-1": "queued",
        "job-2": "staged",
        "job-3": "staged",
    }
    env["RECORDING_APP_FAIL"] = ""
    again = single.quick("relay", "--once", "--app", RECORDING_APP, env=env)
    assert again.ok().stdout.strip() == "published 2 staged jobs"
    assert set(states(sqlite_store).values()) == {"queued"}


# -- the loop --------------------------------------------------------------------------------------


def test_relay_runs_until_stopped(single: Cli, sqlite_store: SQLStore, broker: Broker) -> None:
    stage(sqlite_store, "job-1", broker.queue)
    command = [
        *jobledger_command(),
        *("relay", "--broker", BROKER, "--grace", "0", "--database-url", single.url),
    ]
    env = child_env({"JOBLEDGER_RELAY_INTERVAL": "100ms", "JOBLEDGER_RELAY_MAX_BACKOFF": "1s"})
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for("the relay to publish job-1", lambda: broker.ids() == ["job-1"])
        stage(sqlite_store, "job-2", broker.queue)  # staged while it runs: the next look
        wait_for("the relay to publish job-2", lambda: broker.ids() == ["job-1", "job-2"])
        wait_for("job-2 queued", lambda: states(sqlite_store)["job-2"] == "queued")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, (stdout, stderr)
    assert stdout.splitlines()[0].startswith("relaying staged celery jobs from SQLStore(")
    assert re.fullmatch(r"relay stopped; \d+ passes", stdout.splitlines()[-1]), stdout
    assert states(sqlite_store) == {"job-1": "queued", "job-2": "queued"}


# -- stats -----------------------------------------------------------------------------------------


def test_stats_shows_the_outbox_backlog(
    single: Cli, sqlite_store: SQLStore, broker: Broker
) -> None:
    stage(sqlite_store, "old", broker.queue, age=90)
    other = f"{broker.queue}-other"
    stage(sqlite_store, "new", other, age=30)
    assert sqlite_store.create(JobRecord(id="queued", name="t", queue=other))
    stats = single.quick("stats", "--json").json()
    assert stats["outbox"]["backlog"] == 2
    assert 90 <= stats["outbox"]["oldest_staged_age"] < 150
    assert stats["totals"]["staged"] == 2 and stats["totals"]["queued"] == 1
    assert sum(stats["totals"].values()) == 3
    assert {q["queue"]: q["counts"] for q in stats["queues"]} == {
        broker.queue: {"staged": 1},
        other: {"staged": 1, "queued": 1},
    }
    last = single.quick("stats").ok().stdout.splitlines()[-1]
    assert re.fullmatch(r"outbox: 2 staged, not yet published; the oldest staged 1m3\ds ago", last)

    single("relay", "--once", "--broker", BROKER, "--grace", "0").ok()
    stats = single.quick("stats", "--json").json()
    assert stats["outbox"] == {"backlog": 0, "oldest_staged_age": None}
    assert stats["totals"]["queued"] == 3
    assert "outbox" not in single.quick("stats").ok().stdout
