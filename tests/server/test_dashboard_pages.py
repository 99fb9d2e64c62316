"""The dashboard's pages over HTTP (no browser): a page refetched unchanged costs a 304 and no
body, a job with huge arguments costs a list nothing (the full value is one API call away),
recovered jobs are filterable, an instance's page shows what it holds."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from jobledger.model import CLAIMABLE_STATES, Instance, JobRecord, JobState
from jobledger.stores.base import Transition
from jobledger.stores.sql import SQLStore

#: An argument of 800 KB: what made /jobs 1.2 MB and its page 2 MB before they cut it.
HUGE = "x" * 800_000


@pytest.fixture
def huge_job(store: SQLStore) -> str:
    store.create(JobRecord(id="huge-1", name="import.rows", args=[HUGE], kwargs={"n": 1}))
    return "huge-1"


@pytest.mark.parametrize("path", ["/", "/jobs", "/jobs/huge-1", "/instances"])
def test_an_unchanged_page_is_a_304_without_a_body(
    client: TestClient, store: SQLStore, huge_job: str, path: str
) -> None:
    first = client.get(path)
    assert first.status_code == 200 and first.headers["etag"]
    assert float(first.headers["x-ledger-now"]) > 0
    again = client.get(path, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == first.headers["etag"]
    store.create(JobRecord(id="another", name="t"))  # the ledger changed: so does the page
    if path in ("/", "/jobs"):
        changed = client.get(path, headers={"If-None-Match": first.headers["etag"]})
        assert changed.status_code == 200 and changed.headers["etag"] != first.headers["etag"]


def test_huge_arguments_are_cut_and_loaded_on_request(client: TestClient, huge_job: str) -> None:
    listing = client.get("/jobs")
    assert listing.status_code == 200 and len(listing.content) < 30_000
    page = client.get(f"/jobs/{huge_job}")
    assert page.status_code == 200 and len(page.content) < 30_000
    assert "Show all 781 KB" in page.text
    full = client.get(f"/api/v1/jobs/{huge_job}/arguments")
    assert full.status_code == 200 and full.json() == {"args": [HUGE], "kwargs": {"n": 1}}
    missing = client.get("/api/v1/jobs/nope/arguments")
    assert missing.status_code == 404 and "error" in missing.json()


def test_recovered_jobs_are_filterable(client: TestClient, store: SQLStore) -> None:
    store.create(JobRecord(id="saved", name="t", state=JobState.STARTED, owner="a@vm:1"))
    store.create(JobRecord(id="plain", name="t"))
    assert store.transition(
        "saved", Transition(JobState.QUEUED, frozenset({JobState.STARTED}), reason="recovery")
    )
    api = client.get("/api/v1/jobs", params={"recovered": "true"}).json()
    assert [j["id"] for j in api["jobs"]] == ["saved"]
    assert api["jobs"][0]["history"][0]["event"] == "recovered"
    page = client.get("/jobs?recovered=1").text
    assert 'data-job-id="saved"' in page and 'data-job-id="plain"' not in page
    assert 'recovered-jobs">1<' in client.get("/").text


def test_an_instance_page_shows_what_it_holds(client: TestClient, store: SQLStore) -> None:
    worker = Instance(name="a@vm", nonce="9f2c", holding=(("held-1", 0),), stats={"claims": 3})
    store.heartbeat(worker)
    store.create(JobRecord(id="held-1", name="reports.build"))
    assert store.transition(
        "held-1", Transition(JobState.STARTED, CLAIMABLE_STATES, owner=worker.id)
    )
    page = client.get(f"/instances/{worker.id}")
    assert page.status_code == 200
    assert 'data-job-id="held-1"' in page.text and "reports.build" in page.text
    assert client.get("/instances/nobody:0").status_code == 404


def test_a_job_shows_its_unique_key_on_its_page_and_in_the_api(
    client: TestClient, store: SQLStore
) -> None:
    store.create(JobRecord(id="unique-1", name="t", unique_key="invoice:<42>"))
    store.create(JobRecord(id="plain-1", name="t"))
    assert 'id="unique-key">invoice:&lt;42&gt;<' in client.get("/jobs/unique-1").text
    assert 'id="unique-key"' not in client.get("/jobs/plain-1").text
    assert client.get("/api/v1/jobs/unique-1").json()["unique_key"] == "invoice:<42>"
