"""The dashboard as a tool, in Debian's Chromium: recovered jobs marked and filterable, sortable
columns, a chart with axes and units, one tile per fact, a page per worker instance, a job's
attempt history, a layout that works 420 px wide, huge arguments cut and loaded on request, and
a page that refreshes itself without refetching what did not change.

One seeded ledger and one ``jobledger serve`` for the module (read-only tests). With
``JOBLEDGER_SCREENSHOTS=docs/screenshots`` the tests also save the README's pictures.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, Response, expect
from sqlalchemy import update

from jobledger.model import CLAIMABLE_STATES, Instance, JobRecord, JobState, to_datetime
from jobledger.stores.base import Transition
from jobledger.stores.schema import instances
from jobledger.stores.sql import SQLStore
from ledgerdb import database_url, empty_sql_store

from .browser import Server, chromium, shoot

S = JobState
HUGE = "x" * 800_000
WORKER = Instance(
    name="a@vm", nonce="5d1e0c9a7b21", hostname="vm", pid=4242, queues=("reports", "mail"),
    stats={"claims": 18, "duplicates_skipped": 2},
)  # fmt: skip
GONE = Instance(name="b@vm", nonce="0c41f2aa9e07", hostname="vm", pid=4100, queues=("reports",))
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/reports.py", line 41, in build\n'
    "    rows = fetch(model_id)\n"
    "TimeoutError: the warehouse did not answer in 30s"
)


def _story(store: SQLStore) -> None:
    """report-7: retried, its worker died under it, failed for good, restarted, running now."""
    store.create(
        JobRecord(id="report-7", name="reports.build", queue="reports", args=[2026],
                  kwargs={"model_id": 4242}, system="celery")
    )  # fmt: skip
    moves = [
        Transition(S.STARTED, CLAIMABLE_STATES, owner="a@vm:11aa22bb33cc"),
        Transition(S.RETRYING, frozenset({S.STARTED}), error=TRACEBACK),
        Transition(S.STARTED, CLAIMABLE_STATES, owner=GONE.id),
        Transition(S.QUEUED, frozenset({S.STARTED}), reason="recovery"),
        Transition(S.STARTED, CLAIMABLE_STATES, owner="a@vm:11aa22bb33cc"),
        Transition(S.FAILED, frozenset({S.STARTED}), error="ValueError: model 4242 has no rows"),
        Transition(S.QUEUED, frozenset({S.FAILED}), reason="restart"),
        Transition(S.STARTED, CLAIMABLE_STATES, owner=WORKER.id),
    ]
    for move in moves:
        assert store.transition("report-7", move), move


def _seed(store: SQLStore) -> None:
    now = store.now()
    _story(store)
    store.create(
        JobRecord(id="import-huge", name="imports.rows", queue="imports", args=[HUGE],
                  system="celery")
    )  # fmt: skip
    for i in range(4):
        store.create(
            JobRecord(id=f"mail-{i}", name="mail.send", queue="mail", system="celery",
                      args=[f"user{i}@example.com"], attempts=i)
        )  # fmt: skip
    for i in range(30):  # finished over the last hour: the chart
        finished = now - 30 - 100 * i  # within the last 50 minutes
        store.create(
            JobRecord(id=f"done-{i}", name="mail.send", queue="mail", system="celery",
                      state=S.FAILED if i % 7 == 3 else S.SUCCEEDED, attempts=1,
                      owner=WORKER.id, queued_at=to_datetime(finished - 3),
                      started_at=to_datetime(finished - 1.5), finished_at=to_datetime(finished),
                      error="SMTPServerDisconnected" if i % 7 == 3 else None)
        )  # fmt: skip
    store.create(
        JobRecord(id="orphan-3", name="reports.build", queue="reports", system="celery",
                  state=S.DEAD, recoveries=3, attempts=3, error="poison pill: recovered 3 times")
    )  # fmt: skip
    store.heartbeat(GONE)
    with store.engine.begin() as conn:  # its last beat ten minutes ago: dead
        conn.execute(
            update(instances).where(instances.c.id == GONE.id).values(heartbeat_at=now - 600)
        )
    beat(store)


def beat(store: SQLStore) -> None:
    """The live worker's heartbeat (the server judges it alive for a TTL after it)."""
    store.heartbeat(Instance(**{**WORKER.__dict__, "holding": (("report-7", 2), ("mail-0", 0))}))


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLStore]:
    store = empty_sql_store(database_url("postgresql", tmp_path_factory.mktemp("ledger")))
    _seed(store)
    yield store
    store.close()


