"""The Redis part of ``bench/ledger.py``: its lifecycle baseline, and a big Redis ledger.

Part 1 (``--databases redis``): the baseline is what a hand-rolled tracking hash costs in the
same Redis: ``HSET`` of the job's fields, then two ``HSET`` of its state (three round trips,
as the SQL baseline's INSERT and two UPDATEs), against jobledger's ``create`` / ``claim`` /
``succeed`` (a Lua compare-and-set each, with their indexes).

Part 3 (``--redis-big N``): ``N`` jobs loaded with :meth:`RedisStore.create_many`, the same
mix as the PostgreSQL ledger of part 2 (six task names over five queues, kwargs
``{"model_id": N, "user": "uM"}``, 95% finished), then ``Manager.uncompleted_jobs(match)``
(what ``jobledger uncompleted --match`` runs) timed over ``--repeat`` runs: p50, p95, and the
client's peak Python memory during one run (``tracemalloc``) beside the process's peak RSS.
Each ledger lives under a prefix of its own and is deleted at the end.
"""

from __future__ import annotations

import random
import statistics
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from jobledger import JobQuery, JobRecord, JobState
from jobledger.manager import Manager
from jobledger.model import UNCOMPLETED_STATES
from jobledger.stores import open_store
from jobledger.stores.redis import RedisStore

#: The state mix of part 2's PostgreSQL ledger (cumulative shares).
MIX = (
    (0.010, JobState.STAGED),
    (0.030, JobState.QUEUED),
    (0.045, JobState.STARTED),
    (0.050, JobState.RETRYING),
    (0.080, JobState.FAILED),
    (0.085, JobState.DEAD),
    (0.090, JobState.CANCELLED),
    (1.000, JobState.SUCCEEDED),
)
NAMES = ("reports.build", "mail.send", "billing.charge", "images.resize", "search.reindex")
QUEUES = ("reports", "mail", "billing", "default", "low")


def open_ledger(server_url: str) -> RedisStore:
    """A migrated ledger under a fresh prefix on the Redis at ``server_url``."""
    separator = "&" if "?" in server_url else "?"
    store = open_store(f"{server_url}{separator}prefix=jl-bench-{uuid.uuid4().hex[:8]}")
    assert isinstance(store, RedisStore)
    store.migrate()
    return store


def drop(store: RedisStore) -> None:
    """Delete the ledger's keys and close the store."""
    batch: list[str] = []
    for key in store.client.scan_iter(store.keys.pattern, count=5000):
        batch.append(key)
        if len(batch) == 5000:
            store.client.unlink(*batch)
            batch = []
    if batch:
        store.client.unlink(*batch)
    store.close()


def baseline_lifecycle(store: RedisStore, ids: Sequence[str]) -> Callable[[int], None]:
    """Job ``i``'s life on a hand-rolled hash: HSET the job, then HSET its state twice."""
    client = store.client
    prefix = f"{store.keys.prefix}:baseline:"

    def one(i: int) -> None:
        key = prefix + ids[i]
        client.hset(
            key,
            mapping={
                "name": "reports.build",
                "queue": "reports",
                "kwargs": f'{{"model_id": {i}, "user": "u{i % 97}"}}',
                "state": "queued",
                "created_at": time.time(),
            },
        )
        client.hset(key, mapping={"state": "started", "owner": "w", "started_at": time.time()})
        client.hset(key, mapping={"state": "succeeded", "finished_at": time.time()})

    return one


def big_records(rows: int, seed: int = 42) -> Iterator[JobRecord]:
    """``rows`` jobs of part 2's mix, created over the last 30 days."""
    pick = random.Random(seed)
    now = time.time()
    for g in range(1, rows + 1):
        r = pick.random()
        state = next(s for share, s in MIX if r < share)
        t0 = now - 2_592_000 * pick.random()
        started = state not in (JobState.STAGED, JobState.QUEUED, JobState.CANCELLED)
        finished = state.is_final
        yield JobRecord(
            id=str(uuid.UUID(int=pick.getrandbits(128))),
            system="celery",
            name=NAMES[g % len(NAMES)],
            queue=QUEUES[g % len(QUEUES)],
            args=[g % 1000],
            kwargs={"model_id": g % 100_000, "user": f"u{g % 5003}"},
            options={"retries": 3},
            state=state,
            owner=f"worker-{g % 16}:bench" if started else None,
            attempts=1 if started else 0,
            created_at=t0,  # type: ignore[arg-type]
            staged_at=t0 if state is JobState.STAGED else None,  # type: ignore[arg-type]
            queued_at=None if state is JobState.STAGED else t0 + 0.01,  # type: ignore[arg-type]
            started_at=t0 + 1 if started else None,  # type: ignore[arg-type]
            finished_at=t0 + 60 if finished else None,  # type: ignore[arg-type]
            updated_at=t0 + 60 if finished else t0 + 1,  # type: ignore[arg-type]
        )


@dataclass
class RedisBig:
    """Part 3 as a whole: times in ms."""

    rows: int
    repeat: int
    match: str
    load_s: float
    used_memory_mb: float
    found: int
    p50_ms: float
    p95_ms: float
    client_peak_mb: float
    process_peak_rss_mb: float
    other: dict[str, float] = field(default_factory=dict)


def measure_big(server_url: str, rows: int, repeat: int, match: str) -> RedisBig:
    import resource

    store = open_ledger(server_url)
    try:
        start = time.perf_counter()
        loaded = store.create_many(big_records(rows))
        load_s = time.perf_counter() - start
        assert loaded == rows, f"{loaded} of {rows} created"
        used = float(store.client.info("memory")["used_memory"]) / 2**20
        manager = Manager(store)

        def search() -> int:
            return sum(1 for _ in manager.uncompleted_jobs(match))

        found = search()  # once untimed (scripts loaded, connections open)
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            search()
            samples.append((time.perf_counter() - start) * 1000)
        tracemalloc.start()
        search()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        samples.sort()
        other: dict[str, float] = {}
        for label, call in (
            ("count(uncompleted)", lambda: store.count(JobQuery(states=UNCOMPLETED_STATES))),
            ("queue_stats()", lambda: len(store.queue_stats())),
            ("first page, 500 newest", lambda: len(store.query(JobQuery(), limit=500).items)),
        ):
            call()
            start = time.perf_counter()
            call()
            other[label] = (time.perf_counter() - start) * 1000
        return RedisBig(
            rows=rows,
            repeat=repeat,
            match=match,
            load_s=load_s,
            used_memory_mb=used,
            found=found,
            p50_ms=statistics.median(samples),
            p95_ms=samples[min(len(samples) - 1, max(0, round(0.95 * len(samples)) - 1))],
            client_peak_mb=peak / 2**20,
            process_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
            other=other,
        )
    finally:
        drop(store)


def render_big(big: RedisBig) -> list[str]:
    return [
        "",
        f"Redis ledger of {big.rows:,} jobs: loaded in {big.load_s:.1f} s (create_many), "
        f"{big.used_memory_mb:,.0f} MiB used by the server.",
        f"uncompleted --match {big.match!r} ({big.found} jobs), {big.repeat} runs: "
        f"p50 {big.p50_ms:,.1f} ms, p95 {big.p95_ms:,.1f} ms; client peak Python memory "
        f"during one run {big.client_peak_mb:.2f} MiB (process peak RSS "
        f"{big.process_peak_rss_mb:.0f} MiB, the load included)",
        *(f"{label}: {ms:,.1f} ms" for label, ms in big.other.items()),
    ]
