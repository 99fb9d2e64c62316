"""``/metrics`` in the Prometheus text format.

Ledger-wide figures (jobs per state and queue, lag, dead jobs, instances alive, outbox backlog)
are read from the store at scrape time, so every supervisor replica reports the same truth and
nothing is lost on restart. Counters (ledger errors, duplicates skipped, recoveries) count what
this process saw. Each app has its own registry, so several apps in one process (tests) do not
collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jobledger.errors import StoreError
from jobledger.manager import workers
from jobledger.model import Instance, JobState, OutboxStats
from jobledger.stores.base import Store

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The registry of one supervisor and the counters its parts increment."""

    def __init__(self, store: Store, ttl: float) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ledger_errors = Counter(
            "jobledger_ledger_errors",
            "Ledger operations of this supervisor that failed (database down or refusing).",
            registry=self.registry,
        )
        self.duplicates_skipped = Counter(
            "jobledger_duplicates_skipped",
            "Job events reported to this supervisor that changed nothing (duplicates).",
            ["event"],
            registry=self.registry,
        )
        self.recoveries = Counter(
            "jobledger_recoveries",
            "Orphaned jobs this supervisor's recovery sweep re-enqueued or declared dead.",
            registry=self.registry,
        )
        self.pruned = Counter(
            "jobledger_pruned_jobs",
            "Finished jobs this supervisor's prune loop deleted.",
            registry=self.registry,
        )
        self.recovered = 0
        self.registry.register(LedgerCollector(store, ttl, self))

    def count_recoveries(self, moved: int) -> None:
        self.recovered += moved
        self.recoveries.inc(moved)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LedgerCollector(Collector):
    """Reads the ledger on each scrape; a store failure yields ``jobledger_ledger_up 0``."""

    def __init__(self, store: Store, ttl: float, metrics: Metrics) -> None:
        self.store = store
        self.ttl = ttl
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # figures vary by scrape; nothing to pre-declare

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("jobledger_ledger_up", "1 if the ledger answered this scrape.")
        try:
            stats = self.store.queue_stats()
            instances = workers(self.store, self.ttl)
        except StoreError as exc:
            log.warning("metrics scrape: %s", exc)
            self.metrics.ledger_errors.inc()
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily(
            "jobledger_jobs", "Jobs in the ledger by state and queue.", labels=["state", "queue"]
        )
        lag = GaugeMetricFamily(
            "jobledger_oldest_pending_seconds",
            "Age of the oldest queued job per queue (its lag).",
            labels=["queue"],
        )
        dead = GaugeMetricFamily("jobledger_dead_jobs", "Jobs declared dead (poison pills).")
        backlog = GaugeMetricFamily(
            "jobledger_outbox_backlog", "Jobs staged in the outbox, not yet published."
        )
        oldest = GaugeMetricFamily(
            "jobledger_outbox_oldest_seconds",
            "Age of the oldest staged job not yet published (0 when none waits).",
        )
        dead_total = 0
        for queue in stats:
            for state in JobState:
                jobs.add_metric([state.value, queue.queue], queue.counts.get(state, 0))
            if queue.oldest_queued_age is not None:
                lag.add_metric([queue.queue], queue.oldest_queued_age)
            dead_total += queue.counts.get(JobState.DEAD, 0)
        dead.add_metric([], dead_total)
        outbox = OutboxStats.of(stats)
        backlog.add_metric([], outbox.backlog)
        oldest.add_metric([], outbox.oldest_staged_age or 0.0)
        alive = GaugeMetricFamily("jobledger_instances_alive", "Worker instances beating in time.")
        alive.add_metric([], sum(1 for i in instances if i.alive))
        known = GaugeMetricFamily("jobledger_instances", "Registered worker instances.")
        known.add_metric([], len(instances))
        yield from (jobs, lag, dead, backlog, oldest, alive, known, *worker_figures(instances))


def worker_figures(instances: list[Instance]) -> tuple[Metric, Metric]:
    """What each worker reported at its last beat: its event counters (cumulative since it
    started, so a restarted worker is a new series) and how many jobs it holds."""
    events = CounterMetricFamily(
        "jobledger_worker_events",
        "Events a worker counted since it started (duplicates skipped, claims deferred...), "
        "as of its last heartbeat.",
        labels=["instance", "event"],
    )
    holding = GaugeMetricFamily(
        "jobledger_worker_holding",
        "Tracked jobs a worker had received and not finished at its last heartbeat.",
        labels=["instance"],
    )
    for instance in instances:
        for event, count in sorted(instance.stats.items()):
            events.add_metric([instance.id, event], count)
        holding.add_metric([instance.id], len(instance.holding))
    return events, holding
