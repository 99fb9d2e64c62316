"""The relay: publishes staged jobs the fast path missed, and survives a broker outage.

A job stays ``staged`` after its transaction committed when the process crashed before its
fast path published it, or when the broker was down. The relay takes such jobs once they are
older than a short grace (the fast path's time to do its job), in batches leased with
:meth:`~jobledger.stores.base.Store.staged_batch` (taken with ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL and MariaDB/MySQL, by compare-and-set on SQLite), publishes each batch (one broker
connection per batch) and marks what the broker took ``queued``. Any number of relays run side
by side without publishing a job twice; a relay killed mid-batch leaves its jobs staged, so
once its lease ends another publishes them again and the claim guard keeps the body from
running twice (invariant 1).

With the broker down the relay keeps its place: staging goes on, the relay backs off
exponentially with jitter (so a fleet of workers does not hammer a broker that comes back),
logs the backlog, and resumes by itself. It runs as a thread in workers, in the supervisor and
as ``jobledger relay``. Nothing here imports a queue system or a database driver.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from jobledger.config import Settings
from jobledger.errors import PublishError
from jobledger.integrations.base import PublishBatch, Published, registry
from jobledger.model import JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.runtime.service import Loop
from jobledger.stores.base import DEFAULT_LEASE, Store

log = logging.getLogger(__name__)

#: Jobs published between two looks at the clock (a batch stops at half its lease).
PUBLISH_SLICE = 100
#: Seconds between backlog warnings while the broker stays down.
BACKLOG_LOG_INTERVAL = 30.0


@dataclass
class RelayReport:
    """What one :meth:`Relay.run_once` did: jobs published, batches taken, jobs refused, and
    the publish error that stopped it (None: the backlog it could see is drained)."""

    published: int = 0
    batches: int = 0
    error: PublishError | None = None
    #: jobs whose message the queue system refused itself: now ``failed``, for a person
    refused: int = 0


class Relay:
    """Publishes staged jobs older than ``grace`` seconds, ``batch_size`` at a time.

    ``systems`` limits it to jobs of those queue systems (None: all of them, which needs an
    integration for each): a Celery worker's relay publishes Celery jobs only.
    """

    def __init__(
        self,
        store: Store,
        *,
        publish: PublishBatch = registry.publish_many,
        grace: float,
        batch_size: int,
        systems: Collection[str] | None = None,
        lease: float = DEFAULT_LEASE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.store = store
        self.publish = publish
        self.grace = grace
        self.batch_size = batch_size
        self.lease = lease
        self.systems = None if systems is None else frozenset(systems)

    @classmethod
    def from_settings(
        cls,
        store: Store,
        settings: Settings,
        *,
        publish: PublishBatch = registry.publish_many,
        systems: Collection[str] | None = None,
    ) -> Relay:
        return cls(
            store,
            publish=publish,
            grace=settings.relay_grace,
            batch_size=settings.relay_batch_size,
            systems=systems,
            lease=settings.relay_lease,
        )

    def run_once(self, *, max_batches: int | None = None) -> RelayReport:
        """Publish batches until none is left that this relay may take, the broker refuses
        one, or ``max_batches`` ran. A ledger error propagates (nothing was lost: the batch's
        moves were undone and its jobs stay staged)."""
        report = RelayReport()
        while max_batches is None or report.batches < max_batches:
            with self.store.staged_batch(
                limit=self.batch_size,
                older_than=self.grace,
                systems=self.systems,
                lease=self.lease,
            ) as batch:
                if not batch.records:
                    break
                done = self._publish(batch.records)
                batch.mark_queued(done.ids)
                batch.mark_refused(done.refused)
            report.batches += 1
            report.published += len(done.ids)
            report.refused += len(done.refused)
            for job_id, why in done.refused.items():
                log.error("job %s failed: the queue system refused its message (%s)", job_id, why)
            if done.error is not None:
                report.error = done.error
                break
            cut_short = len(done.ids) + len(done.refused) < len(batch.records)
            if len(batch.records) < self.batch_size and not cut_short:
                break  # the backlog is empty (a batch cut short at half its lease is not)
        return report

    def _publish(self, records: list[JobRecord]) -> Published:
        """Publish a leased batch in slices, and stop (leaving the rest to the next batch) once
        half the lease is gone: past it another relay may take the same jobs."""
        deadline = self.clock() + self.lease / 2
        done = Published()
        for start in range(0, len(records), PUBLISH_SLICE):
            if start and self.clock() > deadline:
                log.warning(
                    "relay: publishing is slow, %d jobs left to the next batch",
                    len(records) - start,
                )
                break
            if done.add(self.publish(records[start : start + PUBLISH_SLICE])):
                break
        return done

    def backlog(self) -> int:
        """How many jobs are staged (all systems), for the log while the broker is down."""
        return self.store.count(JobQuery(states=frozenset({JobState.STAGED})))


class RelayLoop(Loop):
    """:class:`Relay` every ``interval`` seconds; after a refused publish, exponential backoff
    from ``interval`` up to ``max_backoff`` with full jitter, until a publish goes through."""

    def __init__(
        self,
        relay: Relay,
        *,
        interval: float,
        max_backoff: float,
        enabled: Callable[[], bool] = lambda: True,
        on_error: Callable[[], None] = lambda: None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            "relay", interval, self.step, first_delay=min(1.0, interval), on_error=on_error
        )
        self.relay = relay
        self.max_backoff = max_backoff
        self.enabled = enabled
        self.rng = rng
        self.clock = clock
        self.failures = 0
        self._logged_at: float | None = None

    def step(self) -> RelayReport | None:
        if not self.enabled():
            return None
        report = self.relay.run_once()
        if report.error is None:
            if self.failures:
                log.warning("relay resumed: the broker takes jobs again")
            self.failures = 0
            self._logged_at = None
            return report
        self.failures += 1
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= BACKLOG_LOG_INTERVAL:
            self._logged_at = now
            log.error(
                "relay: the broker refused a job (%s); %d staged jobs wait, retrying in up to "
                "%.1fs; staging goes on",
                report.error,
                self.relay.backlog(),
                self.backoff_limit(),
            )
        return report

    def backoff_limit(self) -> float:
        """The longest wait before the next try after ``failures`` refusals in a row."""
        if not self.failures:
            return self.interval
        return float(min(self.max_backoff, self.interval * 2 ** min(self.failures, 30)))

    def delay(self) -> float:
        if not self.failures:
            return self.interval
        return max(self.interval, self.backoff_limit() * self.rng())
