"""Instance registration and the heartbeat thread (invariants 4, 5 and 9).

An instance beats from a thread of its own, so a job that runs for hours never makes its
worker look dead (invariant 5). At shutdown it keeps beating until its in-flight jobs are done
and only then deletes its row (invariant 4): a draining worker is never mistaken for a dead one.
If its own beats fail for longer than the TTL, :attr:`Heartbeat.can_claim` turns False so the
worker stops taking jobs that another instance is about to be handed (invariant 9).
"""

from __future__ import annotations

import logging
import multiprocessing.sharedctypes
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from jobledger.config import Settings
from jobledger.errors import JobLedgerError
from jobledger.model import Instance, InstanceState
from jobledger.runtime.service import Service
from jobledger.stores.base import Store

log = logging.getLogger(__name__)

Clock = Callable[[], float]

#: The shortest time between two beats when deliveries wake the heartbeat early (seconds): a
#: job received this recently is not yet in the ledger's view of what a worker holds, and a
#: worker SIGKILLed then leaves it to the lost-message sweep or the broker's own redelivery.
WAKE_GAP = 0.2


def new_instance(
    settings: Settings, queues: Sequence[str] = (), *, name: str | None = None
) -> Instance:
    """This process's instance: a stable name (``name``, else the one the settings give) plus
    a fresh nonce, so a restarted worker is a new instance even under the same name (its
    predecessor's id stops beating, and its jobs become orphans)."""
    return Instance(
        name=name or settings.name_of_instance(),
        nonce=secrets.token_hex(6),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        queues=tuple(queues),
    )


