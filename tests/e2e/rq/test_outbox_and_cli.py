"""Staging in a SQLAlchemy transaction, the relay, and the CLI's restart and recovery
publishing RQ jobs by function name, in processes that never import the task code."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import pytest
from rq.job import Job, JobStatus
from rqharness import REDIS, RQHarness, make_rq_fixture, wait_for  # noqa: F401
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from jobledger.errors import StagingError
from jobledger.model import JobState
from jobledger.relay import Relay
from jobledger.stores.sql import parse_url


class Boom(Exception):
    pass


@pytest.mark.parametrize("ledger", ["sqlite", "postgresql"])
def test_staged_jobs_are_enqueued_after_the_commit_only(
    make_rq: Callable[..., RQHarness], ledger: str
) -> None:
    h = make_rq(ledger, "SimpleWorker")
    engine = create_engine(parse_url(h.url))
    with Session(engine) as session, session.begin():
        committed = h.integration.stage("rqtasks.work", [1], queue=h.queue_name, using=session)
        by_queue = h.queue.enqueue_staged("rqtasks.work", 2, using=session)
        assert h.queue.count == 0  # nothing reaches Redis before the commit
    with pytest.raises(Boom), Session(engine) as session, session.begin():
        rolled_back = h.integration.stage("rqtasks.work", [3], queue=h.queue_name, using=session)
        raise Boom
    assert h.store.get(rolled_back) is None
    assert h.job(committed).state is JobState.QUEUED  # the fast path, right after the commit
    with pytest.raises(StagingError, match="cannot be staged"):
        h.integration.stage("rqtasks.work", [4], using=None, depends_on="x")
    h.start_worker("w1")
    wait_for(
        "the staged jobs to succeed", lambda: h.all_in([committed, by_queue], JobState.SUCCEEDED)
    )
    assert h.store.get(rolled_back) is None
    engine.dispose()


def test_the_relay_enqueues_what_the_fast_path_missed(make_rq: Callable[..., RQHarness]) -> None:
    h = make_rq("sqlite", "SimpleWorker")
    record_id = h.integration.stage("rqtasks.work", [1], queue=h.queue_name)
    assert h.job(record_id).state is JobState.QUEUED
    missed = h.integration.runtime.outbox.store  # stage a job whose fast path never ran: a crash
    from jobledger.model import JobRecord

    missed.create(
        JobRecord(id="missed-1", name="rqtasks.work", system="rq", queue=h.queue_name, args=[2],
                  state=JobState.STAGED)
    )  # fmt: skip
    report = Relay(h.store, publish=h.integration.publish_many, grace=0, batch_size=10).run_once()
    assert report.published == 1
    h.start_worker("w1")
    wait_for("both to succeed", lambda: h.all_in([record_id, "missed-1"], JobState.SUCCEEDED))


def jobledger_cli(h: RQHarness, *args: str) -> subprocess.CompletedProcess[str]:
    env = h.env("cli")
    env.pop("JOBLEDGER_EXECUTION_LOG", None)
    return subprocess.run(
        [sys.executable, "-m", "jobledger", *args, "--broker", REDIS, "--queue-system", "rq",
         "--database-url", h.url],
        env=env, cwd=h.tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cli_restart_publishes_a_failed_job_by_name(make_rq: Callable[..., RQHarness]) -> None:
    h = make_rq("sqlite", "Worker")
    job_id = h.enqueue("fails_first_time", 1)
    h.start_worker("w1")
    wait_for("the job to fail", lambda: h.all_in([job_id], JobState.FAILED))
    wait_for("RQ to fail it", lambda: job_id in h.queue.failed_job_registry.get_job_ids())
    done = jobledger_cli(h, "restart", job_id, "--yes")
    assert done.returncode == 0, done.stderr
    wait_for("the restarted job to succeed", lambda: h.all_in([job_id], JobState.SUCCEEDED))
    assert h.job(job_id).restarts == 1
    assert job_id not in h.queue.failed_job_registry.get_job_ids()
    assert Job.fetch(job_id, connection=h.redis).get_status() == JobStatus.FINISHED


def test_cli_recover_puts_back_a_dead_workers_job(make_rq: Callable[..., RQHarness]) -> None:
    """No worker is left to sweep: ``jobledger recover`` does it, without the task code."""
    h = make_rq("postgresql", "SimpleWorker")
    job_id = h.enqueue("work", 1, seconds=30)
    victim = h.start_worker("victim")
    wait_for("the body to start", lambda: any(r[0] == job_id for r in h.runs()))
    victim.kill()
    wait_for("the victim to be dead", lambda: not any(i.alive for i in h.store.instances(3)))
    done = jobledger_cli(h, "recover")
    assert done.returncode == 0, done.stderr
    assert "requeued: 1" in done.stdout
    record = h.job(job_id)
    assert (record.state, record.generation, record.recoveries) == (JobState.QUEUED, 1, 1)
    assert job_id in h.queue.get_job_ids()
    assert job_id not in h.queue.started_job_registry.get_job_ids()
    assert Counter(r[0] for r in h.runs() if r[1] == "start")[job_id] == 1


def test_the_supervisor_restarts_and_recovers_rq_jobs(make_rq: Callable[..., RQHarness]) -> None:
    """``jobledger serve`` with the RQ integration: a restart through the API publishes a
    failed job by name, and its maintenance sweep puts back a dead worker's job."""
    from fastapi.testclient import TestClient

    from jobledger.integrations.base import Registry
    from jobledger.server.app import create_app

    h = make_rq("sqlite", "SimpleWorker")
    failed = h.enqueue("fails_first_time", 1)
    stuck = h.enqueue("work", 2, seconds=30)
    victim = h.start_worker("victim")
    wait_for("the failure", lambda: h.all_in([failed], JobState.FAILED))
    wait_for("the long job's body", lambda: any(r[0] == stuck for r in h.runs()))
    victim.kill()
    integrations = Registry()
    integrations.register(h.integration)
    settings = h.settings.replace(instance_name="supervisor")
    with TestClient(create_app(settings, store=h.store, integrations=integrations)) as client:
        done = client.post(f"/api/v1/jobs/{failed}/restart").json()
        assert done["done"] == [failed]
        wait_for("the sweep to put the stuck job back", lambda: h.job(stuck).generation == 1)
    h.start_worker("w2")
    wait_for("the restarted job to succeed", lambda: h.all_in([failed], JobState.SUCCEEDED))
    assert h.job(stuck).recoveries == 1
