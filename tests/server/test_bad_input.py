"""Bad input: always a 4xx JSON error naming the field, never a 500, and nothing stored
altered. A ledger that is down answers 503 with JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from jobledger.config import Settings
from jobledger.model import JobRecord, JobState
from jobledger.server import create_app
from jobledger.stores.sql import SQLStore

from .conftest import AppFactory


@pytest.fixture
def seeded(client: TestClient, store: SQLStore) -> TestClient:
    assert store.create(JobRecord(id="keep-1", name="t", system="http", args=[1]))
    return client


@pytest.mark.parametrize(
    ("kwargs", "status", "field"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "body"),
        ({"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 422, "body"),
        ({"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, "body"),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "body"),
        ({"json": {"job_id": 5, "job_class": "t"}}, 422, "job_id"),
        ({"json": {"job_id": "keep-1", "job_class": ["t"]}}, 422, "job_class"),
        ({"json": {"job_id": "../etc/passwd", "job_class": "t"}}, 422, "job_id"),
        ({"json": {"job_id": "a b", "job_class": "t"}}, 422, "job_id"),
        ({"json": {"job_id": "n-1", "job_class": "t", "arguments": "{oops"}}, 422, "arguments"),
        ({"json": {"job_id": "n-1", "job_class": "t", "arguments": "NaN"}}, 422, "arguments"),
        ({"json": {"job_id": "n-1", "job_class": "t\x00"}}, 422, "job_class"),
        ({"json": {"job_id": "n-1", "job_class": "x" * 300}}, 422, "job_class"),
        ({"data": {"job_id": "n-1", "job_class": "t", "queue": ""}}, 422, "queue"),
        ({"json": {"job_id": "n-1"}}, 404, "job_class"),
    ],
)
def test_bad_seed_bodies(
    seeded: TestClient, store: SQLStore, kwargs: dict, status: int, field: str
) -> None:  # type: ignore[type-arg]
    before = store.get("keep-1")
    r = seeded.post("/api/v1/jobs", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"]
    assert store.get("keep-1") == before and store.get("n-1") is None


def test_huge_bodies_are_refused(make_client: AppFactory, store: SQLStore) -> None:
    client = make_client(max_body_bytes=4096)
    big = json.dumps({"job_id": "big-1", "job_class": "t", "arguments": json.dumps(["x" * 10000])})
    r = client.post("/api/v1/jobs", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"

    def chunks():  # no Content-Length: the limit applies to the streamed body
        yield big[:3000].encode()
        yield big[3000:].encode()

    r = client.post("/api/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert store.get("big-1") is None


def test_a_streamed_form_past_the_limit_is_413(make_client: AppFactory, store: SQLStore) -> None:
    """A form sent in chunks (no Content-Length) of 10 MB: the API and the dashboard answer
    413, not a 400 about a malformed form."""
    client = make_client(max_body_bytes=4096)
    form = {"content-type": "application/x-www-form-urlencoded"}

    def chunks() -> Iterator[bytes]:
        yield b"job_id=big-1&job_class=t&arguments="
        for _ in range(160):
            yield b"x" * 65536

    r = client.post("/api/v1/jobs", content=chunks(), headers=form)
    assert r.status_code == 413, r.text
    assert r.json() == {"error": "request body larger than 4096 bytes", "field": "body"}
    page = client.post("/login", content=chunks(), headers=form)
    assert page.status_code == 413 and "larger than 4096 bytes" in page.text
    assert store.get("big-1") is None


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/api/v1/jobs", {"state": "sleeping"}, "state"),
        ("/api/v1/jobs", {"limit": "0"}, "limit"),
        ("/api/v1/jobs", {"limit": "many"}, "limit"),
        ("/api/v1/jobs", {"older_than": "-3d"}, "older_than"),
        ("/api/v1/jobs", {"older_than": "soon"}, "older_than"),
        ("/api/v1/jobs", {"cursor": "garbage!"}, "cursor"),
        ("/api/v1/jobs", {"match": "(unclosed", "regex": "true"}, "match"),
        ("/api/v1/jobs", {"match": "a\x00b"}, "match"),
        ("/api/v1/durations", {"kind": "sideways"}, "kind"),
    ],
)
def test_bad_queries(seeded: TestClient, path: str, params: dict[str, str], field: str) -> None:
    r = seeded.get(path, params=params)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


def test_ids_with_path_characters(seeded: TestClient, store: SQLStore) -> None:
    for path in ("/api/v1/jobs/a%2Fb/started", "/api/v1/jobs/..%2F..%2Fx", "/api/v1/jobs/a%20b"):
        r = (
            seeded.post(path, data={"job_class": "t"})
            if path.endswith("started")
            else seeded.get(path)
        )
        assert 400 <= r.status_code < 500 and "error" in r.json()
    r = seeded.post("/api/v1/restart", json={"ids": ["ok-1", "no/pe"]})
    assert r.status_code == 422 and r.json()["field"] == "ids"
    r = seeded.post("/api/v1/restart", json={"state": ["failed"], "match": "(x", "regex": True})
    assert r.status_code == 422 and r.json()["field"] == "match"
    assert store.get("keep-1").state is JobState.QUEUED  # type: ignore[union-attr]


def test_unknown_route_and_method_are_json(seeded: TestClient) -> None:
    assert seeded.get("/api/v1/nothing").json()["error"]
    r = seeded.delete("/api/v1/jobs")
    assert r.status_code == 405 and r.json()["error"]


def test_ledger_down_is_503_json(store: SQLStore) -> None:
    down = Settings(database_url="postgresql://nobody@127.0.0.1:1/none")
    with TestClient(create_app(down, maintenance=False)) as client:
        for method, path, kwargs in (
            ("GET", "/api/v1/jobs", {}),
            ("GET", "/api/v1/stats", {}),
            ("POST", "/api/v1/jobs", {"json": {"job_id": "x-1", "job_class": "t"}}),
            (
                "POST",
                "/api/v1/events",
                {"json": {"events": [{"event": "queued", "job_id": "x", "job_class": "t"}]}},
            ),
        ):
            r = client.request(method, path, **kwargs)
            assert r.status_code == 503, (path, r.text)
            assert "unavailable" in r.json()["error"]
        assert client.get("/healthz").status_code == 503
        metrics = client.get("/metrics").text
        assert "jobledger_ledger_up 0.0" in metrics
        assert client.get("/").status_code == 503
