"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against
``jobledger serve`` running as a subprocess on a free loopback port over PostgreSQL.

Covers: filter the job list, open a failed job, restart it (through a recording integration
imported into the server with ``--app``), see it queued; arguments holding ``<script>`` render
as text; with a token set, the dashboard asks for a login first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from jobledger.model import JobRecord, JobState
from jobledger.stores.sql import SQLStore
from jobledger.testing import wait_for

from .browser import Server, chromium
from .conftest import TOKEN

XSS = "<script>window.__pwned = 1</script><img src=x onerror='window.__pwned=2'>"


@pytest.fixture
def publish_log(tmp_path: Path) -> Path:
    return tmp_path / "published.txt"


@pytest.fixture
def server(store_url: str, store: SQLStore, publish_log: Path) -> Iterator[Server]:
    running = Server(store_url, publish_log)
    yield running
    running.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    yield context.new_page()
    context.close()


def _seed(store: SQLStore) -> None:
    store.create(
        JobRecord(
            id="mail-failed-1",
            name="mail.send",
            system="http",
            queue="mail",
            state=JobState.FAILED,
            args=["bob@example.com"],
            error="SMTP said no",
        )
    )
    for i in range(3):
        store.create(
            JobRecord(
                id=f"mail-queued-{i}", name="mail.send", system="http", queue="mail", args=[i]
            )
        )
    store.create(
        JobRecord(
            id="xss-1",
            name="evil",
            system="http",
            queue="web",
            args=[XSS],
            kwargs={"k": "</pre><b>bold</b>"},
            state=JobState.FAILED,
            error=XSS,
        )
    )


def test_filter_open_restart(
    server: Server, store: SQLStore, page: Page, publish_log: Path
) -> None:
    _seed(store)
    page.goto(server.url + "/")
    expect(page.locator('.tile.state-failed [data-state="failed"]')).to_have_text("2")
    page.click("nav >> text=Jobs")
    expect(page.locator("#job-table tbody tr")).to_have_count(5)
    page.check('input[name="state"][value="failed"]')
    page.fill('input[name="queue"]', "mail")
    page.click("#apply-filter")
    rows = page.locator("#job-table tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-job-id", "mail-failed-1")
    assert "state=failed" in page.url and "queue=mail" in page.url

    page.click("text=mail-failed-1")
    expect(page.locator("#job-state")).to_have_text("failed")
    expect(page.locator("#error")).to_have_text("SMTP said no")
    page.click("#restart")
    expect(page.locator(".notice")).to_contain_text("queued again")
    expect(page.locator("#job-state")).to_have_text("queued")
    wait_for(
        "the publish",
        lambda: publish_log.exists() and "mail-failed-1" in publish_log.read_text(),
        10,
    )
    record = store.get("mail-failed-1")
    assert record is not None and record.state is JobState.QUEUED and record.restarts == 1


def test_bulk_cancel_asks_first(server: Server, store: SQLStore, page: Page) -> None:
    _seed(store)
    page.goto(server.url + "/jobs?state=queued")
    expect(page.locator("#job-table tbody tr")).to_have_count(3)
    page.check("#select-all")
    page.click('button[name="action"][value="cancel"]')
    expect(page.locator("h1")).to_have_text("Cancel 3 jobs?")
    assert store.get("mail-queued-0").state is JobState.QUEUED  # type: ignore[union-attr]
    page.click("#confirm")
    expect(page.locator("h1")).to_have_text("Cancelled: 3 jobs")
    assert all(store.get(f"mail-queued-{i}").state is JobState.CANCELLED for i in range(3))  # type: ignore[union-attr]


def test_script_in_arguments_renders_as_text(server: Server, store: SQLStore, page: Page) -> None:
    _seed(store)
    page.goto(server.url + "/jobs/xss-1")
    expect(page.locator("#args")).to_contain_text("<script>window.__pwned = 1</script>")
    expect(page.locator("#error")).to_have_text(XSS)
    expect(page.locator("#args")).to_contain_text("</pre><b>bold</b>")
    assert page.locator("b", has_text="bold").count() == 0
    page.goto(server.url + "/jobs")
    expect(page.locator('tr[data-job-id="xss-1"] td.args')).to_contain_text("<script>")
    assert page.evaluate("window.__pwned") is None


def test_dashboard_refreshes_itself(server: Server, store: SQLStore, page: Page) -> None:
    page.goto(server.url + "/jobs")
    expect(page.locator("#job-table tbody tr")).to_have_text("No jobs match.")
    store.create(JobRecord(id="late-arrival", name="t", system="http"))
    expect(page.locator('tr[data-job-id="late-arrival"]')).to_have_count(1, timeout=15000)


def test_token_dashboard_asks_for_login(
    store_url: str, store: SQLStore, page: Page, publish_log: Path
) -> None:
    _seed(store)
    guarded = Server(store_url, publish_log, token=TOKEN)
    try:
        page.goto(guarded.url + "/jobs/mail-failed-1")
        expect(page.locator("h1")).to_have_text("Log in")
        assert "/login" in page.url
        page.fill('input[name="token"]', "not-the-token-at-all")
        page.click("#login-form button")
        expect(page.locator("#login-failed")).to_be_visible()
        page.fill('input[name="token"]', TOKEN)
        page.click("#login-form button")
        expect(page.locator("#job-state")).to_have_text("failed")
        # an API write without the bearer token is refused even from the logged-in browser
        status = page.evaluate(
            "fetch('/api/v1/jobs/mail-failed-1/restart', {method: 'POST'}).then(r => r.status)"
        )
        assert status == 401
    finally:
        guarded.stop()
