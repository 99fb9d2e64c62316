"""Sidekiq processes killed and stopped under jobs: what the supervisor does, read from
Sidekiq's own heartbeats (the Ruby app reports nothing about processes)."""

from __future__ import annotations

import signal
import time
from collections import Counter

from sidekiq_harness import (  # noqa: F401  (fixtures)
    MAX_RECOVERIES,
    PROCESS_TTL,
    SidekiqApp,
    Supervisor,
    ran_after_success,
    sidekiq_fixture,
    sidekiq_redis_fixture,
    supervisor_fixture,
)

from jobledger.model import JobState
from jobledger.testing import wait_for


def test_sigkilled_process_jobs_complete_in_another(
    sidekiq: SidekiqApp, supervisor: Supervisor
) -> None:
    sidekiq.redis.set("jl:hold", "1")
    doomed = sidekiq.start(concurrency=5)
    jids = sidekiq.enqueue(5)
    doomed.wait_holding(set(jids))
    killed_at = time.monotonic()
    doomed.signal(signal.SIGKILL)

    sidekiq.redis.delete("jl:hold")
    sidekiq.start(concurrency=5)
    wait_for(
        "the killed process's jobs to be pushed back",
        lambda: all(supervisor.job(j).generation == 1 for j in jids),
    )
    print(f"pushed back {time.monotonic() - killed_at:.2f}s after the SIGKILL")
    supervisor.wait_states(jids, JobState.SUCCEEDED)
    completed = Counter(n["jid"] for n in sidekiq.notes("completes"))
    assert set(completed) == set(jids)  # each body completed, and in the second process:
    assert {n["pid"] for n in sidekiq.notes("completes")} == {sidekiq.processes[1].process.pid}
    assert ran_after_success(sidekiq, supervisor) == []
    # each counted as a recovery, but one whose start had not reached the ledger yet
    assert all(supervisor.job(j).recoveries <= 1 for j in jids)


def test_sigkill_right_after_the_starts_loses_nothing(
    sidekiq: SidekiqApp, supervisor: Supervisor
) -> None:
    """Killed as soon as the ledger shows the jobs started, most often before a beat wrote
    them into the process's work: those are found through the ledger instead."""
    sidekiq.redis.set("jl:hold", "1")
    doomed = sidekiq.start(concurrency=4)
    survivor = sidekiq.start(concurrency=4)  # a live process the judgement must not blame
    jids = sidekiq.enqueue(4)
    supervisor.wait_states(jids, JobState.STARTED)
    # the middleware reports started before the body notes its start: wait for the notes too,
    # or a job of the doomed process not noted yet is taken for the survivor's
    wait_for("each body to note its start", lambda: len(sidekiq.notes("starts")) == len(jids))
    on_doomed = [n["jid"] for n in sidekiq.notes("starts") if n["pid"] == doomed.process.pid]
    doomed.signal(signal.SIGKILL)
    sidekiq.redis.delete("jl:hold")
    supervisor.wait_states(jids, JobState.SUCCEEDED)
    for jid in jids:
        assert supervisor.job(jid).recoveries == (1 if jid in on_doomed else 0)
    assert Counter(n["jid"] for n in sidekiq.notes("completes")) == Counter(jids)
    assert ran_after_success(sidekiq, supervisor) == []
    assert survivor.process.poll() is None


def test_sigtermed_process_causes_no_duplicate(sidekiq: SidekiqApp, supervisor: Supervisor) -> None:
    """Sidekiq pushes its unfinished jobs back itself on TERM and leaves ``processes``: the
    supervisor must not push them back a second time."""
    sidekiq.redis.set("jl:hold", "1")
    stopping = sidekiq.start(concurrency=3)
    jids = sidekiq.enqueue(3)
    stopping.wait_holding(set(jids))
    stopping.signal(signal.SIGTERM)  # -t 1: its held jobs go back to the queue after 1 s
    assert stopping.identity_gone()

    sidekiq.redis.delete("jl:hold")
    sidekiq.start(concurrency=3)
    supervisor.wait_states(jids, JobState.SUCCEEDED)
    # Past the TTL and a few looks more, the supervisor has still pushed nothing back.
    deadline = time.monotonic() + PROCESS_TTL + 3
    while time.monotonic() < deadline:
        assert all(supervisor.job(j).recoveries == 0 for j in jids)
        time.sleep(0.2)
    assert Counter(n["jid"] for n in sidekiq.notes("completes")) == Counter(jids)
    assert sidekiq.redis.llen("queue:default") == 0


def test_job_killed_four_times_ends_dead(sidekiq: SidekiqApp, supervisor: Supervisor) -> None:
    sidekiq.redis.set("jl:hold", "1")
    process = sidekiq.start(concurrency=1)
    (jid,) = sidekiq.enqueue(1)
    for kill in range(1, MAX_RECOVERIES + 2):
        process.wait_holding({jid})
        supervisor.wait_states([jid], JobState.STARTED)  # its body runs: a kill counts
        process.signal(signal.SIGKILL)
        if kill <= MAX_RECOVERIES:
            wait_for(f"recovery {kill}", lambda k=kill: supervisor.job(jid).recoveries == k)
            process = sidekiq.start(concurrency=1)
    supervisor.wait_states([jid], JobState.DEAD)
    record = supervisor.job(jid)
    assert "poison pill" in (record.error or "")
    assert sidekiq.redis.llen("queue:default") == 0  # not pushed back a fifth time
    assert sidekiq.notes("completes") == []
