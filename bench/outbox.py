"""Benchmark of issue 4: what staging a job in your transaction costs, and how fast the relay
publishes a backlog. PostgreSQL ledger (in the application's own database), Redis broker.

Part 1, staging. ``--jobs`` transactions per round, each ``with Session(engine) as s,
s.begin():`` adding one business row (an ``Order``, through the ORM) and one job, five ways:

- *order only*: no job at all, the yardstick for "milliseconds added per transaction";
- *order + outbox INSERT*: a plain INSERT into a hand-rolled outbox table (id, name, args and
  kwargs as JSON, queue, state, created_at; an index on (state, created_at) for its poller);
- *order + staged job, fast path off*: what ``charge.apply_staged(args, kwargs, using=s)``
  does, through an :class:`~jobledger.outbox.Outbox` whose fast path is switched off (its
  ``flush`` does nothing), so only the staging write is measured: building the record, the
  INSERT into ``jobledger_jobs`` (five indexes and the pg_trgm ones) in your transaction, the
  after-commit bookkeeping. It is what each transaction costs while the broker is down;
- *order + outbox INSERT, then .delay()*: the same hand-rolled row, commit, then plain Celery's
  ``.delay()`` (an untracked task on a Celery app without jobledger; jobledger's signal
  receivers are disconnected meanwhile). The outbox row is not marked sent afterwards, which a
  real hand-rolled outbox would also have to do: the baseline is flattered;
- *order + staged job, fast path on*: ``charge.apply_staged(args, kwargs, using=s)`` as shipped:
  stage, commit, and before the ``with`` block is left the fast path reads the job back
  (``SELECT … FOR UPDATE SKIP LOCKED`` on the ledger's own connection), publishes it to Redis
  and marks it ``queued``.

Ratios are against the hand-rolled side doing the same amount of work: fast path off against
the outbox INSERT, fast path on against INSERT + ``.delay()``.

Part 2, the relay. ``--relay-jobs`` staged jobs committed and never published (a broker
outage's backlog; written in bulk, the very rows staging writes), then a ``Relay`` (grace 0,
each of ``--batch-sizes``) publishes them all to Redis through the Celery integration's
``publish_many``, one ``run_once(max_batches=1)`` at a time: a batch held with ``FOR UPDATE
SKIP LOCKED``, published over one broker connection, marked ``queued``, committed. Against it,
plain Celery: as many ``task.delay()`` from one process (untracked task, plain app, no
jobledger), in turns with the relay's batches. Ratio = relay jobs/s / ``.delay()`` jobs/s.
Then ``--parallel`` relays in as many processes (started and warmed up before the clock
starts) drain one backlog side by side; that ratio is against the round's plain rate.

The sides take turns at a fine grain (staging: every ``--turn`` transactions; relay: every
batch), so a burst of load from elsewhere on the machine weighs on both sides of a ratio
alike; each round gives a rate and a ratio per side, and the medians of ``--rounds`` rounds
are printed. Every side is warmed up first, PostgreSQL's statistics are refreshed (``ANALYZE``,
as autovacuum would) before each round and after each backlog is staged, and every result is
checked: every job in Redis, every relayed job ``queued``, nothing left to the relay by the
fast path.

    python bench/outbox.py                      # everything (about two minutes)
    python bench/outbox.py --jobs 300 --relay-jobs 2000 --rounds 1   # a quick look

The PostgreSQL URL only says where the server is: the bench drops and recreates its own
database there (``--database``). On Redis it uses queues named ``jlbench-outbox-<run>-…`` and
deletes every key with that name when it is done. The file is named after what it measures, so
it takes its own directory off the front of ``sys.path`` before importing Celery.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.append(str(HERE))  # after site-packages: ``celery`` is Celery, ``ledger`` is ours

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Collection, Iterator, Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from queue import Empty  # noqa: E402
from typing import Any  # noqa: E402

import celery  # noqa: E402
import kombu  # noqa: E402
import redis  # noqa: E402
import sqlalchemy  # noqa: E402
from celery import Celery, Task  # noqa: E402
from sqlalchemy import (  # noqa: E402
    JSON,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    String,
    Table,
    create_engine,
    func,
    insert,
)
from sqlalchemy.engine import URL  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Session  # noqa: E402

import jobledger  # noqa: E402
from jobledger import JobQuery, JobState, Settings  # noqa: E402
from jobledger.integrations.base import Published, registry  # noqa: E402
from jobledger.integrations.celery import CeleryIntegration, install  # noqa: E402
from jobledger.integrations.celery_staging import staged_record  # noqa: E402
from jobledger.outbox import Outbox  # noqa: E402
from jobledger.relay import Relay  # noqa: E402
from jobledger.stores.rows import creation_row  # noqa: E402
from jobledger.stores.schema import jobs  # noqa: E402
from jobledger.stores.sql import SQLStore  # noqa: E402
from ledger import note, recreate_database, server_version, table  # noqa: E402

TASK = "bench.charge"
PLAIN_TASK = "bench.plain_charge"
WARM_TASK = "bench.warm"


# -- the application's side: its tables, its apps ---------------------------------------------
class Base(DeclarativeBase):
    pass


class Order(Base):
    """The business row each transaction writes."""

    __tablename__ = "bench_orders"
    # Columns without annotations: the parallel relays' processes import this file as
    # ``__mp_main__``, where the ORM cannot resolve string annotations.
    id = Column(String(36), primary_key=True)
    customer = Column(String(100), nullable=False)
    total_cents = Column(Integer, nullable=False)
    created_at = Column(DateTime(timezone=True), nullable=False, server_default=func.now())


#: The baseline: an outbox table as an application would write it by hand.
hand_outbox = Table(
    "bench_outbox",
    Base.metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("args", JSON, nullable=False),
    Column("kwargs", JSON, nullable=False),
    Column("queue", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_bench_outbox_state", "state", "created_at"),
)


def tracked_app(redis_url: str, database_url: str, queue: str) -> tuple[Celery, Task]:
    """The application's Celery app with jobledger installed, and its tracked task."""
    app = Celery("jlbench_outbox", broker=redis_url, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True)

    @app.task(name=TASK, tracked=True, shared=False)
    def charge(order_id: str, cents: int) -> None: ...

    @app.task(name=WARM_TASK, shared=False)
    def warm() -> None: ...

    install(app, settings=Settings(database_url=database_url, relay=False))
    # jobledger adds .stage/.apply_staged to the tasks when the app finalizes; a task object
    # taken before that (the lazy proxy evaluated early) lacks them
    app.finalize()
    return app, charge


