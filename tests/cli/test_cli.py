"""The ``jobledger`` command against SQLite, PostgreSQL, MariaDB and Redis.

Most commands run in this process through the real entry point (``Cli.quick``: the same exit
status, stdout and stderr, ~1.5 s of interpreter start saved each); what depends on being a
process of its own (``migrate`` on each database, the environment, a terminal, a pipe, memory,
one bad-input line) runs ``jobledger`` as a real process.

Every ledger is seeded through the Store API (``create`` and :class:`Lifecycle`); every ``--json``
output is parsed and checked field by field; every bad input must end in exit status 2, one
``error:`` line on stderr and a ledger identical, row for row, to the one before.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from typer.testing import CliRunner

from jobledger.cli import app
from jobledger.model import JobRecord, JobState
from jobledger.stores import open_store
from jobledger.stores.base import Store
from jobledger.stores.redis import RedisStore
from jobledger.stores.schema import jobs
from jobledger.stores.sql import SQLStore
from ledgerdb import ledger_url, snapshot

from .helpers import (
    DAY,
    GONE_WORKER,
    LIVE_WORKER,
    RECORDING_APP,
    Cli,
    Ledger,
    Result,
    at,
    child_env,
    jobledger_command,
    read_log,
    restart_targets,
    run_in_process,
    run_jobledger,
    seed_ledger,
)

JOB_FIELDS = {
    "id", "name", "system", "queue", "args", "kwargs", "options", "tags", "state", "owner",
    "attempts", "recoveries", "restarts", "generation", "recent_recoveries", "history", "error",
    "created_at", "staged_at",
    "first_queued_at", "queued_at", "started_at", "finished_at", "recovered_at", "updated_at",
    "queued_to_finished", "started_to_finished", "runs", "unique_key",
}  # fmt: skip


def epoch(iso: str | None) -> float | None:
    return None if iso is None else datetime.fromisoformat(iso).timestamp()


def assert_age(value: float | None, expected: float, slack: float = 60.0) -> None:
    """An age measured a little after seeding: at least ``expected``, not much more."""
    assert value is not None
    assert expected - 0.01 <= value <= expected + slack, (value, expected)


def newest_first(ledger: Ledger, *ids: str) -> list[str]:
    wanted = set(ids)
    return [i for i in reversed(ledger.order) if i in wanted]


# -- migrate ---------------------------------------------------------------------------------


def test_migrate_creates_the_schema_in_a_fresh_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = run_jobledger(["migrate", "--database-url", url], cwd=tmp_path).ok()
    assert f"ledger schema is up to date in {url}" in result.stdout
    assert "argument search:" in result.stdout
    assert result.stderr == ""
    assert run_jobledger(["jobs", "--json", "--database-url", url]).ok().stdout == ""


def _ledger_id(store: Store) -> str:
    """The ledger id a fresh store on the same ledger reads."""
    reopened = open_store(ledger_url(store))
    assert isinstance(reopened, (SQLStore, RedisStore))
    return reopened.ledger_id()


def test_migrate_again_keeps_every_record(cli: Cli, ledger: Ledger) -> None:
    ledger_id = _ledger_id(ledger.store)  # named at its first migrate or use
    before = snapshot(ledger.store)
    result = cli("migrate").ok()
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ledger schema is up to date in ")
    assert lines[1].startswith("argument search: ")
    if isinstance(ledger.store, RedisStore):
        assert "a scan on the server" in lines[1]
    elif ledger.store.dialect != "postgresql":  # only PostgreSQL has a substring index
        assert lines[1] == "argument search: scan (no substring index on this database)"
    assert snapshot(ledger.store) == before
    assert _ledger_id(ledger.store) == ledger_id


# -- jobs ------------------------------------------------------------------------------------


def test_jobs_filters(cli: Cli, ledger: Ledger) -> None:
    """Every filter option, combined (the finer points of each are checked below)."""
    cases: list[tuple[list[str], list[str]]] = [
        (["--limit", "0"], newest_first(ledger, *ledger.order)),
        (["--limit", "3"], ["staged-1", "retry-1", "cancelled-1"]),
        (
            ["-s", "queued", "--state", "cancelled", "--queue", "mail", "--name", "send_email",
             "--match", "example.com", "--older-than", "50s", "--limit", "5"],
            ["mail-bob", "mail-alice"],
        ),
        (["--state", "failed", "-s", "dead", "--match", "order-[0-9]{5}", "--regex"],
         ["order-12345"]),
        (["-q", "billing", "-m", "100%"], ["charge-100"]),  # % is literal, not a wildcard
    ]  # fmt: skip
    results = cli.quick_each(*(["jobs", "--json", *args] for args, _ in cases))
    for (args, expected), result in zip(cases, results, strict=True):
        assert result.ids() == expected, f"jobs {args}\n{result}"
        assert result.stderr == "", result


def test_jobs_filter_details(cli: Cli, ledger: Ledger) -> None:
    """The finer points of each filter, on each database."""
    cases: list[tuple[list[str], list[str]]] = [
        ([], newest_first(ledger, *ledger.order)),
        (["--state", "queued"], newest_first(ledger, "mail-alice", "mail-bob", "charge-100x")),
        (["--state", "QUEUED "], newest_first(ledger, "mail-alice", "mail-bob", "charge-100x")),
        (["--state", "started"], ["report-4242"]),
        (["--queue", "mail"], newest_first(ledger, "mail-alice", "mail-bob", "cancelled-1")),
        (
            ["--queue", "mail", "-q", "media"],
            newest_first(
                ledger, "mail-alice", "mail-bob", "cancelled-1", "resize-1", "resize-2", "retry-1"
            ),
        ),
        (["--name", "resize_image"], ["retry-1", "resize-2", "resize-1"]),
        (["--name", "build_report", "-n", "nope"], ["staged-1", "report-4242"]),
        (["--match", "100%"], ["charge-100"]),
        (["--match", "4242"], ["report-4242"]),  # a kwargs value
        (["--match", "acme"], ["mail-alice"]),  # a tag
        (["--match", "alice_example"], []),  # _ is literal, not a wildcard
        (["--match", '"template": "reset"'], ["mail-bob"]),  # a JSON fragment with quotes
        (["--match", "café ☕"], ["retry-1"]),
        (["--match", "order-[0-9]{5}"], []),  # literal unless --regex
        (["--match", "order-[0-9]{5}", "--regex"], ["order-12345"]),
        (["-m", "inv_100[%X]_off", "--regex"], ["charge-100x", "charge-100"]),
        (["--older-than", "1d"], ["mail-bob"]),
        (["--older-than", "4m10s"], ["staged-1", "charge-100", "mail-bob"]),
        (["--older-than", "0"], newest_first(ledger, *ledger.order)),
        (["--state", "succeeded", "--queue", "mail"], []),
    ]
    for args, expected in cases:
        result = cli.quick("jobs", "--json", *args)
        assert result.ids() == expected, f"jobs {args}\n{result}"


def test_jobs_json_lines_carry_every_field(cli: Cli, ledger: Ledger) -> None:
    lines = {line["id"]: line for line in cli.quick("jobs", "--json").json_lines()}
    now = ledger.now
    for line in lines.values():
        assert set(line) == JOB_FIELDS
    alice = lines["mail-alice"]
    assert {k: alice[k] for k in JOB_FIELDS if not k.endswith("_at")} == {
        "id": "mail-alice",
        "name": "send_email",
        "system": "celery",
        "queue": "mail",
        "args": ["alice@example.com"],
        "kwargs": {"template": "welcome"},
        "options": {"priority": 5},
        "tags": {"tenant": "acme"},
        "generation": 0,
        "recent_recoveries": [],
        "history": [],
        "runs": [],
        "state": "queued",
        "owner": None,
        "attempts": 0,
        "recoveries": 0,
        "restarts": 0,
        "error": None,
        "queued_to_finished": None,
        "started_to_finished": None,
        "unique_key": None,
    }
    assert epoch(alice["created_at"]) == pytest.approx(now - 999, abs=1e-3)
    assert epoch(alice["queued_at"]) == pytest.approx(now - 60, abs=1e-3)
    assert alice["first_queued_at"] == alice["queued_at"]
    assert alice["started_at"] is alice["finished_at"] is alice["staged_at"] is None

    report = lines["report-4242"]
    assert report["state"] == "started"
    assert report["owner"] == LIVE_WORKER.id
    assert report["attempts"] == 1
    assert report["args"] == [2026, 11] and report["kwargs"] == {"model_id": 4242}
    assert epoch(report["started_at"]) >= now  # type: ignore[operator]

    resize = lines["resize-1"]
    assert resize["queued_to_finished"] == pytest.approx(90, abs=1e-3)
    assert resize["started_to_finished"] == pytest.approx(30, abs=1e-3)
    assert epoch(resize["finished_at"]) == pytest.approx(now - 10, abs=1e-3)

    assert lines["charge-100"]["error"] == "CardDeclined: insufficient funds"
    assert lines["charge-100"]["attempts"] == 3
    assert lines["order-12345"]["recoveries"] == 4
    assert lines["retry-1"]["args"] == ["café ☕.png"]
    assert epoch(lines["staged-1"]["staged_at"]) == pytest.approx(now - 500, abs=1e-3)


def test_jobs_table_for_people(cli: Cli, ledger: Ledger) -> None:
    full = cli.quick("jobs", "--limit", str(len(ledger.order)))  # exactly as many as there are
    rows = full.ok().stdout.splitlines()
    assert rows[0].split() == ["ID", "STATE", "QUEUE", "NAME", "AGE", "TRIES", "ARGS"]
    assert [row.split()[0] for row in rows[1:]] == newest_first(ledger, *ledger.order)
    alice = next(row for row in rows if row.startswith("mail-alice"))
    assert alice.split()[1:4] == ["queued", "mail", "send_email"]
    assert '["alice@example.com"] {"template": "welcome"}' in alice
    assert "café ☕.png" in full.stdout
    assert full.stderr == "(first 11; --limit 0 for all)\n"  # on stderr: stdout stays a table

    limited = cli.quick("jobs", "--limit", "2").ok()
    assert [row.split()[0] for row in limited.stdout.splitlines()[1:]] == ["staged-1", "retry-1"]
    assert cli.quick("jobs").stderr == ""  # fewer than the limit: no note

    empty = cli.quick("jobs", "--queue", "nowhere").ok()
    assert empty.stdout.split() == ["ID", "STATE", "QUEUE", "NAME", "AGE", "TRIES", "ARGS"]


def test_database_url_flag_beats_the_variable(sqlite_store: SQLStore, sqlite_url: str) -> None:
    """(Every test on each database passes ``--database-url``; ``stats`` reads the variable.)"""
    ledger = seed_ledger(sqlite_store)
    unreachable = {"JOBLEDGER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nowhere"}
    listed = run_jobledger(["jobs", "--json", "--database-url", sqlite_url], env=unreachable)
    assert listed.ids() == newest_first(ledger, *ledger.order)


# -- show, stats, durations, instances --------------------------------------------------------


def test_show(cli: Cli, ledger: Ledger) -> None:
    data = cli.quick("show", "resize-1", "--json").json()
    assert set(data) == JOB_FIELDS
    assert {k: data[k] for k in ("id", "state", "owner", "queue", "name", "args", "kwargs")} == {
        "id": "resize-1",
        "state": "succeeded",
        "owner": LIVE_WORKER.id,
        "queue": "media",
        "name": "resize_image",
        "args": ["cat.png"],
        "kwargs": {"width": 640},
    }
    assert data["started_to_finished"] == pytest.approx(30, abs=1e-3)
    assert data["queued_to_finished"] == pytest.approx(90, abs=1e-3)
    assert epoch(data["started_at"]) == pytest.approx(ledger.now - 40, abs=1e-3)
    # The same view as a listing gives.
    listed = cli.quick("jobs", "--name", "resize_image", "--json").json_lines()
    assert data == next(line for line in listed if line["id"] == "resize-1")

    shown = cli.quick("show", "resize-1").ok().stdout
    record, runs = shown.split("\nattempts\n")
    rows = {
        line.split()[0]: line.split(maxsplit=1)[1].strip()
        for line in record.splitlines()
        if line.strip()
    }
    # its one attempt, by its owner, and the timeline to its success
    assert f"1  {LIVE_WORKER.id}" in runs and "30s      succeeded" in runs
    assert runs.index("started ") < runs.index("succeeded", runs.index("timeline"))
    assert rows["id"] == "resize-1"
    assert rows["state"] == "succeeded"
    assert rows["kwargs"] == '{"width": 640}'
    assert rows["queued_to_finished"] == "1m30s"
    assert rows["started_to_finished"] == "30s"
    assert rows["error"] == "-"


def test_stats(cli: Cli, ledger: Ledger) -> None:
    from_env = {"JOBLEDGER_DATABASE_URL": cli.url}  # the variable, not --database-url
    stats = cli.quick("stats", "--json", url=False, env=from_env).json()
    assert set(stats) == {"queues", "totals", "outbox"}
    rows = {row["queue"]: row for row in stats["queues"]}
    assert list(rows) == ["billing", "mail", "media", "reports"]
    assert {q: (r["counts"], r["total"]) for q, r in rows.items()} == {
        "billing": ({"dead": 1, "failed": 1, "queued": 1}, 3),
        "mail": ({"cancelled": 1, "queued": 2}, 3),
        "media": ({"retrying": 1, "succeeded": 2}, 3),
        "reports": ({"staged": 1, "started": 1}, 2),
    }
    assert_age(rows["billing"]["oldest_queued_age"], 200)
    assert_age(rows["mail"]["oldest_queued_age"], 3 * DAY)
    assert_age(rows["reports"]["oldest_staged_age"], 500)
    assert rows["media"]["oldest_queued_age"] is rows["media"]["oldest_staged_age"] is None
    assert rows["reports"]["oldest_queued_age"] is None
    assert stats["totals"] == {
        "staged": 1,
        "queued": 3,
        "started": 1,
        "retrying": 1,
        "succeeded": 2,
        "failed": 1,
        "dead": 1,
        "cancelled": 1,
    }
    assert stats["outbox"]["backlog"] == 1
    assert_age(stats["outbox"]["oldest_staged_age"], 500)

    lines = cli.quick("stats").ok().stdout.splitlines()
    assert lines[0].split() == [
        "QUEUE", "STAGED", "QUEUED", "STARTED", "RETRYING", "SUCCEEDED", "FAILED", "DEAD",
        "CANCELLED", "LAG", "STAGED", "LAG",
    ]  # fmt: skip
    mail = next(line.split() for line in lines if line.startswith("mail"))
    assert mail[:9] == ["mail", "0", "2", "0", "0", "0", "0", "0", "1"]
    assert mail[9] == "3d" and mail[10] == "-"
    # 500 s and the moments since seeding (8m20s, 8m21s, ...), with assert_age's slack
    said = re.fullmatch(
        r"outbox: 1 staged, not yet published; the oldest staged (\d+)m(\d\d)s ago", lines[-1]
    )
    assert said is not None, lines[-1]
    assert_age(int(said[1]) * 60 + int(said[2]), 500)


def test_stats_on_an_empty_ledger(cli: Cli) -> None:
    assert cli.quick("stats", "--json").json() == {
        "queues": [],
        "totals": {state.value: 0 for state in JobState},
        "outbox": {"backlog": 0, "oldest_staged_age": None},
    }
    assert cli.quick("stats").ok().stdout.strip() == "no jobs in the ledger"


def _stats(name: str, count: int, p50: float, p95: float, top: float) -> dict[str, Any]:
    return {"name": name, "count": count, "p50": p50, "p95": p95, "max": top}


def _per_job(job_id: str, seconds: float) -> dict[str, Any]:
    return {"id": job_id, "name": "resize_image", "seconds": seconds}


def _approx(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: v if isinstance(v, str) else pytest.approx(v, abs=1e-3) for k, v in row.items()}
        for row in rows
    ]


def test_durations(cli: Cli, ledger: Ledger) -> None:
    """Summary and per job, both kinds, against the seeded phase times."""
    started, per_job = cli.quick_each(
        ["durations", "--json"],
        ["durations", "--per-job", "--kind", "queued", "--json"],
    )
    assert started.json() == _approx([_stats("resize_image", 2, 30, 40, 40)])
    assert per_job.json_lines() == _approx([_per_job("resize-2", 45), _per_job("resize-1", 90)])


def test_durations_details(cli: Cli, ledger: Ledger) -> None:
    cases: list[tuple[list[str], list[dict[str, Any]]]] = [
        (["--kind", "started"], [_stats("resize_image", 2, 30, 40, 40)]),
        (["--kind", "queued"], [_stats("resize_image", 2, 45, 90, 90)]),
        (["--state", "failed"], [_stats("charge_invoice", 1, 10, 10, 10)]),
        (["--kind", "queued", "--state", "failed"], [_stats("charge_invoice", 1, 20, 20, 20)]),
        (["--name", "send_email"], []),
        (["--per-job"], [_per_job("resize-2", 40), _per_job("resize-1", 30)]),
        (["--per-job", "--limit", "1"], [_per_job("resize-2", 40)]),
        (["--per-job", "--match", "cat.png"], [_per_job("resize-1", 30)]),
    ]
    for args, expected in cases:
        result = cli.quick("durations", "--json", *args)
        got = result.json_lines() if "--per-job" in args else result.json()
        assert got == _approx(expected), f"durations {args}\n{result}"

    lines = cli.quick("durations").ok().stdout.splitlines()
    assert lines[0].split() == ["NAME", "COUNT", "P50", "P95", "MAX"]
    assert lines[1].split() == ["resize_image", "2", "30s", "40s", "40s"]
    per_job = cli.quick("durations", "--per-job", "--kind", "queued").ok().stdout
    assert [line.split() for line in per_job.splitlines()] == [
        ["resize-2", "resize_image", "45s"],
        ["resize-1", "resize_image", "1m30s"],
    ]
    assert cli.quick("durations", "-n", "x").ok().stdout.strip() == "no finished jobs match"


def test_instances(cli: Cli, ledger: Ledger) -> None:
    found = cli.quick("instances", "--json").json()
    assert [i["id"] for i in found] == [GONE_WORKER.id, LIVE_WORKER.id]
    gone, live = found
    assert {k: live[k] for k in ("name", "nonce", "hostname", "pid", "queues", "state")} == {
        "name": "worker-live",
        "nonce": "n1",
        "hostname": "host-a",
        "pid": 101,
        "queues": ["reports", "mail"],
        "state": "running",
    }
    assert live["alive"] is True and 0 <= live["heartbeat_age"] < 60
    assert gone["alive"] is False
    assert_age(gone["heartbeat_age"], 3600)
    assert epoch(gone["heartbeat_at"]) == pytest.approx(ledger.now - 3600, abs=60)
    assert gone["queues"] == ["media"]

    table = cli.quick("instances").ok().stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows[LIVE_WORKER.id][1:4] == ["host-a", "101", "running"]
    assert rows[GONE_WORKER.id][3] == "dead"
    assert rows[LIVE_WORKER.id][-1] == "reports,mail"


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_by_ids(cli: Cli, ledger: Ledger) -> None:
    before = {i: ledger.get(i) for i in ledger.order}
    result = cli.quick("cancel", "mail-alice", "report-4242", "resize-1", "no-such-job", "--json")
    # an id the ledger has not is bad input (exit 2, one line), told once the rest was done
    assert result.returncode == 2, str(result)
    assert result.stderr.strip() == "error: the ledger has no job with id no-such-job"
    report = json.loads(result.stdout)
    assert report["action"] == "cancel" and report["dry_run"] is False
    assert sorted(report["done"]) == ["mail-alice", "report-4242"]
    assert report["skipped"] == {"resize-1": "is succeeded", "no-such-job": "not found"}
    assert report["failed"] == {}
    for job_id in ("mail-alice", "report-4242"):
        after = ledger.get(job_id)
        assert after.state is JobState.CANCELLED
        assert after.finished_at is not None
        assert after.args == before[job_id].args and after.attempts == before[job_id].attempts
    for job_id in set(ledger.order) - {"mail-alice", "report-4242"}:
        assert ledger.get(job_id) == before[job_id]


def test_cancel_by_filter_dry_run_refusal_and_yes(cli: Cli, ledger: Ledger) -> None:
    before = snapshot(ledger.store)
    dry, refused = cli.quick_each(
        ["cancel", "--queue", "billing", "--dry-run", "--json"],
        ["cancel", "--queue", "billing", "--json"],  # no --yes, stdin is not a terminal
    )
    preview = dry.json()
    assert preview["dry_run"] is True
    assert preview["done"] == ["charge-100x"]
    assert preview["skipped"] == {"charge-100": "is failed", "order-12345": "is dead"}
    refused.error("cancel of 1 job by filter needs --yes")
    assert snapshot(ledger.store) == before

    text = cli.quick("cancel", "--queue", "billing", "--dry-run").ok().stdout
    assert text.splitlines()[:2] == ["would cancel: 1", "  charge-100x"]
    assert snapshot(ledger.store) == before

    done = cli.quick("cancel", "--state", "queued", "--older-than", "1d", "--yes", "--json").json()
    assert done["done"] == ["mail-bob"] and done["dry_run"] is False
    assert ledger.get("mail-bob").state is JobState.CANCELLED
    assert ledger.get("mail-alice").state is JobState.QUEUED

    text = cli.quick("cancel", "--queue", "billing", "--yes").ok().stdout.splitlines()
    assert text[:2] == ["cancelled: 1", "  charge-100x"]
    assert "skipped charge-100: is failed" in text
    assert ledger.get("charge-100x").state is JobState.CANCELLED
    assert ledger.get("charge-100").state is JobState.FAILED


def test_bulk_cancel_asks_on_a_terminal(sqlite_store: SQLStore, sqlite_url: str) -> None:
    """With a terminal on stdin a bulk change by filter asks; "n" changes nothing. (The prompt
    does not depend on the database: checked on SQLite.)"""
    ledger_ = seed_ledger(sqlite_store)
    before = snapshot(ledger_.store)

    def answer(reply: str) -> Result:
        leader, follower = pty.openpty()
        try:
            os.write(leader, reply.encode() + b"\n")
            return run_jobledger(
                ["cancel", "--state", "queued", "--database-url", sqlite_url], stdin=follower
            )
        finally:
            os.close(follower)
            os.close(leader)

    declined = answer("n")
    assert declined.returncode == 1, declined
    assert "Cancel 3 jobs?" in declined.stdout
    assert snapshot(ledger_.store) == before

    accepted = answer("y").ok()
    assert "cancelled: 3" in accepted.stdout
    for job_id in ("mail-alice", "mail-bob", "charge-100x"):
        assert ledger_.get(job_id).state is JobState.CANCELLED


# -- restart through a real Integration seam -------------------------------------------------


@pytest.fixture
def publish_log(tmp_path: Path) -> Path:
    return tmp_path / "published.jsonl"


def recording_env(cli: Cli, log: Path, **extra: str) -> dict[str, str]:
    """The recording app's settings; a heartbeat TTL of 10 minutes keeps the live worker alive
    however slow the machine (the silent one last beat an hour ago)."""
    return {
        "RECORDING_APP_LOG": str(log),
        "RECORDING_APP_LEDGER_URL": cli.url,
        "JOBLEDGER_HEARTBEAT_TTL": "600",
        **extra,
    }


RESTARTED = {"failed-1", "dead-1", "queued-1", "orphan-1", "orphan-2"}


def test_restart_by_ids_publishes_first_then_requeues(
    cli: Cli, store: Store, publish_log: Path
) -> None:
    now = store.now()
    before = restart_targets(store, now)
    result = cli.quick(
        "restart", *before, "no-such-job", "--app", RECORDING_APP, "--json",
        env=recording_env(cli, publish_log),
    )  # fmt: skip
    assert result.returncode == 2, str(result)  # no-such-job: told after the rest was done
    report = json.loads(result.stdout)
    assert report["action"] == "restart" and report["dry_run"] is False
    assert sorted(report["done"]) == sorted(RESTARTED)
    assert report["skipped"] == {
        "done-1": "is succeeded",
        "cancelled-1": "is cancelled",
        "running-1": f"running on live instance {LIVE_WORKER.id}; restart it with --force",
        "no-such-job": "not found",
    }
    assert report["failed"] == {}

    published = read_log(publish_log)
    assert sorted(p["id"] for p in published) == sorted(RESTARTED)  # each exactly once
    for line in published:
        original = before[line["id"]]
        assert line == {
            "id": original.id,
            "system": "celery",
            "name": original.name,
            "queue": original.queue,
            "args": original.args,
            "kwargs": original.kwargs,
            "options": original.options,
            "state": original.state.value,
            # Invariant 1: the broker had the message before the record moved.
            "ledger_state": original.state.value,
        }

    for job_id, old in before.items():
        new = store.get(job_id)
        assert new is not None
        if job_id not in RESTARTED:
            assert new == old
            continue
        assert new.state is JobState.QUEUED
        assert new.restarts == old.restarts + 1
        assert new.owner is None
        assert (new.attempts, new.recoveries, new.args, new.kwargs, new.options) == (
            old.attempts, old.recoveries, old.args, old.kwargs, old.options,
        )  # fmt: skip
        assert new.queued_at is not None and new.queued_at.timestamp() >= now
        assert new.first_queued_at == (old.first_queued_at or new.queued_at)
    assert before["dead-1"].restarts == 1
    assert store.get("dead-1").restarts == 2  # type: ignore[union-attr]


def test_restart_by_filter_dry_run_yes_and_age(cli: Cli, store: Store, publish_log: Path) -> None:
    before = restart_targets(store, store.now())
    state_before = snapshot(store)
    env = recording_env(cli, publish_log)
    failed_or_dead = ["--state", "failed", "--state", "dead"]
    dry, refused = cli.quick_each(
        ["restart", *failed_or_dead, "--app", RECORDING_APP, "--dry-run", "--json"],
        ["restart", *failed_or_dead, "--app", RECORDING_APP, "--json"],
        env=env,
    )
    assert dry.json()["dry_run"] is True
    assert sorted(dry.json()["done"]) == ["dead-1", "failed-1"]
    refused.error("restart of 2 jobs by filter needs --yes")
    assert read_log(publish_log) == []
    assert snapshot(store) == state_before

    # By age: only the job queued two hours ago and never picked up.
    aged = cli.quick(
        "restart", "--older-than", "1h", "--app", RECORDING_APP, "--yes", "--json", env=env
    ).json()
    assert aged["done"] == ["queued-1"]
    assert [p["id"] for p in read_log(publish_log)] == ["queued-1"]

    # Every state but queued: the running job and finished ones are skipped, the rest go back.
    every = [arg for s in JobState if s is not JobState.QUEUED for arg in ("-s", s.value)]
    text = cli.quick("restart", *every, "--app", RECORDING_APP, "--yes", env=env).ok().stdout
    lines = text.splitlines()
    assert lines[0] == "restarted: 4"
    assert sorted(lines[1:5]) == ["  dead-1", "  failed-1", "  orphan-1", "  orphan-2"]
    assert sorted(lines[5:]) == [
        "skipped cancelled-1: is cancelled",
        "skipped done-1: is succeeded",
        f"skipped running-1: running on live instance {LIVE_WORKER.id}; restart it with --force",
    ]
    assert sorted(p["id"] for p in read_log(publish_log)) == sorted(RESTARTED)
    for job_id in RESTARTED:
        record = store.get(job_id)
        assert record is not None and record.state is JobState.QUEUED
        assert record.restarts == before[job_id].restarts + 1
    assert store.get("running-1") == before["running-1"]


def test_restart_publish_error_leaves_that_record_and_exits_1(
    cli: Cli, store: Store, publish_log: Path
) -> None:
    before = restart_targets(store, store.now())
    env = recording_env(cli, publish_log, RECORDING_APP_FAIL="failed-1")
    result, text = cli.quick_each(
        ["restart", "failed-1", "dead-1", "--app", RECORDING_APP, "--json"],
        ["restart", "failed-1", "--app", RECORDING_APP],
        env=env,
    )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["done"] == ["dead-1"]
    assert report["failed"] == {"failed-1": "broker refused failed-1: connection reset"}
    assert store.get("failed-1") == before["failed-1"]
    assert store.get("dead-1").state is JobState.QUEUED  # type: ignore[union-attr]
    assert [p["id"] for p in read_log(publish_log)] == ["dead-1"]
    assert text.returncode == 1, text
    assert text.stdout.splitlines() == [
        "restarted: 0",
        "failed failed-1: broker refused failed-1: connection reset",
    ]


def test_restart_fails_only_the_jobs_of_a_system_without_integration(
    cli: Cli, store: Store, publish_log: Path
) -> None:
    restart_targets(store, store.now())
    assert store.create(
        JobRecord(id="rq-1", name="t", system="rq", state=JobState.FAILED, args=[1])
    )
    env = recording_env(cli, publish_log, RECORDING_APP_SYSTEMS="celery")
    dry = cli.quick("restart", "--state", "failed", "--dry-run", "--app", RECORDING_APP, env=env)
    assert dry.returncode == 1, str(dry)
    assert "would restart: 1" in dry.stdout and "failed-1" in dry.stdout
    assert "failed rq-1: no integration for queue system 'rq'" in " ".join(dry.stdout.split())
    assert read_log(publish_log) == []

    report = cli.quick(
        "restart", "failed-1", "rq-1", "--app", RECORDING_APP, "--json", env=env
    )  # fmt: skip
    assert report.returncode == 1, str(report)
    data = json.loads(report.stdout)
    assert data["done"] == ["failed-1"] and list(data["failed"]) == ["rq-1"]
    assert "pip install 'jobledger[rq]'" in data["failed"]["rq-1"]
    assert [entry["id"] for entry in read_log(publish_log)] == ["failed-1"]
    assert store.get("rq-1").state is JobState.FAILED  # type: ignore[union-attr]


def test_restart_by_system_filter(cli: Cli, store: Store, publish_log: Path) -> None:
    restart_targets(store, store.now())
    assert store.create(JobRecord(id="rq-1", name="t", system="rq", state=JobState.FAILED))
    env = recording_env(cli, publish_log, RECORDING_APP_SYSTEMS="celery")
    only = cli.quick(
        "restart", "--state", "failed", "--system", "celery", "--yes", "--app", RECORDING_APP,
        env=env,
    )  # fmt: skip
    assert only.returncode == 0, str(only)
    assert [entry["id"] for entry in read_log(publish_log)] == ["failed-1"]
    listed = cli.quick("jobs", "--system", "rq", "--json").json_lines()
    assert [job["id"] for job in listed] == ["rq-1"]


# -- prune -----------------------------------------------------------------------------------


def test_prune(cli: Cli, store: Store) -> None:
    now = store.now()
    ages = {
        "old-ok": (JobState.SUCCEEDED, 10 * DAY),
        "new-ok": (JobState.SUCCEEDED, 3600),
        "old-cancel": (JobState.CANCELLED, 8 * DAY),
        "old-fail": (JobState.FAILED, 30 * DAY),
        "old-dead": (JobState.DEAD, 30 * DAY),
        "new-fail": (JobState.FAILED, 3600),
        "old-queued": (JobState.QUEUED, 30 * DAY),
        "old-started": (JobState.STARTED, 30 * DAY),
    }
    for job_id, (state, age) in ages.items():
        owner = "w:1" if state is JobState.STARTED else None
        record = JobRecord(
            id=job_id, name="t", state=state, owner=owner, created_at=at(now - age - 60),
            updated_at=at(now - age), finished_at=at(now - age) if state.is_final else None,
        )  # fmt: skip
        assert store.create(record)

    def remaining() -> set[str]:
        return {i for i in ages if store.get(i) is not None}

    before = snapshot(store)
    keep_none = {"JOBLEDGER_KEEP_SUCCEEDED": "0"}
    default = cli.quick("prune", "--dry-run", "--json", env=keep_none)
    everything = cli.quick("prune", "--dry-run", "--json", "--keep-failed", "7d", env=keep_none)
    assert default.json() == {
        "dry_run": True,
        "deleted": {"succeeded": 2, "cancelled": 1},  # the variable says keep 0
    }
    assert everything.json() == {
        "dry_run": True,
        "deleted": {"succeeded": 2, "cancelled": 1, "dead": 1, "failed": 1},
    }
    assert cli.quick("prune", "--dry-run").ok().stdout.strip() == (
        "would delete 1 succeeded, would delete 1 cancelled"
    )
    assert snapshot(store) == before

    assert cli.quick("prune", "--json").json() == {
        "dry_run": False,
        "deleted": {"succeeded": 1, "cancelled": 1},
    }
    assert remaining() == set(ages) - {"old-ok", "old-cancel"}

    assert cli.quick("prune", "--keep-succeeded", "0", "--json").json()["deleted"] == {
        "succeeded": 1,
        "cancelled": 0,
    }
    assert remaining() == {"old-fail", "old-dead", "new-fail", "old-queued", "old-started"}

    assert cli.quick("prune", "--keep-failed", "1d").ok().stdout.strip() == (
        "deleted 0 succeeded, deleted 0 cancelled, deleted 1 dead, deleted 1 failed"
    )
    assert remaining() == {"new-fail", "old-queued", "old-started"}  # pending: never pruned


# -- bad input -------------------------------------------------------------------------------


def test_bad_input_on_each_database(cli: Cli, ledger: Ledger) -> None:
    """Bad input that reaches the database: exit 2, one ``error:`` line, nothing on stdout, and
    not one stored row changed."""
    before = snapshot(ledger.store)
    cases: list[tuple[list[str], tuple[str, ...]]] = [
        (["restart", "charge-100"], ("queue system 'celery'", "pass --app")),
        (["restart", "--state", "failed", "--yes"], ("pass --app", "--broker")),
        (["cancel", "--state", "queued"], ("cancel of 3 jobs by filter needs --yes",)),
        (["cancel", "mail-alice", "../x"], ("malformed job id '../x'",)),
    ]
    results = cli.quick_each(*(args for args, _ in cases))
    for (_, fragments), result in zip(cases, results, strict=True):
        result.error(*fragments)
    assert snapshot(ledger.store) == before


def test_bad_input_leaves_the_ledger_alone(
    sqlite_store: SQLStore, sqlite_url: str, tmp_path: Path
) -> None:
    """Every other bad input, once (they fail before the database is asked anything)."""
    before = snapshot(seed_ledger(sqlite_store).store)
    cli = Cli(sqlite_url, tmp_path)
    bad_id = "malformed job id"
    cases: list[tuple[list[str], tuple[str, ...]]] = [
        (["jobs", "--state", "bogus"], ("unknown job state 'bogus'", "known states: staged")),
        (["restart", "--state", "bogus", "--yes"], ("unknown job state 'bogus'",)),
        (["cancel", "-s", "finished", "--yes"], ("unknown job state 'finished'",)),
        (["show", "a b"], (bad_id, "'a b'")),
        (["show", "../x"], (bad_id, "'../x'")),
        (["restart", "charge-100", "a b"], (bad_id,)),
        (["show", "no-such-job"], ("no job with id 'no-such-job'",)),
        (["jobs", "--older-than", "-3d"], ("zero or more seconds", "'-3d'")),
        (["cancel", "--state", "queued", "--older-than", "-3d", "--yes"], ("'-3d'",)),
        (["prune", "--keep-succeeded", "-1d"], ("'-1d'",)),
        (["jobs", "--older-than", "3 fortnights"], ("unreadable duration '3 fortnights'",)),
        (["prune", "--keep-failed", "soon"], ("unreadable duration 'soon'",)),
        (["jobs", "--match", "(", "--regex"], ("regular expression '(' does not compile",)),
        (["cancel", "--match", "[a-", "--regex", "--yes"], ("'[a-' does not compile",)),
        (["restart"], ("say which jobs to restart",)),
        (["cancel", "--dry-run"], ("say which jobs to cancel",)),
        (["restart", "charge-100", "--app", "tests.cli.no_such_module"],
         ("cannot import --app 'tests.cli.no_such_module'",)),
        (["durations", "--kind", "finished"], ("--kind must be 'queued' or 'started'",)),
        (["instances"], ("JOBLEDGER_HEARTBEAT_INTERVAL",)),
    ]  # fmt: skip
    env = {"JOBLEDGER_HEARTBEAT_INTERVAL": "fast"}
    for args, fragments in cases:
        cli.quick(*args, env=env if args == ["instances"] else None).error(*fragments)
    args, fragments = cases[0]  # the same contract from a real process
    cli(*args).error(*fragments)
    assert snapshot(sqlite_store) == before


def test_unreachable_and_malformed_database_urls(tmp_path: Path) -> None:
    cases: list[tuple[list[str], dict[str, str], tuple[str, ...]]] = [
        (["jobs", "--database-url", "postgresql://jl:s3cret@127.0.0.1:1/db"], {},
         ("the ledger database at postgresql+psycopg://jl:***@127.0.0.1:1/db is unavailable",)),
        (["stats", "--database-url", "mysql://root@127.0.0.1:1/db"], {}, ("is unavailable",)),
        (["restart", "some-id", "--yes"], {"JOBLEDGER_DATABASE_URL": "postgresql://x@127.0.0.1:1/db"},
         ("is unavailable",)),
        (["jobs", "--database-url", "notaurl"], {}, ("unknown ledger URL scheme 'notaurl'",)),
        (["cancel", "--state", "queued", "--yes"], {"JOBLEDGER_DATABASE_URL": "::::"},
         ("unknown ledger URL scheme '::::'",)),
        (["prune"], {"JOBLEDGER_DATABASE_URL": "bogus://x"},
         ("unknown ledger URL scheme 'bogus'",)),
    ]  # fmt: skip
    outcomes = [run_in_process(args, env=env, cwd=tmp_path) for args, env, _ in cases]
    # A real process reads the variable too.
    outcomes.append(run_jobledger(cases[2][0], env=cases[2][1], cwd=tmp_path))
    for (_, _, fragments), result in zip([*cases, cases[2]], outcomes, strict=True):
        line = result.error(*fragments)
        assert "s3cret" not in line


def test_missing_schema_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "never-migrated.db"
    url = f"sqlite:///{path}"
    commands = [["jobs", "--json"], ["restart", "some-id"], ["prune"]]
    outcomes = [run_in_process([*args, "--database-url", url], cwd=tmp_path) for args in commands]
    outcomes.append(run_jobledger([*commands[0], "--database-url", url], cwd=tmp_path))
    for result in outcomes:
        result.error("the ledger tables are missing", "run `jobledger migrate`")
    with SQLStore(url).engine.connect() as conn:  # still not migrated: nothing was created
        assert conn.exec_driver_sql("SELECT name FROM sqlite_master").all() == []


# -- in-process, through typer's runner ------------------------------------------------------


def test_help_names_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in (
        "migrate", "jobs", "show", "stats", "durations", "instances", "restart", "cancel",
        "prune", "demo",
    ):  # fmt: skip
        assert f" {command} " in result.stdout


def test_show_in_process_reads_the_variable(sqlite_store: SQLStore, sqlite_url: str) -> None:
    seed_ledger(sqlite_store)
    result = CliRunner().invoke(
        app, ["show", "charge-100", "--json"], env={"JOBLEDGER_DATABASE_URL": sqlite_url}
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["args"] == ["inv_100%_off"] and data["state"] == "failed"


# -- streaming -------------------------------------------------------------------------------


def _bulk_seed(store: SQLStore, count: int) -> None:
    base = store.now() - count
    payload = '"' + "x" * 200 + '"'
    rows = [
        {
            "id": f"bulk-{i:07d}",
            "system": "celery",
            "name": "bulk_task",
            "queue": "bulk",
            "args": f"[{i}, {payload}]",
            "kwargs": f'{{"n": {i}}}',
            "tags": "{}",
            "options": "{}",
            "state": "succeeded",
            "owner": None,
            "attempts": 1,
            "recoveries": 0,
            "restarts": 0,
            "error": None,
            "created_at": base + i,
            "staged_at": None,
            "first_queued_at": base + i,
            "queued_at": base + i,
            "started_at": base + i + 0.5,
            "finished_at": base + i + 0.75,
            "recovered_at": None,
            "updated_at": base + i + 0.75,
        }
        for i in range(count)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(jobs), rows)


def _peak_rss_kib(pid: int) -> int | None:
    """The process's high-water resident set (``VmHWM``), or None once it has exited.

    (Not ``wait4``'s ``ru_maxrss``: Linux counts in it the parent's size at the fork, and this
    test process is large after seeding.)"""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None


def _list_all(url: str, cwd: Path) -> tuple[int, int, bool, str | None]:
    """Run ``jobs --limit 0 --json``; (lines, peak RSS in KiB, first line came while the
    process was still running, last line)."""
    process = subprocess.Popen(
        [*jobledger_command(), "jobs", "--limit", "0", "--json", "--database-url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=child_env(),
        cwd=cwd,
    )
    assert process.stdout is not None and process.stderr is not None
    count = 0
    streaming = False
    last = None
    peaks: list[int] = []
    deadline = time.monotonic() + 60
    for line in process.stdout:
        if count == 0:
            # Far more output than a pipe holds is still to come: the process cannot be done.
            streaming = process.poll() is None
        if count % 500 == 0:
            # The process cannot finish while its output waits for us, so these samples see
            # it at work; the high-water mark only grows.
            peak = _peak_rss_kib(process.pid)
            if peak is not None:
                peaks.append(peak)
        count += 1
        last = line
        assert time.monotonic() < deadline, "listing took over a minute"
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert stderr == b""
    assert len(peaks) >= count // 1000, "the process was not sampled while it ran"
    return count, max(peaks), streaming, None if last is None else last.decode()


def test_listing_streams_in_constant_memory(tmp_path: Path) -> None:
    small_url = f"sqlite:///{tmp_path / 'small.db'}"
    big_url = f"sqlite:///{tmp_path / 'big.db'}"
    stores = []
    for url, count in ((small_url, 10_000), (big_url, 100_000)):
        store = SQLStore(url)
        store.migrate()
        _bulk_seed(store, count)
        stores.append(store)

    small_lines, small_peak, _, _ = _list_all(small_url, tmp_path)
    big_lines, big_peak, streaming, last = _list_all(big_url, tmp_path)
    assert small_lines == 10_000
    assert big_lines == 100_000
    assert streaming, "the first job was printed only after the whole listing was read"
    assert last is not None and json.loads(last)["id"] == "bulk-0000000"  # the oldest, last
    # Holding 100,000 records (~300 bytes of arguments each, plus objects) would take hundreds
    # of MiB more; a streamed listing stays within a few MiB of the 10,000-row run.
    assert big_peak < small_peak * 1.3, (small_peak, big_peak)
    assert big_peak - small_peak < 24 * 1024, (small_peak, big_peak)
    for store in stores:
        store.close()


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path: Path) -> None:
    """``jobledger jobs | head``: tables and JSON Lines alike end quietly with status 0."""
    url = f"sqlite:///{tmp_path / 'piped.db'}"
    store = SQLStore(url)
    store.migrate()
    _bulk_seed(store, 3000)  # far more output than a pipe holds
    store.close()
    for args in (["jobs"], ["jobs", "--json"], ["durations", "--per-job"]):
        process = subprocess.Popen(
            [*jobledger_command(), *args, "--limit", "0", "--database-url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=child_env(),
            cwd=tmp_path,
        )
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.strip(), args
        process.stdout.close()  # the reader leaves
        _, stderr = process.communicate(timeout=60)
        assert (process.returncode, stderr) == (0, b""), args
