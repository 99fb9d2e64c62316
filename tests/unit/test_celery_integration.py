"""The Celery integration in one process: an in-memory broker, a MemoryStore, no worker.

What it publishes (options kept for a republish, the restart header) and what the claim path
does with a delivery, driven through ``tasks.run_guarded`` with a pushed request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock

import pytest
from celery import Celery, Signature, Task, chain, signals
from celery.exceptions import Ignore, Reject, Retry

from jobledger.config import Settings
from jobledger.errors import ConfigError
from jobledger.heartbeat import Health
from jobledger.integrations.celery import (
    GENERATION_HEADER,
    REPUBLISH_HEADER,
    RESTART_HEADER,
    CeleryIntegration,
    install,
)
from jobledger.integrations.celery.consumption import held_by_celery
from jobledger.integrations.celery.tasks import run_guarded
from jobledger.lifecycle import Claim
from jobledger.model import ORPHAN_OPTION, Instance, JobRecord, JobState, Republish
from jobledger.runtime.held import HeldJobs
from jobledger.testing import MemoryStore

S = JobState


@dataclass
class Sent:
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: Any


@dataclass
class Env:
    app: Celery
    store: MemoryStore
    integration: CeleryIntegration
    sent: list[Sent]

    def task(self, name: str) -> Task:
        return self.app.tasks[name]


@pytest.fixture
def make_env() -> Iterator[Callable[..., Env]]:
    made: list[Env] = []

    def capture(headers: Any = None, properties: Any = None, body: Any = None, **_: Any) -> None:
        for env in made:
            # the headers as published: later receivers (the integration's) fill them in
            env.sent.append(
                Sent(headers if headers is not None else {}, dict(properties or {}), body)
            )

    signals.before_task_publish.connect(capture, weak=False)

    def make(**settings: Any) -> Env:
        app = Celery("unit", broker="memory://", set_as_current=False)
        app.conf.update(task_default_queue="q", task_ignore_result=True)

        @app.task(name="t.work", tracked=True, shared=False)
        def work(n: int) -> int:
            return n

        @app.task(name="t.after", tracked=True, shared=False)
        def after(n: int) -> int:
            return n

        store = MemoryStore()
        integration = install(app, store=store, settings=Settings(**settings))
        integration.runtime.instance_id = "w:1"
        integration.runtime.health.mark_ok()
        made.append(Env(app, store, integration, []))
        return made[-1]

    yield make
    signals.before_task_publish.disconnect(capture)
    for env in made:
        env.integration.close()


def run(env: Env, job_id: str, body: Callable[[], Any], **request: Any) -> Any:
    """Run ``body`` through the claim guard as a delivery of ``job_id`` to ``t.work``."""
    task = env.task("t.work")
    task.push_request(id=job_id, args=[1], kwargs={}, delivery_info={"routing_key": "q"}, **request)
    try:
        return run_guarded(env.integration, task, body)
    finally:
        task.pop_request()


def test_a_republish_keeps_priority_eta_expiry_and_callbacks(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    link = env.task("t.after").s(2)
    result = env.task("t.work").apply_async(
        (1,), priority=5, countdown=3600, expires=7200, link=link
    )
    record = env.store.get(result.id)
    assert record is not None
    assert {"priority", "eta", "expires", "link"} <= set(record.options)
    first = env.sent[-1]
    env.integration.publish(record)
    again = env.sent[-1]
    assert again is not first and again.headers["id"] == result.id
    assert again.properties["priority"] == first.properties["priority"] == 5
    for header in ("eta", "expires"):
        assert again.headers[header] == first.headers[header] is not None
    # as the broker sees them (a signature's args tuple is a list once serialized)
    callbacks = [json.loads(json.dumps(sent.body[2]["callbacks"])) for sent in (first, again)]
    assert callbacks[0] == callbacks[1] and callbacks[1][0]["task"] == "t.after"
    assert RESTART_HEADER not in again.headers  # queued: a republish, not a restart


@pytest.mark.parametrize("state", [S.FAILED, S.DEAD])
def test_a_restart_publish_says_so_and_only_it_may_run_the_job_again(
    make_env: Callable[..., Env], state: JobState
) -> None:
    env = make_env()
    record = JobRecord(id="j", name="t.work", system="celery", queue="q", state=state)
    assert env.store.create(record)
    env.integration.publish(record)
    assert env.sent[-1].headers[RESTART_HEADER] is True
    ran: list[int] = []
    with pytest.raises(Ignore):  # a stray redelivery (no header): acknowledged, not run
        run(env, "j", lambda: ran.append(1))
    assert ran == [] and env.integration.runtime.counters["stray_redeliveries_skipped"] == 1
    still = env.store.get("j")
    assert still is not None and still.state is state
    run(env, "j", lambda: ran.append(1), **{RESTART_HEADER: True})
    done = env.store.get("j")
    assert ran == [1] and done is not None and done.state is S.SUCCEEDED


def test_keep_succeeded_zero_deletes_a_job_on_success(make_env: Callable[..., Env]) -> None:
    env = make_env(keep_succeeded=0)
    assert env.store.create(JobRecord(id="j", name="t.work", system="celery", queue="q"))
    assert run(env, "j", lambda: "ok") == "ok"
    assert env.store.get("j") is None


def test_a_retry_the_broker_refused_leaves_the_job_failed(make_env: Callable[..., Env]) -> None:
    env = make_env()
    assert env.store.create(JobRecord(id="j", name="t.work", system="celery", queue="q"))

    def retry_whose_publish_fails() -> None:
        # Celery's retry publishes first: our hook moves the job to retrying, then the broker
        # refuses the message and the error propagates out of the task body.
        env.integration.recorder.on_before_publish(
            headers={"id": "j", "task": "t.work"}, body=([1], {})
        )
        raise ConnectionError("broker refused the retry (test)")

    with pytest.raises(ConnectionError):
        run(env, "j", retry_whose_publish_fails)
    record = env.store.get("j")
    assert record is not None and record.state is S.FAILED
    assert record.error is not None and "broker refused the retry" in record.error


def test_task_replace_is_recorded_as_such_and_left_to_the_replacement(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    assert env.store.create(JobRecord(id="j", name="t.work", system="celery", queue="q"))

    def replaced() -> None:
        # what Task.replace does: publish another task under this id, then raise Ignore
        headers = {"id": "j", "task": "t.after", "replaced_task_nesting": 1}
        env.integration.recorder.on_before_publish(headers=headers, body=([1], {}))
        raise Ignore("Replaced by new task")

    with pytest.raises(Ignore):
        run(env, "j", replaced)
    record = env.store.get("j")
    assert record is not None and record.state is S.RETRYING  # claimable by the replacement
    assert record.error is not None and record.error.startswith("replaced by task t.after")


def test_a_worker_recovers_only_celery_jobs(make_env: Callable[..., Env]) -> None:
    assert make_env().integration.runtime.recovery().systems == {"celery"}


def test_a_delivery_to_a_worker_that_cannot_beat_runs_and_is_not_handed_back(
    make_env: Callable[..., Env],
) -> None:
    """Invariant 9 is the consumer's to keep (it stops consuming); a delivery that reached a
    pool process anyway runs once, claimed, instead of being re-published in a loop."""
    env = make_env()
    env.integration.runtime.health = Health(ttl=30.0)  # never beat: past the TTL
    assert not env.integration.runtime.health.can_claim
    assert env.store.create(JobRecord(id="j", name="t.work", system="celery", queue="q"))
    sent = len(env.sent)
    assert run(env, "j", lambda: "ran") == "ran"
    done = env.store.get("j")
    assert done is not None and done.state is S.SUCCEEDED and done.owner == "w:1"
    assert len(env.sent) == sent  # nothing published again


def test_every_publish_carries_the_generation_and_a_republish_its_reason(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    result = env.task("t.work").delay(1)
    assert env.sent[-1].headers[GENERATION_HEADER] == 0
    assert REPUBLISH_HEADER not in env.sent[-1].headers
    record = env.store.get(result.id)
    assert record is not None
    env.integration.publish(replace(record, generation=3), reason=Republish.RECOVERY)
    assert env.sent[-1].headers[GENERATION_HEADER] == 3
    assert env.sent[-1].headers[REPUBLISH_HEADER] == "recovery"


def test_a_stale_delivery_is_skipped_and_the_current_one_runs_and_finishes(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    assert env.store.create(JobRecord(id="j", name="t.work", system="celery", generation=2))
    ran: list[int] = []
    with pytest.raises(Ignore):
        run(env, "j", lambda: ran.append(1), **{GENERATION_HEADER: 1})
    assert ran == [] and env.integration.runtime.counters["stale_deliveries_skipped"] == 1
    run(env, "j", lambda: ran.append(2), **{GENERATION_HEADER: 2})
    done = env.store.get("j")
    assert ran == [2] and done is not None and (done.state, done.generation) == (S.SUCCEEDED, 2)


def test_a_retry_message_continues_the_generation_of_its_run(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    assert env.store.create(JobRecord(id="j", name="t.work", system="celery", generation=5))
    task = env.task("t.work")

    def retries() -> None:
        raise task.retry(countdown=60)

    with pytest.raises(Retry):
        run(env, "j", retries, called_directly=False, **{GENERATION_HEADER: 5})
    assert env.sent[-1].headers["id"] == "j"
    assert env.sent[-1].headers[GENERATION_HEADER] == 5
    record = env.store.get("j")
    assert record is not None and (record.state, record.generation) == (S.RETRYING, 5)


def test_a_tasks_orphan_policy_is_recorded_with_its_job_and_checked_at_boot(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(on_orphan="discard")
    env.task("t.after").on_orphan = "fail"
    charged = env.task("t.after").delay(1)
    plain = env.task("t.work").delay(1)
    after, work = env.store.get(charged.id), env.store.get(plain.id)
    assert after is not None and after.options[ORPHAN_OPTION] == "fail"
    assert work is not None and work.options[ORPHAN_OPTION] == "discard"  # the setting
    env.task("t.work").on_orphan = "retry-forever"
    with pytest.raises(ConfigError, match=r"t\.work: unknown orphan policy"):
        env.integration.wrap_tasks()


def test_a_retry_whose_message_the_broker_refused_ends_failed(
    make_env: Callable[..., Env],
) -> None:
    """``Task.retry`` turns a failed publish into ``Reject``: the job, moved to retrying just
    before, must end failed (no message will ever come), not wait in retrying for ever."""
    env = make_env()
    assert env.store.create(JobRecord(id="j", name="t.work", system="celery", queue="q"))
    task = env.task("t.work")

    def broker_refuses(*args: Any, **kwargs: Any) -> None:
        signals.before_task_publish.send(
            sender="t.work", headers={"id": "j", "task": "t.work"}, body=([1], {}, {})
        )
        raise ConnectionError("the broker refused the retry")

    def retries() -> None:
        raise task.retry(countdown=1)

    with (
        mock.patch.object(Signature, "apply_async", broker_refuses),
        pytest.raises(Reject),
    ):
        run(env, "j", retries, called_directly=False, **{GENERATION_HEADER: 0})
    record = env.store.get("j")
    assert record is not None and record.state is S.FAILED
    assert record.error is not None and "retry could not be sent" in record.error


def test_replacing_a_job_by_a_chain_hands_its_id_and_generation_to_the_last_step(
    make_env: Callable[..., Env],
) -> None:
    """``Task.replace(chain(a, b))``: Celery gives the job's id to the chain's last step,
    published later by the step before it. The job waits (retrying), and that step's message
    carries the run's generation, so it runs as the job's current message."""
    env = make_env()
    assert env.store.create(
        JobRecord(id="j", name="t.work", system="celery", queue="q", generation=2)
    )
    task, after = env.task("t.work"), env.task("t.after")

    def replaced() -> None:
        raise task.replace(chain(after.s(1), after.s()))

    with pytest.raises(Ignore):
        run(env, "j", replaced, called_directly=False, **{GENERATION_HEADER: 2})
    record = env.store.get("j")
    assert record is not None and (record.state, record.generation) == (S.RETRYING, 2)
    first = env.sent[-1]
    assert first.headers["id"] != "j"  # the chain's first step: a job of its own
    (last,) = first.body[2]["chain"]
    assert last["options"]["task_id"] == "j"
    assert last["options"]["headers"][GENERATION_HEADER] == 2
    # the last step's delivery, as the step before it publishes it: claimed and run
    ran: list[str] = []
    step = env.task("t.after")
    step.push_request(
        id="j", args=[1], kwargs={}, delivery_info={"routing_key": "q"}, called_directly=False,
        **{GENERATION_HEADER: 2},
    )  # fmt: skip
    try:
        run_guarded(env.integration, step, lambda: ran.append("last step"))
    finally:
        step.pop_request()
    done = env.store.get("j")
    assert ran == ["last step"] and done is not None and done.state is S.SUCCEEDED


@pytest.mark.parametrize(
    ("policy", "state"), [("requeue", S.QUEUED), ("fail", S.FAILED), ("discard", S.CANCELLED)]
)
def test_a_pool_process_lost_after_its_claim_follows_the_tasks_orphan_policy(
    make_env: Callable[..., Env], policy: str, state: JobState
) -> None:
    env = make_env()
    env.task("t.work").on_orphan = policy
    env.store.heartbeat(Instance(name="w", nonce="1"))
    record = JobRecord(id="j", name="t.work", system="celery", queue="q")
    assert env.store.create(replace(record, options=env.integration.with_policy("t.work", {})))
    assert env.integration.runtime.lifecycle().claim("j", generation=0) is Claim.CLAIMED
    env.integration.runtime.outcomes.recover_lost(
        "j", "WorkerLostError", replace(record, generation=0)
    )
    after = env.store.get("j")
    assert after is not None and after.state is state
    republished = [s for s in env.sent if s.headers.get("id") == "j"]
    assert len(republished) == (1 if policy == "requeue" else 0)


def test_a_pool_process_lost_before_its_claim_has_its_job_requeued(
    make_env: Callable[..., Env],
) -> None:
    """The claim never landed: its body never ran, so the job is requeued (next generation,
    a requeue: it never supersedes a run), whatever its task's orphan policy."""
    env = make_env()
    env.task("t.work").on_orphan = "fail"
    record = JobRecord(id="j", name="t.work", system="celery", queue="q")
    assert env.store.create(record)
    env.integration.runtime.outcomes.recover_lost("j", "WorkerLostError", record)
    after = env.store.get("j")
    assert after is not None and (after.state, after.generation) == (S.QUEUED, 1)
    assert after.recoveries == 0  # it never ran: no sign of a poison pill
    assert env.sent[-1].headers[GENERATION_HEADER] == 1
    assert env.sent[-1].headers[REPUBLISH_HEADER] == "requeue"