def plain_app(redis_url: str, queue: str) -> tuple[Celery, Task]:
    """Celery as it is, for the baselines: an untracked task."""
    app = Celery("jlbench_plain", broker=redis_url, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True)

    @app.task(name=PLAIN_TASK, shared=False)
    def plain_charge(order_id: str, cents: int) -> None: ...

    app.finalize()
    return app, plain_charge


class NoFastPath(Outbox):
    """An outbox that stages and never publishes: every job stays ``staged`` for the relay."""

    def flush(self, job_ids: Collection[str]) -> Published:
        return Published()


@contextlib.contextmanager
def without_jobledger(integration: CeleryIntegration) -> Iterator[None]:
    """Plain Celery in this process for a while: jobledger's signal receivers disconnected."""
    integration.disconnect()
    try:
        yield
    finally:
        integration.connect()
        registry.register(integration)


@dataclass
class Env:
    """What every side works with."""

    args: argparse.Namespace
    url: str
    store: SQLStore
    r: redis.Redis
    run: str
    app: Celery
    charge: Task
    integration: CeleryIntegration
    plain: Celery
    plain_charge: Task
    plain_engine: Engine
    jl_engine: Engine

    @property
    def queue(self) -> str:
        return f"jlbench-outbox-{self.run}-tracked"

    @property
    def plain_queue(self) -> str:
        return f"jlbench-outbox-{self.run}-plain"


