"""What a republished RQ job keeps: its generation against a body's ``job.save_meta()``, its
dependencies, and a record the ledger could not take at enqueue (journaled by its worker)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from redis import Redis
from rq.job import Job
from rqharness import REDIS, RQHarness, make_rq_fixture, wait_for  # noqa: F401

from jobledger.integrations.rq import Queue, install
from jobledger.integrations.rq.marks import GENERATION
from jobledger.model import JobState


def phases(h: RQHarness, job_id: str, phase: str) -> list[float]:
    return sorted(r[3] for r in h.runs() if r[0] == job_id and r[1] == phase)


def test_a_body_saving_its_meta_does_not_set_back_a_republished_generation(
    make_rq: Callable[..., RQHarness], tmp_path: Path
) -> None:
    """The job is republished while it runs (a sweep that judged its worker dead); its body
    then saves the meta it loaded. The new delivery still reads the new generation: it runs,
    instead of being skipped as stale."""
    h = make_rq("sqlite", "Worker")
    go = tmp_path / "go"
    job_id = h.enqueue("save_meta_after", str(go))
    h.start_worker("w1")
    wait_for("the claim", lambda: h.job(job_id).state is JobState.STARTED)
    h.integration.runtime.recovery().recover(h.job(job_id), why="the test republishes it")
    assert h.job(job_id).generation == 1
    go.touch()
    h.wait("the republished job to succeed", lambda: h.all_in([job_id], JobState.SUCCEEDED),
           [job_id], 30)  # fmt: skip
    assert (h.job(job_id).generation, len(phases(h, job_id, "start"))) == (1, 2)
    assert Job.fetch(job_id, connection=h.redis).meta["progress"] == "saved"
    assert h.redis.hget(f"rq:job:{job_id}", GENERATION) == b"1"


def test_a_job_put_back_waits_again_for_the_job_it_depends_on(
    make_rq: Callable[..., RQHarness],
) -> None:
    """Redis lost the lists holding both jobs (restarted without persistence): the sweep
    publishes both again, and the dependent one runs only after its dependency finished,
    even with a second worker free."""
    h = make_rq("sqlite", "SimpleWorker")
    first = h.enqueue("work", 1, seconds=1.5)
    second = h.enqueue("work", 2, depends_on=first)
    assert h.job(second).options["depends_on"] == {"jobs": [first], "allow_failure": False}
    h.redis.delete(h.queue.key, h.queue.deferred_job_registry.key)
    h.start_worker("w1")
    h.start_worker("w2")
    ids = [first, second]
    h.wait("both to succeed", lambda: h.all_in(ids, JobState.SUCCEEDED), ids, 30)
    assert [h.job(i).generation for i in ids] == [1, 1]
    assert phases(h, second, "start")[0] >= phases(h, first, "done")[-1]


def test_a_job_enqueued_while_the_ledger_was_down_survives_its_worker_dying(
    make_rq: Callable[..., RQHarness],
) -> None:
    """The enqueue could not record the job (its ledger was down) and marked it so; the
    worker that takes it journals its record, then dies before its work horse forks. The
    record stands anyway and the job is put back and runs once."""
    h = make_rq("sqlite", "Worker")
    down = install(
        Redis.from_url(REDIS), h.settings.replace(database_url="postgresql://127.0.0.1:1/none")
    )
    try:
        job_id = Queue(h.queue_name, connection=down.connection).enqueue("rqtasks.work", 1).id
    finally:
        down.close()
    assert h.store.get(job_id) is None
    victim = h.start_worker("victim", "rqtasks.PausingWorker")
    wait_for("the victim to stop before its work horse forks", victim.stopped)
    victim.kill()
    h.start_worker("survivor")
    h.wait("the job to be put back and succeed", lambda: h.all_in([job_id], JobState.SUCCEEDED),
           [job_id], 30)  # fmt: skip
    record = h.job(job_id)
    assert record.generation >= 1 and record.owner.startswith("survivor:")  # type: ignore[union-attr]
    assert len(phases(h, job_id, "start")) == 1