def test_a_publish_that_fails_leaves_its_job_cancelled_as_the_caller_was_told(
    make_env: Callable[..., Env],
) -> None:
    """The record is written as the message is sent; if the broker then refuses it, the
    caller gets the error, and the ledger must not keep a queued job that the lost-message
    sweep would later publish behind the caller's back."""
    env = make_env()
    with (
        mock.patch("kombu.messaging.Producer.publish", side_effect=ConnectionError("down")),
        pytest.raises(ConnectionError),
    ):
        env.task("t.work").apply_async((1,), task_id="refused", retry=False)
    record = env.store.get("refused")
    assert record is not None and record.state is S.CANCELLED
    assert record.error is not None and "publish failed" in record.error
    sent = env.task("t.work").apply_async((2,), task_id="fine")  # the next one is untouched
    again = env.store.get(sent.id)
    assert again is not None and again.state is S.QUEUED


def test_a_job_started_here_that_no_process_holds_is_recovered_at_the_second_look(
    make_env: Callable[..., Env],
) -> None:
    """Billiard puts a job back when the process it was written to dies before acknowledging
    it, and reports no ``WorkerLostError``; the copy it hands another process finds the job
    started by this same worker and is skipped. The audit sees the ledger say "started here"
    while no process holds it, twice, and recovers it; a job a process does hold is left."""
    from celery.worker import state as worker_state

    env = make_env()
    env.integration.runtime.held = HeldJobs(held_by_celery)  # as a worker registers it
    env.store.heartbeat(Instance(name="w", nonce="1"))
    for job_id in ("lost", "running"):
        assert env.store.create(JobRecord(id=job_id, name="t.work", system="celery", queue="q"))
        assert env.integration.runtime.lifecycle().claim(job_id, generation=0) is Claim.CLAIMED

    @dataclass(eq=False)
    class Held:
        id: str

    held = Held("running")
    worker_state.active_requests.add(held)
    try:
        env.integration.runtime.audit()  # first look: maybe a claim racing its report
        assert env.store.get("lost").state is S.STARTED  # type: ignore[union-attr]
        env.integration.runtime.audit()
    finally:
        worker_state.active_requests.discard(held)
    lost, running = env.store.get("lost"), env.store.get("running")
    assert lost is not None and (lost.state, lost.generation) == (S.QUEUED, 1)
    assert running is not None and running.state is S.STARTED
    assert env.sent[-1].headers["id"] == "lost"