def new_order(i: int) -> Order:
    return Order(id=str(uuid.uuid4()), customer=f"customer-{i % 997}", total_cents=100 + i % 9000)


def analyze(env: Env) -> None:
    """Fresh planner statistics, as autovacuum keeps them on a default server (this one may run
    without it): with a freshly created table's statistics PostgreSQL may look a job up by id
    through the staged part of ``(state, created_at, id)`` and slow down as the backlog grows."""
    with env.store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE jobledger_jobs, bench_orders, bench_outbox")


def check_queue(env: Env, queue: str, expected: int, what: str) -> None:
    """Every job reached Redis; then the queue goes."""
    found = int(env.r.llen(queue))
    env.r.delete(queue)
    if found != expected:
        raise SystemExit(f"{what}: {found} messages in Redis, expected {expected}")


# -- part 1: staging ---------------------------------------------------------------------------
@dataclass
class StagingResult:
    side: str
    transactions: int
    rounds: int
    tx_per_s: float
    ms_per_tx: float
    cpu_ms_per_tx: float
    baseline: str | None
    ratio: float | None


def staging_sides(env: Env) -> dict[str, tuple[bool, Callable[[int], None]]]:
    """Each side: (is it jobledger, one transaction)."""
    quiet = NoFastPath(env.store)

    def order_only(i: int) -> None:
        with Session(env.plain_engine) as s, s.begin():
            s.add(new_order(i))

    def outbox_row(s: Session, order: Order) -> None:
        s.execute(
            insert(hand_outbox).values(
                id=str(uuid.uuid4()),
                name=TASK,
                args=[order.id],
                kwargs={"cents": order.total_cents},
                queue=env.queue,
                state="pending",
            )
        )

    def outbox_insert(i: int) -> None:
        with Session(env.plain_engine) as s, s.begin():
            order = new_order(i)
            s.add(order)
            outbox_row(s, order)

    def staged_off(i: int) -> None:
        with Session(env.jl_engine) as s, s.begin():
            order = new_order(i)
            s.add(order)
            record = staged_record(
                env.app, env.charge, [order.id], {"cents": order.total_cents}, {}
            )
            quiet.stage(record, using=s)

    def outbox_delay(i: int) -> None:
        with Session(env.plain_engine) as s, s.begin():
            order = new_order(i)
            s.add(order)
            outbox_row(s, order)
            order_id, cents = order.id, order.total_cents
        env.plain_charge.delay(order_id, cents=cents)

    def staged_on(i: int) -> None:
        with Session(env.jl_engine) as s, s.begin():
            order = new_order(i)
            s.add(order)
            env.charge.apply_staged([order.id], {"cents": order.total_cents}, using=s)

    return {
        "order only": (False, order_only),
        "order + outbox INSERT": (False, outbox_insert),
        "order + staged job, fast path off": (True, staged_off),
        "order + outbox INSERT, then .delay()": (False, outbox_delay),
        "order + staged job, fast path on": (True, staged_on),
    }


#: Which side each jobledger side is compared with.
STAGING_BASELINES = {
    "order + staged job, fast path off": "order + outbox INSERT",
    "order + staged job, fast path on": "order + outbox INSERT, then .delay()",
}


def run_side(
    env: Env, side: str, jl: bool, one: Callable[[int], None], count: int
) -> tuple[float, float]:
    """``count`` transactions of ``side``: wall and CPU seconds. Checks what it published."""
    outbox = env.integration.outbox
    left_before = outbox.counters["left_to_relay"]
    context = contextlib.nullcontext() if jl else without_jobledger(env.integration)
    with context:
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(count):
            one(i)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if side.endswith("fast path on"):
        if outbox.counters["left_to_relay"] != left_before:
            raise SystemExit(f"{side}: the fast path left jobs to the relay")
        check_queue(env, env.queue, count, side)
    elif side.endswith(".delay()"):
        check_queue(env, env.plain_queue, count, side)
    return elapsed, cpu