class Health:
    """The time of the last successful beat, readable from forked children.

    The value lives in shared memory created before the fork, so a prefork pool child can judge
    invariant 9 without a ledger read per job. Times are ``clock()`` values (the default,
    ``time.monotonic``, is one clock for every process on the host).
    """

    def __init__(self, ttl: float, clock: Clock = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._last_ok: Any = multiprocessing.sharedctypes.RawValue("d", float("-inf"))
        self._ok_since: Any = multiprocessing.sharedctypes.RawValue("d", float("inf"))

    def mark_ok(self) -> None:
        now = self.clock()
        self._last_ok.value = now
        if self._ok_since.value == float("inf"):
            self._ok_since.value = now

    def mark_failed(self) -> None:
        """A beat failed: the ledger's continuous uptime, as seen from here, starts again."""
        self._ok_since.value = float("inf")

    @property
    def up_for(self) -> float:
        """Seconds the ledger has answered every beat of this process without a failure.
        Liveness is judged only over time the ledger was up (see
        :attr:`jobledger.recovery.Recovery.ledger_up_for`)."""
        return max(0.0, self.clock() - float(self._ok_since.value))

    @property
    def last_ok(self) -> float:
        return float(self._last_ok.value)

    @property
    def can_claim(self) -> bool:
        """False once no beat has succeeded for longer than the TTL (or none ever did)."""
        return self.clock() - self.last_ok <= self.ttl


class Heartbeat(Service):
    """Registers ``instance`` and beats every ``interval`` seconds from a daemon thread.

    ``in_flight`` says how many jobs the instance still holds; :meth:`drain` waits for it to reach
    zero, pausing with ``wait`` (default: a :class:`threading.Event`'s ``wait``). The beating
    thread pauses on the service's events, so :meth:`stop` (without deregistering) is
    immediate. Tests
    inject ``clock`` and ``wait``; nothing here sleeps a fixed time.
    """

    def __init__(
        self,
        store: Store,
        instance: Instance,
        *,
        interval: float,
        ttl: float,
        in_flight: Callable[[], int] = lambda: 0,
        clock: Clock = time.monotonic,
        health: Health | None = None,
        wait: Callable[[float], object] | None = None,
        holding: Callable[[], Sequence[tuple[str, int]]] = tuple,
        stats: Callable[[], Mapping[str, int]] = dict,
        on_beat: Callable[[bool], object] = lambda can_claim: None,
    ) -> None:
        super().__init__(f"heartbeat-{instance.nonce}")
        self.join_timeout = max(1.0, 2 * interval)
        self.store = store
        self.instance = instance
        self.interval = interval
        self.ttl = ttl
        self.in_flight = in_flight
        self.holding = holding
        self.stats = stats
        self._last_beat = float("-inf")
        self.health = health if health is not None else Health(ttl, clock)
        self.failures = 0
        #: The error of the latest beat, None once one succeeds (a worker's start reads it).
        self.last_error: Exception | None = None
        #: Called after every beat with :attr:`can_claim` (a worker stops or resumes consuming).
        self.on_beat = on_beat
        self._wait = wait if wait is not None else threading.Event().wait
        self._lock = threading.Lock()
        self._was_healthy = True

    @classmethod
    def from_settings(
        cls,
        store: Store,
        settings: Settings,
        *,
        queues: Sequence[str] = (),
        in_flight: Callable[[], int] = lambda: 0,
    ) -> Heartbeat:
        return cls(
            store,
            new_instance(settings, queues),
            interval=settings.heartbeat_interval,
            ttl=settings.ttl,
            in_flight=in_flight,
        )

    @property
    def instance_id(self) -> str:
        return self.instance.id

    @property
    def can_claim(self) -> bool:
        """Invariant 9: False while this instance's beats have failed for longer than the TTL."""
        return self.health.can_claim

    def beat(self) -> bool:
        """One heartbeat write; True if it reached the ledger. Never raises: the beating thread
        must outlive any failure, or a live worker's running jobs would be recovered elsewhere."""
        with self._lock:
            self._refresh_report()
            try:
                self.store.heartbeat(self.instance)
            except Exception as exc:
                self.failures += 1
                self.health.mark_failed()
                self.last_error = exc
                if isinstance(exc, JobLedgerError):
                    log.warning("heartbeat of %s failed: %s", self.instance_id, exc)
                else:
                    log.exception("heartbeat of %s failed unexpectedly", self.instance_id)
                self._report_health()
                return False
            self.last_error = None
            self.health.mark_ok()
            self._report_health()
            return True

    def _refresh_report(self) -> None:
        """What the beat says the worker holds and counted, read anew. A bug in the adapter's
        callbacks keeps the last report instead of failing the beat: a worker that beats is
        alive, and failing the beat would have its running jobs recovered elsewhere."""
        try:
            self.instance = replace(
                self.instance, holding=tuple(self.holding()), stats=dict(self.stats())
            )
        except Exception:
            log.exception("what instance %s holds could not be read", self.instance_id)

    def _report_health(self) -> None:
        healthy = self.health.can_claim
        try:
            self.on_beat(healthy)
        except Exception:  # the beating thread must outlive its listener's bugs
            log.exception("heartbeat listener of %s failed", self.instance_id)
        self._log_health(healthy)

    def _log_health(self, healthy: bool) -> None:
        if healthy != self._was_healthy:
            if healthy:
                log.warning("instance %s beats again: claiming jobs again", self.instance_id)
            else:
                log.error(
                    "instance %s has not reached the ledger for over %.1fs (its TTL): it takes "
                    "no new jobs until it does, and its running jobs may be recovered elsewhere",
                    self.instance_id,
                    self.ttl,
                )
            self._was_healthy = healthy

    def start(self) -> None:
        """Register (a first beat, synchronously, so no claim precedes it) and start beating."""
        if self._thread is not None:
            return
        self.beat()
        super().start()

    def serve(self) -> None:
        while True:
            self._wakeup.wait(self.interval)
            # woken early: not sooner than WAKE_GAP after the last beat, so a busy worker
            # beats a few times a second at most, however many jobs it receives
            self.stopping.wait(max(0.0, self._last_beat + WAKE_GAP - self.health.clock()))
            self._wakeup.clear()
            if self.stopping.is_set():
                return
            self._last_beat = self.health.clock()
            self.beat()

    def wake(self) -> None:
        """Beat soon, not at the next interval: what the instance holds changed (a job it
        received is then in the ledger's view before a crash could hide it). Coalesced: the
        wakes within :data:`WAKE_GAP` of a beat make one beat."""
        super().wake()

    def mark_draining(self) -> None:
        """Say ``draining`` from the next beat on (safe to call from a signal handler)."""
        self.instance = replace(self.instance, state=InstanceState.DRAINING)

    def drain(self, timeout: float | None = None) -> bool:
        """Warm shutdown: say ``draining``, keep beating until ``in_flight()`` is zero (or
        ``timeout`` passes), then stop and deregister. True if the instance deregistered;
        False if it still held jobs at the deadline (its row stays, so they become orphans
        only once it really stops beating)."""
        self.mark_draining()
        self.beat()
        deadline = None if timeout is None else self.health.clock() + timeout
        poll = min(self.interval, 0.1)
        while self.in_flight() > 0:
            if deadline is not None and self.health.clock() >= deadline:
                log.warning(
                    "instance %s stops with %d jobs in flight: they will be recovered",
                    self.instance_id,
                    self.in_flight(),
                )
                self.stop()
                return False
            self._wait(poll)  # the beating thread keeps running meanwhile
        self.stop()
        try:
            self.store.deregister(self.instance_id)
        except JobLedgerError as exc:
            log.warning("instance %s could not deregister: %s", self.instance_id, exc)
            return False
        log.info("instance %s drained and deregistered", self.instance_id)
        return True
