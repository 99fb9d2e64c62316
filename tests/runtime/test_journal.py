"""The durable journal: writes a process deferred outlive it and are replayed once, in order.

Real processes (``os.fork``, as a prefork pool does) and a real SQLite ledger file, so what is
tested is what crosses a process boundary: the journal file, its locks and the shared hint.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from jobledger.errors import StoreUnavailable
from jobledger.journal import Journal, decode, encode, replay_orphans
from jobledger.lifecycle import Claim, ClaimWrite, Lifecycle
from jobledger.model import JobRecord, JobState
from jobledger.pending import PendingWrites, TransitionWrite
from jobledger.stores.base import ANY, Store, Transition
from jobledger.stores.sql import SQLStore

S = JobState


class DownStore:
    """A ledger that cannot be reached: every call raises."""

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise StoreUnavailable("ledger down (test)")

        return call


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[SQLStore]:
    store = SQLStore(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.migrate()
    yield store
    store.close()


def in_child(work: Callable[[], None]) -> None:
    """Run ``work`` in a forked process that then exits at once, as a killed pool process
    would (no cleanup, no ``atexit``); fail if it raised."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException:
            logging.exception("child failed")
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child process failed"


def succeed(job_id: str, owner: str) -> TransitionWrite:
    change = Transition(S.SUCCEEDED, frozenset({S.STARTED}), expect_owner=owner)
    return TransitionWrite(job_id, change)


def test_writes_come_back_as_they_were_written() -> None:
    at = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    record = JobRecord(id="j1", name="t", args=[1, (2, 3)], kwargs={"k": {"n": 1}}, queued_at=at)
    life = Lifecycle(DownStore(), "w:1", ttl=9.0, max_recoveries=4)  # type: ignore[arg-type]
    claim = ClaimWrite("j1", record, life, restart=True)
    back = decode(json.loads(json.dumps(encode(claim))))
    assert back.record == record and back.restart is True
    assert (back.lifecycle.owner, back.lifecycle.ttl, back.lifecycle.max_recoveries) == (
        "w:1",
        9.0,
        4,
    )
    assert back.lifecycle.store is None  # a process resource: the replayer binds its own
    change = Transition(S.FAILED, frozenset({S.STARTED}), expect_owner=ANY, error="boom")
    write = TransitionWrite("j1", change, delete=False)
    assert decode(json.loads(json.dumps(encode(write)))) == write


def test_a_field_the_entry_lacks_takes_its_default() -> None:
    """An entry written before a field was added still reads back (the generic codec)."""
    data = encode(succeed("j1", "w:1"))
    del data["fields"]["delete"]
    assert decode(data) == succeed("j1", "w:1")


def test_an_empty_journal_costs_no_query(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "w.journal")
    statements: list[str] = []
    journal._connection().set_trace_callback(statements.append)
    assert not journal.holds("j1") and not journal.holds()
    assert statements == []
    journal.append(succeed("j1", "w:1"))
    assert journal.holds("j1") and not journal.holds("j2") and statements


def test_a_deferred_run_in_a_dead_process_is_replayed_in_order(
    tmp_path: Path, ledger: SQLStore
) -> None:
    """A pool process runs a job with the ledger down and dies; its claim and success stay in
    the journal, and the main process replays them: the job ends succeeded, not queued."""
    journal = Journal(tmp_path / "w.journal")  # made before the fork, as a worker does
    ledger.create(JobRecord(id="j1", name="t"))

    def pool_process() -> None:
        pending = PendingWrites(DownStore, log=journal, replay_on_add=False)  # type: ignore[arg-type]
        life = Lifecycle(DownStore(), "w:1", ttl=30.0, pending=pending)  # type: ignore[arg-type]
        assert life.claim("j1") is Claim.DEFERRED
        assert life.succeed("j1")

    in_child(pool_process)
    assert len(journal) == 2 and journal.holds("j1")
    pending = PendingWrites(lambda: ledger, log=journal)
    assert pending.flush()
    job = ledger.get("j1")
    assert job is not None and job.state is S.SUCCEEDED and job.owner == "w:1"
    assert pending.counters == {"applied": 2} and not journal.holds()