def turns(total: int, size: int) -> list[int]:
    """``total`` split into turns of ``size`` (the last one shorter)."""
    return [min(size, total - start) for start in range(0, total, size)]


def measure_staging(env: Env) -> list[StagingResult]:
    """Each round, the sides take turns every ``--turn`` transactions, so a burst of load from
    elsewhere on the machine weighs on all of them alike; rates and ratios are per round, then
    the median of the rounds."""
    args = env.args
    sides = staging_sides(env)
    walls: dict[str, list[float]] = {side: [] for side in sides}
    cpus: dict[str, list[float]] = {side: [] for side in sides}
    note(
        f"staging: warming up, then {args.rounds} round(s) of {args.jobs:,} transactions a "
        f"side, taking turns every {args.turn}"
    )
    for side, (jl, one) in sides.items():
        run_side(env, side, jl, one, 50)
    for round_ in range(args.rounds):
        analyze(env)
        wall = dict.fromkeys(sides, 0.0)
        cpu = dict.fromkeys(sides, 0.0)
        for size in turns(args.jobs, args.turn):
            for side, (jl, one) in sides.items():
                elapsed, used = run_side(env, side, jl, one, size)
                wall[side] += elapsed
                cpu[side] += used
        for side in sides:
            walls[side].append(wall[side])
            cpus[side].append(cpu[side])
        note(
            f"  round {round_ + 1}: "
            + ", ".join(f"{side}: {args.jobs / wall[side]:,.0f} tx/s" for side in sides)
        )
    results = []
    for side in sides:
        baseline = STAGING_BASELINES.get(side)
        ratio = None
        if baseline is not None:  # the time ratio of each round, then the median
            ratio = statistics.median(
                b / s for s, b in zip(walls[side], walls[baseline], strict=True)
            )
        results.append(
            StagingResult(
                side=side,
                transactions=args.jobs,
                rounds=args.rounds,
                tx_per_s=args.jobs / statistics.median(walls[side]),
                ms_per_tx=statistics.median(walls[side]) / args.jobs * 1000,
                cpu_ms_per_tx=statistics.median(cpus[side]) / args.jobs * 1000,
                baseline=baseline,
                ratio=ratio,
            )
        )
    return results


# -- part 2: the relay -------------------------------------------------------------------------
@dataclass
class RelayResult:
    side: str
    jobs: int
    rounds: int
    jobs_per_s: float
    plain_per_s: float
    ratio: float | None


PLAIN = "plain Celery: .delay() from one process"


def stage_backlog(env: Env, count: int) -> None:
    """An empty ledger, then ``count`` committed staged jobs nobody published (a broker outage's
    backlog). Untimed setup, so the rows go in with one multi-row INSERT: each is the row
    staging writes (``staged_record`` of the task, ``creation_row`` of it), not one INSERT per
    job as staging does."""
    with env.store.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE jobledger_jobs")
        now = time.time()
        rows = [
            creation_row(staged_record(env.app, env.charge, [f"order-{i}"], {"cents": i}, {}), now)
            for i in range(count)
        ]
        conn.execute(insert(jobs), rows)
    analyze(env)


def check_relayed(env: Env, published: int, count: int, side: str) -> None:
    if published != count:
        raise SystemExit(f"{side}: published {published} of {count} staged jobs")
    queued = env.store.count(JobQuery(states=frozenset({JobState.QUEUED})))
    if queued != count:
        raise SystemExit(f"{side}: {queued} of {count} jobs queued in the ledger")
    check_queue(env, env.queue, count, side)


