# mypy: disable-error-code="import-untyped"
"""What a Celery worker consumes and holds: it stops consuming while it cannot reach the ledger
(invariant 9), and tells the runtime which jobs its processes hold now.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from jobledger.runtime.service import Service
from jobledger.runtime.worker import WorkerRuntime

log = logging.getLogger(__name__)


def held_by_celery() -> set[str] | None:
    """Ids of the requests this worker's Celery holds now (reserved, running, waiting for
    their eta), or None if the event loop kept changing them while this thread read."""
    from celery.worker import state as worker_state

    for _ in range(3):
        try:
            return {
                str(r.id)
                for requests in (
                    worker_state.reserved_requests,
                    worker_state.active_requests,
                    getattr(worker_state, "scheduled_requests", ()),  # eta/countdown
                )
                for r in requests
            }
        except RuntimeError:  # a set changed size while we iterated it
            continue
    return None


def in_flight() -> int:
    """The requests this worker's pool runs now (what a drain waits for)."""
    from celery.worker import state as worker_state

    return len(worker_state.active_requests)


class Consumption(Service):
    """Invariant 9 for a Celery worker: it stops consuming its queues while its heartbeat has
    failed for longer than the TTL, and consumes again once a beat succeeds. Messages wait in
    the broker meanwhile instead of being handed back and forth; deliveries already in the
    worker run, their claims journaled (invariant 7).

    Celery's remote control does it (``cancel_consumer`` / ``add_consumer``, sent to this
    worker only): the command travels through the broker and is carried out by the worker's
    own event loop, the only thread that may touch the consumer, with every pool. A thread of
    its own sends them, so a slow broker never holds up a heartbeat, and checks every interval
    that the consumer did as told, sending again if a command was lost (a Redis broadcast is
    not kept for a worker that is reconnecting).
    """

    def __init__(self, app: Celery, runtime: WorkerRuntime) -> None:
        super().__init__("consumption")
        self.app = app
        self.runtime = runtime
        self.interval = runtime.settings.heartbeat_interval
        self.consumer: Any = None
        self.queues: list[str] = []
        self._wanted = True
        self._said = True  # what the log last said: consuming or not

    def attach(self, consumer: Any) -> None:
        """The consumer started (in its event loop's thread, so it may be stopped directly)."""
        if not self.app.conf.worker_enable_remote_control:
            log.warning(
                "Celery's remote control is off (worker_enable_remote_control): this worker "
                "cannot stop consuming while the ledger is unreachable; jobs delivered then run "
                "with their claims journaled"
            )
            return
        self.consumer = consumer
        self.queues = [q.name for q in consumer.task_consumer.queues]
        self._wanted = self.runtime.health.can_claim
        if not self._wanted:
            self._announce(False)
            for queue in self.queues:
                consumer.cancel_task_queue(queue)
        self.start()

    def want(self, can_claim: bool) -> None:
        """After each beat (the heartbeat's thread): consume if it ``can_claim``."""
        self._wanted = can_claim
        if can_claim != self._said:
            self.wake()

    def serve(self) -> None:
        while not self.pause(self.interval):
            try:
                self._follow()
            except Exception as exc:  # the broker is down, say: the next round tries again
                log.warning("jobledger could not switch the worker's consumer: %r", exc)

    def _follow(self) -> None:
        wanted = self._wanted
        if wanted != self._said:
            self._announce(wanted)
        if self._consuming() == wanted:
            return
        control = self.app.control
        command = control.add_consumer if wanted else control.cancel_consumer
        for queue in self.queues:
            command(queue, destination=[self.consumer.hostname])

    def _consuming(self) -> bool:
        task_consumer = self.consumer.task_consumer
        return any(task_consumer.consuming_from(queue) for queue in self.queues)

    def _announce(self, consuming: bool) -> None:
        self._said = consuming
        instance = self.runtime.instance_id
        if consuming:
            self.runtime.count("consuming_resumed")
            log.warning("instance %s reaches the ledger again: consuming %s", instance, self.queues)
        else:
            self.runtime.count("consuming_stopped")
            log.error(
                "instance %s cannot reach the ledger (no beat for over its TTL): it stops "
                "consuming %s until it does; messages wait in the broker",
                instance,
                self.queues,
            )
