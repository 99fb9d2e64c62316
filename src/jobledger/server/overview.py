"""The figures of the dashboard's overview, read through the Store seam only.

Jobs finished per interval are counted with ``newer_than`` thresholds (for a finished job its
last transition is its finish), so the chart needs no store method of its own: N buckets cost
N counts per series, each an index range over the window only, however big the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobledger.manager import workers
from jobledger.model import FINAL_STATES, JobState, QueueStats
from jobledger.query import JobQuery
from jobledger.stores.base import Store

FAILED = frozenset({JobState.FAILED, JobState.DEAD})
SUCCEEDED = frozenset({JobState.SUCCEEDED})


@dataclass(frozen=True)
class Bucket:
    """Jobs finished in one interval; ``ends_ago`` seconds before now is its end."""

    ends_ago: float
    succeeded: int
    failed: int


@dataclass
class Overview:
    totals: dict[JobState, int]
    queues: list[QueueStats]
    buckets: list[Bucket]
    instances_alive: int
    instances_dead: int
    recovered_here: int
    #: Jobs in the ledger recovered at least once (their worker died under them).
    recovered_jobs: int

    @property
    def dead(self) -> int:
        return self.totals.get(JobState.DEAD, 0)

    @property
    def backlog(self) -> int:
        return self.totals.get(JobState.STAGED, 0)

    @property
    def finished_last_hour(self) -> int:
        return sum(b.succeeded for b in self.buckets)

    @property
    def failed_last_hour(self) -> int:
        return sum(b.failed for b in self.buckets)

    @property
    def busiest(self) -> int:
        return max([1, *(max(b.succeeded, b.failed) for b in self.buckets)])

    @property
    def axis_top(self) -> int:
        """The top of the chart's y axis: the busiest bucket rounded up to 1, 2 or 5 times a
        power of ten, so its ticks are round numbers of jobs."""
        step = 1
        while True:
            for m in (1, 2, 5):
                if m * step >= self.busiest:
                    return m * step
            step *= 10

    @property
    def axis_ticks(self) -> list[int]:
        """0, the middle (when it is a whole number of jobs) and the top."""
        top = self.axis_top
        return [0, top // 2, top] if top % 2 == 0 else [0, top]

    @property
    def bucket_minutes(self) -> int:
        step = self.buckets[0].ends_ago - self.buckets[1].ends_ago if len(self.buckets) > 1 else 300
        return round(step / 60)


def finished_buckets(store: Store, window: float = 3600.0, count: int = 12) -> list[Bucket]:
    """Succeeded and failed/dead jobs per ``window / count`` seconds, oldest first."""
    step = window / count

    def series(states: frozenset[JobState]) -> list[int]:
        # within[k]: jobs whose finish is less than k steps ago
        within = [0] + [
            store.count(JobQuery(states=states, newer_than=k * step)) for k in range(1, count + 1)
        ]
        return [within[k + 1] - within[k] for k in range(count)]

    ok, bad = series(SUCCEEDED), series(FAILED & FINAL_STATES)
    return [Bucket(k * step, ok[k], bad[k]) for k in reversed(range(count))]


def overview(store: Store, ttl: float, recovered_here: int) -> Overview:
    queues = store.queue_stats()
    totals = {s: sum(q.counts.get(s, 0) for q in queues) for s in JobState}
    instances = workers(store, ttl)
    alive = sum(1 for i in instances if i.alive)
    return Overview(
        totals=totals,
        queues=queues,
        buckets=finished_buckets(store),
        instances_alive=alive,
        instances_dead=len(instances) - alive,
        recovered_here=recovered_here,
        recovered_jobs=store.count(JobQuery(recovered=True)),
    )