@pytest.fixture(scope="module")
def server(ledger: SQLStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(str(ledger.url.render_as_string(hide_password=False)),
                     tmp_path_factory.mktemp("publish") / "published.txt")  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def test_recovered_jobs_are_marked_and_filterable(server: Server, page: Page) -> None:
    page.goto(server.url + "/")
    expect(page.locator("#recovered-jobs")).to_have_text("2")
    shoot(page, "overview")
    page.click("#recovered-jobs")
    rows = page.locator("#job-table tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator("#recovered-only")).to_be_checked()
    expect(page.locator('tr[data-job-id="orphan-3"] .badge.recovered')).to_have_text(
        "\u21bb recovered \u00d73"  # the arrow, and a multiplication sign
    )
    page.goto(server.url + "/jobs")
    expect(page.locator("#job-table tr.was-recovered")).to_have_count(2)
    shoot(page, "jobs")
    page.check("#recovered-only")
    page.click("#apply-filter")
    expect(rows).to_have_count(2)
    assert "recovered=1" in page.url


def test_columns_sort_and_keep_their_order(server: Server, page: Page) -> None:
    page.goto(server.url + "/jobs?queue=mail&state=queued")
    ids = page.locator("#job-table tbody tr")
    expect(ids).to_have_count(4)
    tries = page.locator("#job-table th", has_text="tries")
    tries.click()
    expect(tries).to_have_attribute("aria-sort", "ascending")
    assert [ids.nth(i).get_attribute("data-job-id") for i in range(4)] == [
        "mail-0", "mail-1", "mail-2", "mail-3",
    ]  # fmt: skip
    tries.click()
    expect(tries).to_have_attribute("aria-sort", "descending")
    assert ids.first.get_attribute("data-job-id") == "mail-3"
    page.reload()  # the order is kept across a reload (and each refresh)
    expect(page.locator("#job-table th", has_text="tries")).to_have_attribute(
        "aria-sort", "descending"
    )
    assert ids.first.get_attribute("data-job-id") == "mail-3"


def test_the_chart_has_axes_and_units_and_each_fact_one_tile(server: Server, page: Page) -> None:
    page.goto(server.url + "/")
    chart = page.locator("#chart")
    expect(chart.locator(".y-axis .title")).to_have_text("jobs / 5 min")
    expect(chart.locator(".x-axis .title")).to_have_text("minutes ago")
    expect(chart.locator(".x-axis text", has_text="now")).to_have_count(1)
    expect(chart.locator(".x-axis text", has_text="\u221260")).to_have_count(1)
    ticks = chart.locator(".y-axis text:not(.title)").all_text_contents()
    assert ticks[0] == "0" and int(ticks[-1]) >= 3  # the busiest 5 minutes held 3 jobs
    expect(chart.locator("rect.ok")).to_have_count(12)
    expect(page.locator("#succeeded-hour")).to_have_text("26")
    expect(page.locator("#failed-hour")).to_have_text("5")  # and orphan-3, dead just now
    links = [a.get_attribute("href") for a in page.locator("a.tile").all()]
    assert len(links) == len(set(links)), links  # no fact twice (dead, staged: once each)
    assert page.locator(".tile .label", has_text="dead").all_text_contents() == [
        "dead", "failed or dead, last hour", "jobs recovered from dead workers",
    ]  # fmt: skip


def test_each_instance_shows_what_it_holds_and_its_last_beat(
    server: Server, ledger: SQLStore, page: Page
) -> None:
    beat(ledger)
    page.goto(server.url + "/instances")
    live = page.locator(f'tr[data-instance-id="{WORKER.id}"]')
    expect(live.locator(".badge")).to_have_text("running")
    expect(live.locator("td").nth(2)).to_contain_text("ago")
    expect(page.locator(f'tr[data-instance-id="{GONE.id}"] .badge')).to_have_text("dead")
    expect(page.locator("main")).to_contain_text("5m after its last heartbeat")
    shoot(page, "instances")
    live.locator("a").click()
    expect(page.locator("#instance-name")).to_have_text("a@vm")
    held = page.locator("#holding tbody tr")
    expect(held).to_have_count(2)
    expect(page.locator('#holding tr[data-job-id="report-7"]')).to_contain_text("started")
    expect(page.locator("#stats")).to_contain_text("duplicates skipped")
    shoot(page, "instance")


def test_the_job_page_tells_each_attempt(server: Server, page: Page) -> None:
    page.goto(server.url + "/jobs/report-7")
    runs = page.locator("#attempts tbody tr")
    expect(runs).to_have_count(4)
    outcomes = page.locator("#attempts .badge").all_text_contents()
    assert outcomes == ["retrying", "recovered", "failed", "started"]
    expect(runs.nth(1)).to_contain_text("b@vm")
    expect(runs.nth(0).locator("summary")).to_have_text(
        "TimeoutError: the warehouse did not answer in 30s"
    )
    expect(runs.nth(3).locator("td").last).to_have_text("—")  # running: no error of its own
    steps = page.locator("#timeline li b").all_text_contents()
    assert steps == [
        "created", "queued", "started", "retrying", "started", "recovered", "started",
        "failed", "restarted", "started",
    ]  # fmt: skip
    expect(page.locator("#queued-to-finished")).to_have_text("-")  # running: no duration
    expect(page.locator("h1 .badge.recovered")).to_be_visible()
    runs.nth(0).locator("summary").click()
    expect(runs.nth(0).locator("pre.error")).to_contain_text('File "/app/reports.py"')
    shoot(page, "job")


@pytest.mark.parametrize("path", ["/", "/jobs", "/jobs/report-7", "/instances"])
def test_the_layout_works_420_px_wide(
    server: Server, browser: Browser, ledger: SQLStore, path: str
) -> None:
    beat(ledger)
    context = browser.new_context(viewport={"width": 420, "height": 860})
    page = context.new_page()
    page.goto(server.url + path)
    expect(page.locator("h1")).to_be_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 420, f"{path} scrolls sideways: {width}px wide"
    if path == "/jobs":
        shoot(page, "jobs-420px")
    context.close()


def test_huge_arguments_are_cut_loaded_on_request_and_never_refetched(
    server: Server, page: Page
) -> None:
    seen: list[Response] = []
    page.on("response", lambda r: seen.append(r) if "/jobs/import-huge" in r.url else None)
    page.goto(server.url + "/jobs")
    assert len(page.content()) < 100_000  # the 800 KB argument is cut in the list
    page.goto(server.url + "/jobs/import-huge")
    expect(page.locator("#args")).to_contain_text("xxxx")
    assert len(page.locator("#args").text_content() or "") < 5000
    # the page refreshes itself every 5 s: once in full, then 304s without a body
    page.wait_for_timeout(16_000)
    refreshes = [r.status for r in seen if r.request.headers.get("x-refresh")]
    assert refreshes[:1] == [200] and refreshes[1:] and set(refreshes[1:]) == {304}, refreshes
    page.click("#load-args")
    expect(page.locator("#load-args")).to_have_count(0)
    assert len(page.locator("#args").text_content() or "") > 800_000