def test_a_later_write_queues_behind_a_journaled_one_of_the_same_job(
    tmp_path: Path, ledger: SQLStore
) -> None:
    journal = Journal(tmp_path / "w.journal")
    ledger.create(JobRecord(id="j1", name="t"))
    down = PendingWrites(DownStore, log=journal, replay_on_add=False)  # type: ignore[arg-type]
    Lifecycle(DownStore(), "w:1", ttl=30.0, pending=down).claim("j1")  # type: ignore[arg-type]
    pending = PendingWrites(lambda: ledger, log=journal, replay_on_add=False)
    # the ledger is back, but the claim still waits: the success must not overtake it
    assert pending.submit(succeed("j1", "w:1")) is None
    assert ledger.get("j1").state is S.QUEUED  # type: ignore[union-attr]
    assert pending.flush() and ledger.get("j1").state is S.SUCCEEDED  # type: ignore[union-attr]


def test_the_journal_is_bounded_and_drops_the_oldest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path / "w.journal", limit=2)
    pending = PendingWrites(DownStore, log=journal, replay_on_add=False)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        for i in range(3):
            assert pending.submit(succeed(f"j{i}", "w:1")) is None
    assert len(journal) == 2 and pending.counters["dropped"] == 1
    assert not journal.holds("j0") and journal.holds("j1") and journal.holds("j2")
    assert "dropped job j0's move to succeeded" in caplog.text


def test_a_replayed_write_whose_job_moved_on_is_dropped(
    tmp_path: Path, ledger: SQLStore, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path / "w.journal")
    ledger.create(JobRecord(id="j1", name="t"))
    assert Lifecycle(ledger, "a:1", ttl=30.0).claim("j1") is Claim.CLAIMED
    journal.append(succeed("j1", "a:1"))
    # meanwhile a was declared dead: recovery requeued the job and b runs it
    ledger.transition("j1", Transition(S.QUEUED, frozenset({S.STARTED})))
    assert Lifecycle(ledger, "b:1", ttl=30.0).claim("j1") is Claim.CLAIMED
    pending = PendingWrites(lambda: ledger, log=journal)
    with caplog.at_level(logging.WARNING):
        assert pending.flush()
    job = ledger.get("j1")
    assert job is not None and job.state is S.STARTED and job.owner == "b:1"
    assert pending.counters == {"lost": 1} and len(journal) == 0
    assert "lost the job to another" in caplog.text


def test_concurrent_replays_apply_each_write_once(tmp_path: Path, ledger: SQLStore) -> None:
    """Two processes replay the same journal at once: the replay lock serializes them, so no
    write is applied twice and every job ends succeeded."""
    journal = Journal(tmp_path / "w.journal")
    ids = [f"j{i}" for i in range(40)]
    down = PendingWrites(DownStore, log=journal, replay_on_add=False)  # type: ignore[arg-type]
    life = Lifecycle(DownStore(), "w:1", ttl=30.0, pending=down)  # type: ignore[arg-type]
    for job_id in ids:
        ledger.create(JobRecord(id=job_id, name="t"))
        life.claim(job_id)
        life.succeed(job_id)
    counts = tmp_path / "counts"

    def replayer(tag: str) -> Callable[[], None]:
        def replay() -> None:
            store = SQLStore(f"sqlite:///{tmp_path / 'ledger.db'}")  # this process's own
            pending = PendingWrites(lambda: store, log=journal, replay_on_add=False)
            assert pending.flush()
            (counts / tag).write_text(json.dumps(dict(pending.counters)))

        return replay

    counts.mkdir()
    pids = []
    for tag in ("a", "b"):
        pid = os.fork()
        if pid == 0:
            try:
                replayer(tag)()
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    totals = [json.loads((counts / tag).read_text()) for tag in ("a", "b")]
    assert sum(t.get("applied", 0) for t in totals) == 2 * len(ids)
    assert not any(t.get("lost") for t in totals)
    assert all(ledger.get(i).state is S.SUCCEEDED for i in ids)  # type: ignore[union-attr]


