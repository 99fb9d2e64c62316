"""Auth: with a token, writes need the bearer token and the dashboard a login; every dashboard
form needs its CSRF token; without a token, cross-site browser writes are refused."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from jobledger.model import JobRecord, JobState
from jobledger.stores.sql import SQLStore

from .conftest import BEARER, TOKEN, AppFactory

FORM = {"job_id": "a-1", "job_class": "t", "arguments": "[]"}


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def test_writes_need_the_token(auth_client: TestClient, store: SQLStore) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0000000000"},
        {"Authorization": TOKEN},
    ):
        r = auth_client.post("/api/v1/jobs", data=FORM, headers=headers)
        assert r.status_code == 401 and r.json()["field"] == "authorization"
    assert store.get("a-1") is None
    assert auth_client.post("/api/v1/restart", json={"ids": ["a-1"]}).status_code == 401
    assert auth_client.post("/api/v1/events", json={"events": []}).status_code == 401
    r = auth_client.post("/api/v1/jobs", data=FORM, headers=BEARER)
    assert r.status_code == 201 and store.get("a-1") is not None


def test_reads_closed_unless_opened(auth_client: TestClient, make_client: AppFactory) -> None:
    assert auth_client.get("/api/v1/jobs").status_code == 401
    assert auth_client.get("/metrics").status_code == 401
    assert auth_client.get("/api/v1/jobs", headers=BEARER).status_code == 200
    assert auth_client.get("/healthz").status_code == 200
    opened = make_client(api_token=TOKEN, open_reads=True)
    assert opened.get("/api/v1/jobs").status_code == 200
    assert opened.get("/").status_code == 200
    assert opened.post("/api/v1/jobs", data=FORM).status_code == 401


def test_dashboard_login(auth_client: TestClient, store: SQLStore) -> None:
    r = auth_client.get("/jobs?state=failed", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    page = auth_client.get(r.headers["location"])
    assert "Log in" in page.text
    csrf = _csrf(page.text)
    bad = auth_client.post("/login", data={"csrf": csrf, "token": "nope", "next": "/jobs"})
    assert bad.status_code == 401
    no_csrf = auth_client.post("/login", data={"token": TOKEN, "next": "/jobs"})
    assert no_csrf.status_code == 403
    ok = auth_client.post(
        "/login",
        data={"csrf": csrf, "token": TOKEN, "next": "//evil.example/"},
        follow_redirects=False,
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    assert auth_client.get("/jobs").status_code == 200
    # a logged-in session reads the API too (the dashboard's own fetches)
    assert auth_client.get("/api/v1/stats").status_code == 200
    # but it does not write through the API: writes take the bearer token only
    assert auth_client.post("/api/v1/jobs", data=FORM).status_code == 401


def test_forms_without_csrf_are_refused(client: TestClient, store: SQLStore, recorder) -> None:  # type: ignore[no-untyped-def]
    assert store.create(JobRecord(id="f-1", name="t", system="http", state=JobState.FAILED))
    page = client.get("/jobs/f-1")
    csrf = _csrf(page.text)
    for data in ({}, {"csrf": "forged"}, {"csrf": csrf + "x"}):
        r = client.post("/jobs/f-1/restart", data=data)
        assert r.status_code == 403
        r = client.post("/bulk", data={**data, "action": "cancel", "ids": "f-1"})
        assert r.status_code == 403
    assert store.get("f-1").state is JobState.FAILED  # type: ignore[union-attr]
    assert recorder.published == []
    # another visitor's token does not fit this session
    other = TestClient(client.app)
    other_csrf = _csrf(other.get("/jobs/f-1").text)
    assert client.post("/jobs/f-1/restart", data={"csrf": other_csrf}).status_code == 403
    # the genuine token works
    r = client.post("/jobs/f-1/restart", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and recorder.published == ["f-1"]


def test_forms_need_a_login_when_a_token_is_set(auth_client: TestClient, store: SQLStore) -> None:
    assert store.create(JobRecord(id="f-1", name="t", system="http", state=JobState.FAILED))
    csrf = _csrf(auth_client.get("/login").text)
    r = auth_client.post("/jobs/f-1/cancel", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert store.get("f-1").state is JobState.FAILED  # type: ignore[union-attr]


def test_cross_site_writes_refused_without_token(client: TestClient, store: SQLStore) -> None:
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = client.post("/api/v1/jobs", data=FORM, headers=headers)
        assert r.status_code == 403 and r.json()["field"] == "origin"
    assert store.get("a-1") is None
    same = client.post("/api/v1/jobs", data=FORM, headers={"Origin": "http://testserver"})
    assert same.status_code == 201


def test_security_headers(client: TestClient) -> None:
    r = client.get("/")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert "httponly" in r.headers["set-cookie"].lower()