def plain_delays(env: Env, count: int, first: int = 0) -> float:
    """``count`` plain ``.delay()`` from this process: seconds (the messages stay in Redis)."""
    with without_jobledger(env.integration):
        start = time.perf_counter()
        for i in range(first, first + count):
            env.plain_charge.delay(f"order-{i}", cents=i)
        return time.perf_counter() - start


def one_relay(env: Env, count: int, batch_size: int) -> tuple[float, float]:
    """Stage ``count`` jobs, then one relay publishes them batch by batch
    (``run_once(max_batches=1)``), each batch taking turns with as many plain ``.delay()``:
    (relay seconds, plain seconds)."""
    stage_backlog(env, count)
    relay = Relay(
        env.store,
        publish=env.integration.publish_many,
        grace=0.0,
        batch_size=batch_size,
        systems={"celery"},
    )
    relay_s = plain_s = 0.0
    published = 0
    while True:
        start = time.perf_counter()
        report = relay.run_once(max_batches=1)
        relay_s += time.perf_counter() - start
        if report.error is not None:
            raise SystemExit(f"relay: {report.error}")
        if not report.published:
            break
        plain_s += plain_delays(env, report.published, published)
        published += report.published
    check_relayed(env, published, count, f"relay, batch {batch_size}")
    check_queue(env, env.plain_queue, count, PLAIN)
    return relay_s, plain_s


def relay_process(
    url: str, redis_url: str, queue: str, batch_size: int, ready: Any, go: Any, results: Any
) -> None:
    """One of the parallel relays: its own app, integration and store, warmed up, then one
    pass when told; reports (published, its monotonic clock at the end, error)."""
    app, _ = tracked_app(redis_url, url, queue)
    store = SQLStore(url)
    store.count(JobQuery(states=frozenset({JobState.STAGED})))
    app.send_task(WARM_TASK, queue=f"{queue}-warm")  # a broker connection in the pool
    relay = Relay(
        store,
        publish=registry.get("celery").publish_many,  # type: ignore[attr-defined]
        grace=0.0,
        batch_size=batch_size,
        systems={"celery"},
    )
    ready.put(os.getpid())
    go.wait()
    report = relay.run_once()
    results.put((report.published, time.monotonic(), str(report.error or "")))
    store.close()


def parallel_relays(env: Env, count: int, processes: int, batch_size: int) -> float:
    """``processes`` relays (spawned and warmed up before the clock starts) drain one backlog of
    ``count`` staged jobs: seconds from "go" to the last one done."""
    spawn = multiprocessing.get_context("spawn")
    ready, results, go = spawn.Queue(), spawn.Queue(), spawn.Event()
    pool = [
        spawn.Process(
            target=relay_process,
            args=(env.url, env.args.redis_url, env.queue, batch_size, ready, go, results),
        )
        for _ in range(processes)
    ]
    for proc in pool:
        proc.start()
    stage_backlog(env, count)
    waiting = len(pool)
    deadline = time.monotonic() + 120
    while waiting:
        try:
            ready.get(timeout=0.5)
            waiting -= 1
        except Empty:
            if any(proc.exitcode is not None for proc in pool) or time.monotonic() > deadline:
                for proc in pool:
                    proc.kill()
                raise SystemExit("a relay process failed to start") from None
    start = time.monotonic()
    go.set()
    done = [results.get(timeout=600) for _ in pool]
    for proc in pool:
        proc.join(30)
    errors = [error for _, _, error in done if error]
    if errors:
        raise SystemExit(f"parallel relays: {errors[0]}")
    side = f"{processes} relays, batch {batch_size}"
    check_relayed(env, sum(published for published, _, _ in done), count, side)
    return max(end for _, end, _ in done) - start


