"""The seed's three endpoints driven as its client middleware drives them (form-encoded posts,
``arguments`` a JSON string), then the job seen through the JSON API and the CLI."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from jobledger.cli import app as cli_app
from jobledger.integrations.base import Registry
from jobledger.manager import Manager
from jobledger.model import HistoryEvent, JobRecord, JobState, Republish
from jobledger.server import events
from jobledger.stores.sql import SQLStore

from .conftest import AppFactory

SEED_FORM = {
    "arguments": json.dumps([42, "report"]),
    "job_class": "Reports::Build",
    "queue": "reports",
}


def _cli_show(url: str, job_id: str) -> dict[str, object]:
    result = CliRunner().invoke(cli_app, ["show", job_id, "--json", "--database-url", url])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_seed_lifecycle_form_encoded(client: TestClient, store_url: str) -> None:
    r = client.post("/api/v1/jobs", data={"job_id": "seed-1", **SEED_FORM})
    assert r.status_code == 201, r.text
    job = client.get("/api/v1/jobs/seed-1").json()
    assert (job["state"], job["system"], job["name"], job["queue"]) == (
        "queued",
        "sidekiq",
        "Reports::Build",
        "reports",
    )
    assert job["args"] == [42, "report"]
    assert _cli_show(store_url, "seed-1")["state"] == "queued"

    r = client.post("/api/v1/jobs/seed-1/started", data=SEED_FORM)
    assert r.status_code == 200 and r.json()["state"] == "started"
    assert client.get("/api/v1/jobs/seed-1").json()["state"] == "started"
    assert _cli_show(store_url, "seed-1")["state"] == "started"

    r = client.post("/api/v1/jobs/seed-1/complete", data=SEED_FORM)
    assert r.status_code == 200 and r.json()["applied"] is True
    done = client.get("/api/v1/jobs/seed-1").json()
    assert done["state"] == "succeeded" and done["started_to_finished"] is not None
    shown = _cli_show(store_url, "seed-1")
    assert shown["state"] == "succeeded" and shown["attempts"] == 1

    # the middleware may report twice: nothing changes, the answer still says so
    again = client.post("/api/v1/jobs/seed-1/complete", data=SEED_FORM)
    assert again.status_code == 200 and again.json()["applied"] is False


def test_seed_json_bodies_and_kwargs(client: TestClient) -> None:
    body = {"job_id": "seed-json", "arguments": json.dumps({"model_id": 7}), "job_class": "K"}
    assert client.post("/api/v1/jobs", json=body).status_code == 201
    job = client.get("/api/v1/jobs/seed-json").json()
    assert job["kwargs"] == {"model_id": 7} and job["queue"] == "default"
    found = client.get("/api/v1/jobs", params={"match": '"model_id": 7'}).json()["jobs"]
    assert [j["id"] for j in found] == ["seed-json"]


def test_started_and_complete_of_unknown_jobs(client: TestClient, store: SQLStore) -> None:
    # enough said: the job is recorded
    r = client.post("/api/v1/jobs/late-1/started", data=SEED_FORM)
    assert r.status_code == 201 and r.json()["state"] == "started"
    r = client.post("/api/v1/jobs/late-2/complete", data=SEED_FORM)
    assert r.status_code == 201 and client.get("/api/v1/jobs/late-2").json()["state"] == "succeeded"
    # not enough said: 4xx naming the missing field, nothing recorded
    for path in ("/api/v1/jobs/late-3/started", "/api/v1/jobs/late-3/complete"):
        r = client.post(path, data={"arguments": "[]"})
        assert r.status_code == 404
        assert r.json()["field"] == "job_class"
    assert store.get("late-3") is None


def test_failed_and_retrying(client: TestClient) -> None:
    client.post("/api/v1/jobs", data={"job_id": "f-1", **SEED_FORM})
    client.post("/api/v1/jobs/f-1/started", data=SEED_FORM)
    r = client.post("/api/v1/jobs/f-1/failed", data={"error": "boom", "will_retry": "true"})
    assert r.status_code == 200 and r.json()["state"] == "retrying"
    client.post("/api/v1/jobs/f-1/started", data=SEED_FORM)
    r = client.post("/api/v1/jobs/f-1/failed", json={"error": "Traceback: <boom>"})
    job = client.get("/api/v1/jobs/f-1").json()
    assert (job["state"], job["error"], job["attempts"]) == ("failed", "Traceback: <boom>", 2)
    missing = client.post("/api/v1/jobs/f-1/failed", json={})
    assert missing.status_code == 422 and missing.json()["field"] == "error"


def test_instances_heartbeat_and_owner_check(client: TestClient, store: SQLStore) -> None:
    r = client.post(
        "/api/v1/instances/web-1/heartbeat", data={"hostname": "h", "pid": "12", "queues": "a,b"}
    )
    assert r.status_code == 200 and r.json()["id"] == "web-1:http"
    listed = client.get("/api/v1/instances").json()["instances"]
    web = next(i for i in listed if i["name"] == "web-1")
    assert web["alive"] and web["queues"] == ["a", "b"]

    client.post("/api/v1/jobs", data={"job_id": "own-1", **SEED_FORM})
    client.post("/api/v1/jobs/own-1/started", data={**SEED_FORM, "instance": "web-1"})
    assert store.get("own-1").owner == "web-1:http"  # type: ignore[union-attr]
    # another instance may not finish it (invariant 3)
    r = client.post("/api/v1/jobs/own-1/complete", data={"instance": "web-2"})
    assert r.status_code == 409 and store.get("own-1").state.value == "started"  # type: ignore[union-attr]
    r = client.post("/api/v1/jobs/own-1/complete", data={})  # an anonymous report
    assert r.status_code == 409
    assert r.json()["error"] == (
        "job own-1 is started (owner web-1:http): not finished by an event that names no "
        "instance; the result is not applied"
    )
    r = client.post("/api/v1/jobs/own-1/complete", data={"instance": "web-1"})
    assert r.status_code == 200 and store.get("own-1").state.value == "succeeded"  # type: ignore[union-attr]


def test_untracked_starts_are_not_orphans(client: TestClient, store: SQLStore) -> None:
    client.post("/api/v1/jobs/anon-1/started", data=SEED_FORM)
    assert store.get("anon-1").owner == "http-untracked:supervisor"  # type: ignore[union-attr]
    assert [o.id for o in store.orphans(30.0)] == []


def test_batch_endpoint(client: TestClient) -> None:
    events = [{"event": "queued", "job_id": f"b-{i}", "job_class": "B"} for i in range(50)]
    events += [{"event": "started", "job_id": f"b-{i}"} for i in range(50)]
    events += [{"event": "complete", "job_id": f"b-{i}"} for i in range(25)]
    events += [{"event": "failed", "job_id": "b-30", "error": "x"}]
    events += [{"event": "complete", "job_id": "bad/id"}, {"event": "what", "job_id": "b-1"}]
    r = client.post("/api/v1/events", json={"events": events})
    assert r.status_code == 200
    body = r.json()
    assert body["failed"] == 2 and body["applied"] == len(events) - 2
    assert body["results"][-2]["field"] == "job_id" and body["results"][-1]["field"] == "event"
    stats = client.get("/api/v1/stats").json()["totals"]
    assert (stats["succeeded"], stats["started"], stats["failed"]) == (25, 24, 1)
    too_many = client.post("/api/v1/events", json={"events": [{}] * 1001})
    assert too_many.status_code == 422


def test_a_client_of_another_queue_system_names_it(client: TestClient) -> None:
    body = {"job_id": "rq-7", "job_class": "mail.send", "system": "rq"}
    assert client.post("/api/v1/jobs", data=body).status_code == 201
    assert client.get("/api/v1/jobs/rq-7").json()["system"] == "rq"
    bad = client.post("/api/v1/jobs", data={**body, "job_id": "x", "system": "Not A System"})
    assert bad.status_code == 422 and bad.json()["field"] == "system"


def test_no_restart_button_where_no_integration_can_publish(
    make_client: AppFactory, store: SQLStore
) -> None:
    """The recording integration publishes ``http`` jobs; nothing publishes ``rq`` ones."""
    client = make_client()
    for jid, system in (("f-http", "http"), ("f-rq", "rq")):
        store.create(JobRecord(id=jid, name="t", system=system, state=JobState.FAILED))
    assert 'id="restart"' in client.get("/jobs/f-http").text
    page = client.get("/jobs/f-rq").text
    assert 'id="restart"' not in page and 'id="no-restart"' in page
    assert 'value="restart"' not in client.get("/jobs?system=rq").text
    assert 'value="restart"' in client.get("/jobs?system=http").text
    bare = make_client(integrations=Registry())
    assert 'value="restart"' not in bare.get("/jobs").text


class InstantSidekiq:
    """Runs each pushed job at once, inside the push, reporting as the README's middleware
    does: the restart's own move has not landed yet when the job's reports arrive."""

    system = "http"

    def __init__(self, store: SQLStore, *, forward: bool) -> None:
        self.store = store
        self.forward = forward

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        form = dict(SEED_FORM)
        if self.forward:  # job.slice("jobledger_generation", "jobledger_republish"), as text
            form["jobledger_generation"] = str(record.generation)
            form["jobledger_republish"] = reason.value if reason else ""
        else:  # the seed's middleware sends neither; a blank field means the same
            form["jobledger_generation"] = ""
        report = events.JobEvent.model_validate(form)
        events.started(self.store, record.id, report, ttl=30.0)
        events.finished(self.store, record.id, report, JobState.SUCCEEDED)


@pytest.mark.parametrize("forward", [True, False], ids=["forwarded", "seed-middleware"])
def test_a_restart_run_before_its_own_move_landed(store: SQLStore, forward: bool) -> None:
    """A Ruby worker can take, run and report a restarted job before the restart's move to
    queued lands. With the payload's keys forwarded the claim accounts the restart itself;
    with the seed's middleware as it is, the job still runs once and ends succeeded."""
    store.create(
        JobRecord(id="fast-1", name="Reports::Build", system="http", state=JobState.FAILED)
    )
    integrations = Registry()
    integrations.register(InstantSidekiq(store, forward=forward))
    report = Manager(store, integrations=integrations).restart(["fast-1"])
    assert report.done == ["fast-1"], report
    record = store.get("fast-1")
    assert record is not None and record.state is JobState.SUCCEEDED
    assert record.attempts == 1
    if forward:
        assert (record.restarts, record.generation) == (1, 1)
        assert [e.event for e in record.history] == [HistoryEvent.RESTARTED]


def test_forwarded_payload_keys_are_checked(client: TestClient) -> None:
    client.post("/api/v1/jobs", data={"job_id": "k-1", **SEED_FORM})
    for field, value in (("jobledger_generation", "-1"), ("jobledger_republish", "again")):
        r = client.post("/api/v1/jobs/k-1/started", data={**SEED_FORM, field: value})
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert client.get("/api/v1/jobs/k-1").json()["state"] == "queued"
