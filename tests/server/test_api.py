"""The JSON API over a real PostgreSQL ledger: listings, paging, stats, durations, instances,
restart and cancel (by id, in bulk, dry-run) through the Integration seam."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient

from jobledger.integrations.base import Registry
from jobledger.model import Instance, JobRecord, JobState
from jobledger.stores.sql import SQLStore

from .conftest import AppFactory
from .recording import RecordingIntegration

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _add(store: SQLStore, job_id: str, state: JobState = JobState.QUEUED, **fields: object) -> None:
    values: dict[str, object] = {"name": "t.task", "system": "http", "queue": "q1", "state": state}
    values.update(fields)
    assert store.create(JobRecord(id=job_id, **values))  # type: ignore[arg-type]


def test_list_filters_and_paging(client: TestClient, store: SQLStore) -> None:
    for i in range(25):
        _add(
            store,
            f"job-{i:02d}",
            JobState.FAILED if i % 5 == 0 else JobState.QUEUED,
            queue="even" if i % 2 == 0 else "odd",
            args=[f"customer-{i}"],
            created_at=T0 + timedelta(seconds=i),
        )
    page = client.get("/api/v1/jobs", params={"limit": 10}).json()
    assert [j["id"] for j in page["jobs"]][:2] == ["job-24", "job-23"]
    seen = [j["id"] for j in page["jobs"]]
    while page["next_cursor"]:
        page = client.get(
            "/api/v1/jobs", params={"limit": 10, "cursor": page["next_cursor"]}
        ).json()
        seen += [j["id"] for j in page["jobs"]]
    assert sorted(seen) == [f"job-{i:02d}" for i in range(25)] and len(seen) == 25

    failed = client.get("/api/v1/jobs", params={"state": "failed"}).json()["jobs"]
    assert {j["id"] for j in failed} == {f"job-{i:02d}" for i in (0, 5, 10, 15, 20)}
    both = client.get("/api/v1/jobs", params=[("state", "failed"), ("queue", "odd")]).json()
    assert {j["id"] for j in both["jobs"]} == {"job-05", "job-15"}
    matched = client.get("/api/v1/jobs", params={"match": "customer-1"}).json()["jobs"]
    assert len(matched) == 11  # 1, 10-19
    regex = client.get(
        "/api/v1/jobs", params={"match": 'customer-2[34]$|customer-2[34]"', "regex": "true"}
    )
    assert {j["id"] for j in regex.json()["jobs"]} == {"job-23", "job-24"}
    old = client.get("/api/v1/jobs", params={"older_than": "1h"}).json()["jobs"]
    assert old == []


def test_one_job_stats_durations_instances(client: TestClient, store: SQLStore) -> None:
    _add(
        store,
        "done-1",
        JobState.SUCCEEDED,
        queued_at=T0,
        started_at=T0 + timedelta(seconds=1),
        finished_at=T0 + timedelta(seconds=4),
    )
    _add(store, "wait-1")
    store.heartbeat(Instance(name="w1", nonce="n1", hostname="h", pid=1))
    job = client.get("/api/v1/jobs/done-1").json()
    assert job["queued_to_finished"] == 4.0
    assert client.get("/api/v1/jobs/nope-1").status_code == 404
    stats = client.get("/api/v1/stats").json()
    assert stats["totals"]["succeeded"] == 1 and stats["queues"][0]["oldest_queued_age"] >= 0
    summary = client.get("/api/v1/durations", params={"kind": "started"}).json()["durations"]
    assert summary == [{"name": "t.task", "count": 1, "p50": 3.0, "p95": 3.0, "max": 3.0}]
    per_job = client.get("/api/v1/durations", params={"per_job": "true", "kind": "queued"}).json()
    assert per_job["jobs"] == [{"id": "done-1", "name": "t.task", "seconds": 4.0}]
    ids = {i["id"] for i in client.get("/api/v1/instances").json()["instances"]}
    assert "w1:n1" in ids


def test_restart_and_cancel(
    client: TestClient, store: SQLStore, recorder: RecordingIntegration
) -> None:
    _add(store, "f-1", JobState.FAILED, error="boom")
    _add(store, "f-2", JobState.DEAD)
    _add(store, "s-1", JobState.SUCCEEDED)
    _add(store, "q-1", JobState.QUEUED)

    dry = client.post("/api/v1/jobs/f-1/restart", params={"dry_run": "true"}).json()
    assert dry["done"] == ["f-1"] and recorder.published == []
    assert store.get("f-1").state is JobState.FAILED  # type: ignore[union-attr]
    done = client.post("/api/v1/jobs/f-1/restart").json()
    assert done["done"] == ["f-1"] and recorder.published == ["f-1"]
    restarted = store.get("f-1")
    assert restarted is not None and (restarted.state, restarted.restarts) == (JobState.QUEUED, 1)

    bulk = client.post("/api/v1/restart", json={"state": ["dead", "succeeded"], "dry_run": True})
    assert bulk.json()["done"] == ["f-2"] and bulk.json()["skipped"] == {"s-1": "is succeeded"}
    assert client.post("/api/v1/restart", json={"ids": ["f-2", "missing-1"]}).json()["skipped"] == {
        "missing-1": "not found"
    }
    assert store.get("f-2").state is JobState.QUEUED  # type: ignore[union-attr]

    assert client.post("/api/v1/cancel", json={}).status_code == 422
    cancelled = client.post("/api/v1/cancel", json={"queue": ["q1"], "state": ["queued"]}).json()
    assert sorted(cancelled["done"]) == ["f-1", "f-2", "q-1"]
    assert client.post("/api/v1/jobs/s-1/cancel").json()["skipped"] == {"s-1": "is succeeded"}
    assert client.post("/api/v1/jobs/zzz/cancel").status_code == 404


def test_restart_without_integration_says_what_to_install(
    make_client: AppFactory, store: SQLStore
) -> None:
    client = make_client(integrations=Registry())
    _add(store, "f-1", JobState.FAILED)
    r = client.post("/api/v1/jobs/f-1/restart")
    assert r.status_code == 409
    assert "no integration for queue system 'http'" in r.json()["error"]
    assert store.get("f-1").state is JobState.FAILED  # type: ignore[union-attr]


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}/started",
        "/api/v1/jobs/{job_id}/complete",
        "/api/v1/jobs/{job_id}/failed",
        "/api/v1/instances/{name}/heartbeat",
        "/api/v1/events",
        "/api/v1/stats",
        "/api/v1/durations",
        "/api/v1/restart",
        "/api/v1/cancel",
        "/metrics",
    ):
        assert path in paths, path
    seed_body = paths["/api/v1/jobs"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-www-form-urlencoded"} <= set(seed_body)