def measure_relay(env: Env) -> list[RelayResult]:
    """Each round: per batch size, one relay drains a fresh backlog batch by batch, taking
    turns with as many plain ``.delay()``; then the parallel relays drain one, compared with
    the plain rate of the same round. Rates and ratios per round, then the median."""
    args = env.args
    count = args.relay_jobs
    singles = [f"one Relay.run_once(), batch {batch}" for batch in args.batch_sizes]
    parallel = None
    if args.parallel > 1:
        parallel = f"{args.parallel} relays in parallel processes, batch {args.batch_sizes[0]}"
    rates: dict[str, list[float]] = {side: [] for side in [PLAIN, *singles]}
    beside: dict[str, list[float]] = {side: [] for side in [PLAIN, *singles]}
    ratios: dict[str, list[float]] = {side: [] for side in singles}
    if parallel:
        rates[parallel], beside[parallel], ratios[parallel] = [], [], []
    note(f"relay: {args.rounds} round(s) of {count:,} jobs a side")
    one_relay(env, 200, args.batch_sizes[0])  # warm-up
    for round_ in range(args.rounds):
        plain_rates = []
        for side, batch in zip(singles, args.batch_sizes, strict=True):
            relay_s, plain_s = one_relay(env, count, batch)
            rates[side].append(count / relay_s)
            beside[side].append(count / plain_s)
            plain_rates.append(count / plain_s)
            ratios[side].append(plain_s / relay_s)
        plain_rate = statistics.median(plain_rates)
        rates[PLAIN].append(plain_rate)
        beside[PLAIN].append(plain_rate)
        line = [f"{PLAIN}: {plain_rate:,.0f}/s"]
        line += [f"{side}: {rates[side][-1]:,.0f}/s" for side in singles]
        if parallel:
            seconds = parallel_relays(env, count, args.parallel, args.batch_sizes[0])
            rates[parallel].append(count / seconds)
            beside[parallel].append(plain_rate)
            ratios[parallel].append(count / seconds / plain_rate)
            line.append(f"{parallel}: {count / seconds:,.0f}/s")
        note(f"  round {round_ + 1}: " + ", ".join(line))
    return [
        RelayResult(
            side=side,
            jobs=count,
            rounds=args.rounds,
            jobs_per_s=statistics.median(rates[side]),
            plain_per_s=statistics.median(beside[side]),
            ratio=statistics.median(ratios[side]) if side in ratios else None,
        )
        for side in rates
    ]


