"""``/metrics``, the maintenance loops (recovery sweep, prune) and ``jobledger serve``'s
refusal to expose a ledger without a token."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from jobledger.cli import app as cli_app
from jobledger.model import Instance, JobRecord, JobState
from jobledger.runtime.service import Loop
from jobledger.server.events import UNTRACKED
from jobledger.stores.base import Transition
from jobledger.stores.sql import SQLStore

from .conftest import AppFactory
from .recording import RecordingIntegration


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_metrics(client: TestClient, store: SQLStore) -> None:
    store.create(JobRecord(id="q-1", name="t", queue="mail"))
    store.create(JobRecord(id="d-1", name="t", queue="mail", state=JobState.DEAD))
    store.create(JobRecord(id="s-1", name="t", queue="mail", state=JobState.STAGED))
    store.heartbeat(
        Instance(
            name="w",
            nonce="1",
            holding=(("q-1", 0),),
            stats={"duplicates_skipped": 3, "claim_deferred": 1},
        )
    )
    client.post("/api/v1/jobs", data={"job_id": "q-1", "job_class": "t"})  # a duplicate
    text = client.get("/metrics").text
    assert 'jobledger_jobs{queue="mail",state="queued"} 1.0' in text
    assert 'jobledger_oldest_pending_seconds{queue="mail"}' in text
    assert "jobledger_dead_jobs 1.0" in text
    assert "jobledger_outbox_backlog 1.0" in text
    assert "jobledger_instances_alive 1.0" in text  # w:1, not the HTTP stand-in owner
    assert 'jobledger_duplicates_skipped_total{event="queued"} 1.0' in text
    assert "jobledger_ledger_up 1.0" in text
    # what the worker counted across its processes, as its last beat reported it
    assert 'jobledger_worker_events_total{event="duplicates_skipped",instance="w:1"} 3.0' in text
    assert 'jobledger_worker_events_total{event="claim_deferred",instance="w:1"} 1.0' in text
    assert 'jobledger_worker_holding{instance="w:1"} 1.0' in text


def test_the_supervisors_stand_in_is_no_worker(
    client: TestClient, store: SQLStore, store_url: str
) -> None:
    """With no worker running, every view says so: the stand-in owner the supervisor keeps
    beating (so anonymous HTTP jobs are never orphans) is neither counted nor listed, and an
    "all workers down" alert on ``jobledger_instances_alive`` can fire."""
    _until(lambda: store.is_alive(UNTRACKED.id, 30))
    text = client.get("/metrics").text
    assert "jobledger_instances_alive 0.0" in text and "jobledger_instances 0.0" in text
    assert client.get("/api/v1/instances").json() == {"instances": []}
    assert UNTRACKED.name not in client.get("/instances").text
    assert '0<small>/0</small></span><span class="label">instances alive' in client.get("/").text
    listed = CliRunner().invoke(cli_app, ["instances", "--json", "--database-url", store_url])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []

    beat = client.post("/api/v1/instances/web-1/heartbeat", data={"nonce": "supervisor"})
    assert beat.status_code == 422  # a client cannot hide as the stand-in
    assert client.post("/api/v1/instances/web-1/heartbeat").status_code == 200
    assert "jobledger_instances_alive 1.0" in client.get("/metrics").text


def test_loop_runs_and_stops_promptly() -> None:
    runs: list[float] = []
    loop = Loop("test", 0.05, lambda: runs.append(time.monotonic()))
    loop.start()
    _until(lambda: len(runs) >= 3)
    started = time.monotonic()
    loop.stop()
    assert time.monotonic() - started < 1.0 and not loop.running


def test_loop_survives_failures() -> None:
    calls: list[int] = []
    errors: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first run breaks")

    loop = Loop("flaky", 0.01, flaky, on_error=lambda: errors.append(1))
    loop.start()
    _until(lambda: len(calls) >= 3)
    loop.stop()
    assert errors == [1]


def test_maintenance_recovers_and_prunes(
    make_client: AppFactory, store: SQLStore, recorder: RecordingIntegration
) -> None:
    store.heartbeat(Instance(name="gone", nonce="1"))
    store.create(JobRecord(id="orphan-1", name="t", system="http"))
    store.transition(
        "orphan-1",
        Transition(to=JobState.STARTED, expect=frozenset({JobState.QUEUED}), owner="gone:1"),
    )
    store.create(JobRecord(id="old-1", name="t", state=JobState.SUCCEEDED))
    client = make_client(
        maintenance=True,
        heartbeat_interval=0.1,
        heartbeat_ttl=0.3,
        recovery_interval=0.1,
        prune_interval=0.1,
        keep_succeeded=0.0,
    )
    _until(lambda: store.get("old-1") is None)
    _until(lambda: recorder.published == ["orphan-1"])
    _until(lambda: store.get("orphan-1").state is JobState.QUEUED)  # type: ignore[union-attr]
    # the sweep counts what it moved after it returns: wait for the count, do not race it
    _until(lambda: "jobledger_recoveries_total 1.0" in client.get("/metrics").text)
    assert {loop.name for loop in client.app.state.loops} >= {"recovery", "prune"}  # type: ignore[attr-defined]


def test_no_maintenance_runs_no_loops(make_client: AppFactory) -> None:
    client = make_client(maintenance=False)
    assert [loop.name for loop in client.app.state.loops] == ["http-untracked-heartbeat"]  # type: ignore[attr-defined]


def test_serve_refuses_public_bind_without_token() -> None:
    result = CliRunner().invoke(
        cli_app, ["serve", "--host", "0.0.0.0", "--database-url", "sqlite://"]
    )
    assert result.exit_code == 2
    assert "JOBLEDGER_API_TOKEN" in result.output
