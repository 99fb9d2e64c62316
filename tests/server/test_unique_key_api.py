"""``unique_key`` in the API's job list and bulk selections: the jobs published with a key;
an empty key is a 422 naming the field."""

from __future__ import annotations

import warnings

from jobledger.model import JobRecord, JobState
from jobledger.stores.base import Store, Transition
from jobledger.testing.contract.records import started

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient


def test_the_job_list_and_cancel_filter_by_unique_key(client: TestClient, store: Store) -> None:
    assert store.create(started("a", "w:1", unique_key="charge:1"))
    done = Transition(to=JobState.SUCCEEDED, expect=frozenset({JobState.STARTED}))
    assert store.transition("a", done)
    for job_id, key in (("b", "charge:1"), ("c", "charge:2"), ("d", None)):
        assert store.create(JobRecord(id=job_id, name="t", unique_key=key))

    def listed(**params: object) -> set[str]:
        r = client.get("/api/v1/jobs", params=params)
        assert r.status_code == 200, r.text
        return {j["id"] for j in r.json()["jobs"]}

    assert listed(unique_key="charge:1") == {"a", "b"}
    assert listed(unique_key=["charge:1", "charge:2"]) == {"a", "b", "c"}
    assert listed(unique_key="charge:1", state="queued") == {"b"}
    for bad in ("", "k" * 256):
        r = client.get("/api/v1/jobs", params={"unique_key": bad})
        assert r.status_code == 422 and r.json()["field"] == "unique_key", r.text
    r = client.post("/api/v1/cancel", json={"unique_key": [""]})
    assert r.status_code == 422 and r.json()["field"] == "unique_key", r.text
    assert client.post("/api/v1/cancel", json={"unique_key": []}).status_code == 422  # no filter
    report = client.post("/api/v1/cancel", json={"unique_key": ["charge:1"]}).json()
    assert report["done"] == ["b"] and report["skipped"] == {"a": "is succeeded"}
    assert store.get("c").state is JobState.QUEUED  # type: ignore[union-attr]
