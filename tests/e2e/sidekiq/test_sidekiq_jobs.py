"""A real Sidekiq app reporting through the seed endpoints: its jobs in the ledger as system
``sidekiq``, and a failed one restarted from the ledger, run again by Ruby under its own jid."""

from __future__ import annotations

from collections import Counter

from sidekiq_harness import (  # noqa: F401  (fixtures)
    SidekiqApp,
    Supervisor,
    sidekiq_fixture,
    sidekiq_redis_fixture,
    supervisor_fixture,
)

from jobledger.model import JobState


def test_fifty_jobs_succeed_in_the_ledger(sidekiq: SidekiqApp, supervisor: Supervisor) -> None:
    sidekiq.start(concurrency=5)
    jids = sidekiq.enqueue(50)
    supervisor.wait_states(jids, JobState.SUCCEEDED)
    assert {supervisor.job(j).system for j in jids} == {"sidekiq"}
    assert Counter(n["jid"] for n in sidekiq.notes("completes")) == Counter(jids)


def test_restart_of_a_failed_job_runs_it_again_with_its_jid(
    sidekiq: SidekiqApp, supervisor: Supervisor
) -> None:
    sidekiq.redis.set("jl:hold", "1")  # the job is held until it is told to fail
    sidekiq.start(concurrency=1)
    (jid,) = sidekiq.enqueue(1)
    sidekiq.redis.set(f"jl:fail:{jid}", "1")
    sidekiq.redis.delete("jl:hold")
    supervisor.wait_states([jid], JobState.FAILED)
    assert "told to fail" in (supervisor.job(jid).error or "")

    sidekiq.redis.delete(f"jl:fail:{jid}")
    restarted = supervisor.cli("restart", jid)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    supervisor.wait_states([jid], JobState.SUCCEEDED)
    record = supervisor.job(jid)
    assert (record.restarts, record.generation) == (1, 1)
    assert [n["jid"] for n in sidekiq.notes("completes")] == [jid]
    assert [n["jid"] for n in sidekiq.notes("starts")] == [jid, jid]


def test_bulk_restart_reports_what_it_could_not_restart(
    sidekiq: SidekiqApp, supervisor: Supervisor
) -> None:
    """A job of a system without an integration here fails alone; the Sidekiq one goes."""
    from jobledger.model import JobRecord

    supervisor.store.create(JobRecord(id="rq-1", name="t", system="rq", state=JobState.FAILED))
    supervisor.store.create(
        JobRecord(id="sk-1", name="TrackedJob", system="sidekiq", args=[1], state=JobState.FAILED)
    )
    dry = supervisor.cli("restart", "--state", "failed", "--dry-run")
    assert dry.returncode == 1
    assert "would restart: 1" in dry.stdout and "sk-1" in dry.stdout
    assert "failed rq-1: no integration for queue system 'rq'" in " ".join(dry.stdout.split())

    only = supervisor.cli("restart", "--state", "failed", "--system", "sidekiq", "--yes")
    assert only.returncode == 0, only.stdout + only.stderr
    assert "restarted: 1" in only.stdout
    sidekiq.start(concurrency=1)
    supervisor.wait_states(["sk-1"], JobState.SUCCEEDED)
    assert supervisor.job("rq-1").state is JobState.FAILED
