"""The Celery app of the chaos run, configured as README recommends (late acks, prefetch 1).

Its one task counts each start and completion of a job in a Redis of the run's own choosing
(the machine's main Redis, never restarted by the run), with the wall-clock time of each, so
the verdict can tell how often a body ran and when, whatever happened to the ledger.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

from jobledger.config import Settings
from jobledger.integrations.celery import CeleryIntegration, install

#: The run's event list in the counting Redis: ``start|done <job id> <epoch> <instance>``.
EVENTS = "{prefix}events"
#: Completions so far (the run paces its faults on it).
DONE = "{prefix}done"


def make_app(broker: str, queue: str, counts_url: str, prefix: str, settings: Settings) -> tuple[
    Celery, CeleryIntegration
]:  # fmt: skip
    app = Celery("chaosapp", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    counts: list[redis.Redis] = []
    events, done = EVENTS.format(prefix=prefix), DONE.format(prefix=prefix)
    instance = os.environ.get("JOBLEDGER_INSTANCE_NAME", "client")

    def note(phase: str, job_id: str) -> None:
        if not counts:  # one client per pool process, made after the fork
            counts.append(redis.Redis.from_url(counts_url))
        with counts[0].pipeline() as pipe:
            pipe.rpush(events, f"{phase} {job_id} {time.time():.6f} {instance}")
            if phase == "done":
                pipe.incr(done)
            pipe.execute()

    @app.task(name="chaos.work", bind=True, tracked=True, shared=False)
    def work(self: Any, seconds: float) -> None:
        note("start", self.request.id)
        time.sleep(seconds)
        note("done", self.request.id)

    return app, install(app, settings=settings)