def test_a_live_owner_keeps_its_journal_and_a_gone_one_leaves_it_to_others(
    tmp_path: Path, ledger: SQLStore
) -> None:
    mine = Journal.for_instance(tmp_path, "w1")
    same_name = Journal.for_instance(tmp_path, "w1")  # another live worker of that name
    assert same_name.path.name == "w1~2.journal"
    assert mine.orphans() == []  # its owner (this process) lives
    ledger.create(JobRecord(id="j1", name="t"))
    Lifecycle(ledger, "w1:old", ttl=30.0).claim("j1")
    same_name.append(succeed("j1", "w1:old"))
    same_name.close()  # its worker is gone
    assert mine.orphans() == [same_name.path]
    assert replay_orphans(mine, lambda: ledger) == 0
    assert ledger.get("j1").state is S.SUCCEEDED  # type: ignore[union-attr]
    mine.close()


def test_journaled_reads_every_journal_of_the_directory_live_or_gone(tmp_path: Path) -> None:
    """What the sweep asks before it puts a job back: a write for it waits somewhere here."""
    mine = Journal.for_instance(tmp_path, "w2")
    live = Journal.for_instance(tmp_path, "w1")  # its owner (this process) lives
    gone = Journal.for_instance(tmp_path, "w3")
    assert mine.journaled({"a", "b", "c", "d"}) == set()
    mine.append(succeed("a", "w2:x"))
    live.append(succeed("b", "w1:x"))
    gone.append(succeed("c", "w3:x"))
    gone.close()
    (tmp_path / "junk.journal").write_text("not a database")
    assert mine.journaled({"a", "b", "c", "d"}) == {"a", "b", "c"}
    assert mine.journaled(set()) == set()
    assert len(live) == 1  # read only: nothing replayed or taken
    live.close()
    mine.close()


def test_the_sweeps_reads_of_other_journals_hold_the_fork_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker forks its children while its sweep reads the other journals: a child forked
    while that thread is inside SQLite (its mutexes) or holds an owner file's flock inherits
    them held, and an RQ work horse forked so never claimed its job. So those reads, as every
    other SQLite call of the journal, happen under the lock every fork takes."""
    from jobledger import journal as journal_module

    mine = Journal.for_instance(tmp_path, "w1")
    gone = Journal.for_instance(tmp_path, "w2")
    gone.append(succeed("a", "w2:x"))
    gone.close()
    outside: list[str] = []
    connect, flock = sqlite3.connect, journal_module.fcntl.flock

    def checked(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if not journal_module._fork_lock._is_owned():  # type: ignore[attr-defined]
                outside.append(name)
            return call(*args, **kwargs)

        return run

    monkeypatch.setattr(journal_module.sqlite3, "connect", checked("connect", connect))
    monkeypatch.setattr(journal_module.fcntl, "flock", checked("flock", flock))
    assert mine.journaled({"a", "b"}) == {"a"}
    assert mine.orphans() == [gone.path]
    assert outside == []
    mine.close()


def test_an_owner_in_another_process_is_alive_until_it_exits(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        Journal.for_instance(tmp_path, "other")
        os.write(write_end, b"x")
        os.read(done_r, 1)
        os._exit(0)
    os.read(read_end, 1)
    mine = Journal.for_instance(tmp_path, "me")
    assert mine.orphans() == []
    os.write(done_w, b"x")
    os.waitpid(pid, 0)
    assert [p.name for p in mine.orphans()] == ["other.journal"]
    mine.close()


def test_an_unreadable_entry_is_dropped_and_counted(
    tmp_path: Path, ledger: Store, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path / "w.journal")
    journal.append(succeed("j1", "w:1"))
    with sqlite3.connect(journal.path) as conn:
        body = json.dumps({"dataclass": "os:system", "fields": {}})
        conn.execute("INSERT INTO writes (job_id, body) VALUES ('j2', ?)", (body,))
    pending = PendingWrites(lambda: ledger, log=journal)
    with caplog.at_level(logging.ERROR):
        assert pending.flush()
    assert pending.counters["dropped"] == 1 and "not jobledger's" in caplog.text
    assert len(journal) == 0
