"""The Celery app the end-to-end tests run in real worker processes (and publish from).

Each task body writes a row per phase to the test's execution log (a SQLite file), with the
worker's instance name, its pid and the time, so a test can count how often each job ran. The
``work``, ``hangs_first_time`` and ``fails_first_time`` tasks are the integration contract's
(:mod:`jobledger.testing.contract.integration`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from jobledger.config import Settings
from jobledger.integrations.celery import CeleryIntegration, install
from jobledger.model import JobRecord, Republish
from jobledger.testing.executions import FIRST_FAILURE, ExecutionLog, record_run


def has_run_before(job_id: str) -> bool:
    return len(ExecutionLog.from_env().executions(job_id)) > 1


def transport_options(queue: str, visibility_timeout: float | None) -> dict[str, Any]:
    """A short visibility timeout restores every unacked message of the Redis database, so such
    a test keeps its keys under a prefix of its own (other sessions share the server)."""
    if visibility_timeout is None:
        return {"visibility_timeout": 3600}
    return {
        "visibility_timeout": visibility_timeout,
        "global_keyprefix": f"{queue}:",
        "unacked_restore_interval": 0.5,
        "unacked_restore_throttle": 1,
    }


def make_app(
    broker: str, queue: str, settings: Settings, visibility_timeout: float | None = None
) -> tuple[Celery, CeleryIntegration]:
    app = Celery("e2eapp", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        worker_prefetch_multiplier=int(os.environ.get("E2E_PREFETCH", "1")),
        task_acks_late=os.environ.get("E2E_ACKS_LATE") == "1",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options=transport_options(queue, visibility_timeout),
        worker_lost_wait=1.0,  # report a dead pool process's job after 1s, not 10s
    )

    @app.task(name="e2e.work", bind=True, tracked=True, shared=False)
    def work(self: Any, n: int, seconds: float = 0.0) -> int:
        record_run(self.request.id, "start")
        time.sleep(seconds)
        record_run(self.request.id, "done")
        return n

    @app.task(name="e2e.hangs_first_time", bind=True, tracked=True, shared=False)
    def hangs_first_time(self: Any, n: int) -> int:
        record_run(self.request.id, "start")
        if not has_run_before(self.request.id):
            time.sleep(120)  # until the test kills this pool process
        record_run(self.request.id, "done")
        return n

    @app.task(name="e2e.fails_first_time", bind=True, tracked=True, shared=False)
    def fails_first_time(self: Any, n: int) -> int:
        record_run(self.request.id, "start")
        if not has_run_before(self.request.id):
            raise ValueError(f"job {n} {FIRST_FAILURE}")
        record_run(self.request.id, "done")
        return n

    @app.task(name="e2e.charges_once", bind=True, tracked=True, shared=False, on_orphan="fail")
    def charges_once(self: Any, n: int) -> int:
        """Must not run twice: if its worker dies under it, a person decides."""
        record_run(self.request.id, "start")
        time.sleep(120)  # until the test kills its process
        record_run(self.request.id, "done")
        return n

    @app.task(name="e2e.untracked", bind=True, shared=False)
    def untracked(self: Any, n: int) -> int:
        record_run(self.request.id, "untracked")
        return n

    @app.task(name="e2e.flaky", bind=True, tracked=True, shared=False, max_retries=3)
    def flaky(self: Any, failures: int) -> str:
        record_run(self.request.id, "start")
        if self.request.retries < failures:
            raise self.retry(exc=ValueError(f"failure {self.request.retries + 1}"), countdown=0)
        record_run(self.request.id, "done")
        return "ok"

    @app.task(name="e2e.suicide", bind=True, tracked=True, shared=False)
    def suicide(self: Any) -> None:
        record_run(self.request.id, "start")
        os.kill(os.getpid(), 9)

    integration = install(app, settings=settings)
    publish = integration.publish

    def counted_publish(record: JobRecord, *, reason: Republish | None = None) -> None:
        """Every publish by a recoverer (recovery, restart) leaves a row in the runs table."""
        publish(record, reason=reason)
        record_run(record.id, "published")

    integration.publish = counted_publish  # type: ignore[method-assign]
    return app, integration