# -- output ------------------------------------------------------------------------------------
def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    out = [
        f"jobledger {env['jobledger']} · Python {env['python']} · SQLAlchemy {env['sqlalchemy']}"
        f" · Celery {env['celery']} · kombu {env['kombu']} · {env['platform']}, {env['cpus']} CPUs",
        f"{env['postgresql']} · Redis {env['redis']}",
    ]
    staging = [StagingResult(**row) for row in report["staging"]]
    if staging:
        first = staging[0]
        out += [
            "",
            f"Staging: {first.transactions:,} transactions a side, median of {first.rounds} "
            "round(s); each is `with Session(engine) as s, s.begin():` adding one order (ORM) "
            "and what the side says. Ratio: jobledger / the hand-rolled side above it. "
            "CPU = this process's CPU ms per transaction.",
            table(
                ["transaction", "tx/s", "ms/tx", "CPU ms/tx", "ratio"],
                [
                    [
                        r.side,
                        f"{r.tx_per_s:,.0f}",
                        f"{r.ms_per_tx:.2f}",
                        f"{r.cpu_ms_per_tx:.2f}",
                        "" if r.ratio is None else f"{r.ratio:.2f}",
                    ]
                    for r in staging
                ],
            ),
        ]
    relay = [RelayResult(**row) for row in report["relay"]]
    if relay:
        first = relay[0]
        out += [
            "",
            f"Publishing {first.jobs:,} staged jobs to Redis, median of {first.rounds} round(s); "
            "a relay's batches take turns with as many plain .delay() calls (the .delay() "
            "column), the parallel relays are compared with the round's .delay() rate.",
            table(
                ["publisher", "jobs/s", ".delay()/s", "ratio"],
                [
                    [
                        r.side,
                        f"{r.jobs_per_s:,.0f}",
                        "" if r.ratio is None else f"{r.plain_per_s:,.0f}",
                        "" if r.ratio is None else f"{r.ratio:.2f}",
                    ]
                    for r in relay
                ],
            ),
        ]
    return "\n".join(out)


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="jobledger's outbox benchmark: staging cost and relay throughput."
    )
    parser.add_argument(
        "--jobs", type=int, default=1000, help="staging transactions per side and round (1000)"
    )
    parser.add_argument(
        "--relay-jobs",
        type=int,
        default=10_000,
        help="jobs each relay side publishes per round (10000)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds, median (3)")
    parser.add_argument(
        "--turn", type=int, default=100, help="staging transactions per turn of a side (100)"
    )
    parser.add_argument(
        "--batch-sizes", default="500,100", help="relay batch sizes, comma-separated (500,100)"
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=4,
        help="relay processes for the parallel side (4); 0 or 1 skips it",
    )
    parser.add_argument(
        "--parts",
        default="staging,relay",
        help="which parts, comma-separated: staging, relay (both)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "JOBLEDGER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
        help="any database on the PostgreSQL server (only connected to)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="the broker (the bench's keys are deleted at the end)",
    )
    parser.add_argument(
        "--database", default="jobledger_bench_outbox", help="the database the bench (re)creates"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(args.parts) - {"staging", "relay"}:
        parser.error("--parts takes staging, relay")
    positive = (args.jobs, args.relay_jobs, args.rounds, args.turn, *args.batch_sizes)
    if min(positive) < 1 or args.parallel < 0:
        parser.error("--jobs, --relay-jobs, --rounds, --turn and --batch-sizes must be positive")
    return args


def open_env(args: argparse.Namespace, url: URL, r: redis.Redis) -> Env:
    database_url = url.render_as_string(hide_password=False)
    store = SQLStore(database_url)
    store.migrate()
    run = uuid.uuid4().hex[:8]
    app, charge = tracked_app(args.redis_url, database_url, f"jlbench-outbox-{run}-tracked")
    plain, plain_charge = plain_app(args.redis_url, f"jlbench-outbox-{run}-plain")
    integration = registry.get("celery")
    assert isinstance(integration, CeleryIntegration)
    plain_engine, jl_engine = create_engine(url), create_engine(url)
    Base.metadata.create_all(plain_engine)
    return Env(
        args=args,
        url=database_url,
        store=store,
        r=r,
        run=run,
        app=app,
        charge=charge,
        integration=integration,
        plain=plain,
        plain_charge=plain_charge,
        plain_engine=plain_engine,
        jl_engine=jl_engine,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    url = recreate_database(args.postgres_url, args.database)
    r = redis.Redis.from_url(args.redis_url)
    env = open_env(args, url, r)
    started = time.perf_counter()
    try:
        staging = measure_staging(env) if "staging" in args.parts else []
        relay = measure_relay(env) if "relay" in args.parts else []
    finally:
        for key in r.scan_iter(match=f"*jlbench-outbox-{env.run}*"):
            r.delete(key)
        env.store.close()
        env.integration.close()
        env.plain_engine.dispose()
        env.jl_engine.dispose()
    info = r.info("server")
    report: dict[str, Any] = {
        "environment": {
            "jobledger": jobledger.__version__,
            "python": platform.python_version(),
            "sqlalchemy": sqlalchemy.__version__,
            "celery": celery.__version__,
            "kombu": kombu.__version__,
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "postgresql": server_version(url),
            "redis": info.get("redis_version"),
            "seconds": round(time.perf_counter() - started, 1),
            "command": " ".join(["python", "bench/outbox.py", *sys.argv[1:]]),
        },
        "staging": [asdict(row) for row in staging],
        "relay": [asdict(row) for row in relay],
    }
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
