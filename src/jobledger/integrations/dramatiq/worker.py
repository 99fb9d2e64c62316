"""A Dramatiq worker process's glue to the worker runtime: what it holds, and whether it
consumes.

**One instance per worker process.** ``dramatiq``'s main process never imports the broker
module: each worker process loads it, so each runs the middleware, and each registers, beats
and sweeps for itself (one :class:`~jobledger.runtime.worker.WorkerRuntime` per installed
middleware and process). Its threads claim as its instance. A process that dies stops beating
(the CLI then stops its siblings too), and any live instance recovers its jobs after the TTL.

Dramatiq has no hook for a message its consumer hands to the worker threads, so the worker's
work queue is one that says so (:class:`ReceivingQueue`, put in place before any thread
starts): each message is reported as it arrives, before a thread can take it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from queue import PriorityQueue
from typing import Any

from dramatiq import Worker

from jobledger.runtime.worker import WorkerRuntime

log = logging.getLogger(__name__)


def message_of(item: Any) -> Any:
    """The message of a work or delay queue item: ``(priority, message)`` up to Dramatiq
    1.17, a ``_WorkQueueItem`` after."""
    return getattr(item, "message", None) or item[1]


class ReceivingQueue(PriorityQueue[Any]):
    """A worker's work queue that tells ``on_put`` of each message before it is put in, so
    whatever ``on_put`` records precedes the message's claim."""

    def __init__(self, on_put: Callable[[Any], None]) -> None:
        super().__init__()
        self.on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        try:
            self.on_put(message_of(item))
        except Exception:  # never at the cost of the message: it still runs, and is claimed
            log.exception("jobledger could not note a received message")
        super().put(item, block, timeout)


def held_by(worker: Worker | None, running: Iterable[str]) -> set[str]:
    """Ids of the messages this process holds now: ``running``, waiting in its work queue, or
    delayed in its consumers' memory."""
    held = set(running)
    if worker is None:
        return held
    items: list[Any] = list(worker.work_queue.queue)
    for consumer in list(worker.consumers.values()):
        items.extend(consumer.delay_queue.queue)
    held.update(str(message_of(item).message_id) for item in items)
    return held


class Consumption:
    """Invariant 9 for a Dramatiq worker process: its consumers pause while its heartbeat has
    failed for longer than the TTL (messages wait in the broker), and fetch again after a beat
    succeeds. A worker that boots while the ledger is out of reach starts paused."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.worker: Worker | None = None
        self._consuming = True  # what the consumers were last told
        self._lock = threading.Lock()  # the heartbeat's thread and the booting one

    def attach(self, worker: Worker) -> None:
        """The worker booted (its consumers exist): follow the ledger's health from now on."""
        self.worker = worker
        self.want(self.runtime.health.can_claim)

    def want(self, can_claim: bool) -> None:
        """After each beat: consume if the instance ``can_claim``."""
        with self._lock:
            worker = self.worker
            if worker is None or can_claim == self._consuming:
                return
            self._consuming = can_claim
            for consumer in list(worker.consumers.values()):
                consumer.resume() if can_claim else consumer.pause()
        instance = self.runtime.instance_id
        if can_claim:
            self.runtime.count("consuming_resumed")
            log.warning("instance %s reaches the ledger again: consuming", instance)
        else:
            self.runtime.count("consuming_stopped")
            log.error(
                "instance %s cannot reach the ledger (no beat for over its TTL): it stops "
                "consuming until it does; messages wait in the broker",
                instance,
            )
