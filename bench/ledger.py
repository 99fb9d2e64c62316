"""Benchmark of issue 2: what the ledger costs a worker, and how it holds up at a million jobs.

Part 1, per database (SQLite, PostgreSQL, MariaDB) and thread count: full lifecycles per
second, each exactly what a publisher and a worker do (``store.create`` of a queued record,
``Lifecycle.claim``, ``Lifecycle.succeed``), threads sharing one ``SQLStore``. Beside it, in
the same database and the same run, a baseline: the same number of plain statements (one
INSERT, two UPDATEs by primary key, each its own transaction) on a hand-rolled tracking table,
so the ratio says what jobledger costs on top: its compare-and-set, its statements, its pool's
pre-ping and its indexes.

Part 2, PostgreSQL only: a ledger of ``--big`` jobs loaded server-side (INSERT … SELECT FROM
generate_series) after ``migrate()``, then the median time of what a person runs on it
(``uncompleted_jobs(match)``, a keyset page 1,000 pages deep against page 1, ``count``,
``queue_stats``), of a worker's lifecycle on it against one on an empty ledger, and the
process's peak memory while ``iter_jobs`` walks every job. ``--explain`` prints the plans.

    python bench/ledger.py                                    # everything (bench/README.md)
    python bench/ledger.py --databases sqlite --big 0 --jobs 500   # a quick look

Each server gets its own databases (``--database`` and, for part 2, ``<--database>_empty``,
dropped and recreated per run; the URLs only say where the server is); the SQLite ledger lives
in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import (
    Column,
    Double,
    Engine,
    Index,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

import jobledger
import redis_ledger
from jobledger import Claim, JobQuery, JobRecord, Lifecycle
from jobledger.manager import Manager
from jobledger.model import UNCOMPLETED_STATES
from jobledger.stores.base import Store
from jobledger.stores.sql import SQLStore, parse_url

DATABASES = ("sqlite", "postgresql", "mariadb", "redis")
OWNER = "bench-worker:0f3a9c"
#: What ``uncompleted_jobs(match)`` looks for: it is in the kwargs JSON of models 4242 and
#: 42420-42429, 110 of the million jobs, about 5 of them uncompleted.
MATCH = 'model_id": 4242'


def note(message: str) -> None:
    """Progress, on stderr so stdout stays the table (or the JSON)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (``ru_maxrss``), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# -- databases ---------------------------------------------------------------------------------
def recreate_database(server: str, name: str) -> URL:
    """Drop and create database ``name`` on the server ``server`` points at; its URL.

    The database named in ``server`` is only connected to (CREATE DATABASE needs some
    connection), never written.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise SystemExit(f"--database must be a plain identifier, not {name!r}")
    url = parse_url(server)
    force = " WITH (FORCE)" if url.get_backend_name() == "postgresql" else ""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa_exc.OperationalError as exc:
        raise SystemExit(f"cannot reach {url.render_as_string()}: {exc.orig}") from None
    finally:
        admin.dispose()
    return url.set(database=name)


def fresh_url(database: str, args: argparse.Namespace, sqlite_dir: Path) -> URL | str:
    """An empty database of kind ``database`` for this run."""
    if database == "sqlite":
        return parse_url(f"sqlite:///{sqlite_dir / 'ledger.db'}")
    if database == "redis":
        return args.redis_url  # type: ignore[no-any-return]  # a prefix of its own per ledger
    server = args.postgres_url if database == "postgresql" else args.mysql_url
    return recreate_database(server, args.database)


def server_version(url: URL | str) -> str:
    if isinstance(url, str):  # a Redis
        store = redis_ledger.open_ledger(url)
        version = store.migrate_report().split(";")[0].removeprefix("server ")
        redis_ledger.drop(store)
        return version if version.startswith("Valkey") else f"Redis {version}"
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                return "SQLite " + str(conn.exec_driver_sql("SELECT sqlite_version()").scalar())
            raw = str(conn.exec_driver_sql("SELECT version()").scalar())
    finally:
        engine.dispose()
    if "MariaDB" in raw:
        return "MariaDB " + raw.split("-")[0]
    return " ".join(raw.split()[:2])  # "PostgreSQL 15.20"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """The settings SQLStore gives its SQLite connections, so the baseline runs on equal terms."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


# -- part 1: lifecycles ------------------------------------------------------------------------
#: The baseline: a tracking table as an application would write it by hand (the seed's
#: ``trackable_jobs``): the job's id, what it is, its state and phase times, and one index for
#: "what is still pending".
baseline_metadata = MetaData()
baseline_jobs = Table(
    "bench_baseline_jobs",
    baseline_metadata,
    Column("id", String(255), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("queue", String(255), nullable=False),
    Column("kwargs", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("owner", String(255)),
    Column("created_at", Double, nullable=False),
    Column("started_at", Double),
    Column("finished_at", Double),
    Index("ix_bench_baseline_jobs_state", "state", "created_at"),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
    mysql_collate="utf8mb4_bin",
)


@dataclass
class LifecycleResult:
    """One row of part 1: a database and a thread count, medians over the rounds.

    ``*_cpu_ms`` is this process's CPU time per lifecycle (all threads): the client-side
    share of the cost (Python, SQLAlchemy, the driver), the rest is waiting on the database.
    """

    database: str
    threads: int
    jobs: int
    rounds: int
    jobledger_per_s: float
    baseline_per_s: float
    ratio: float
    jobledger_cpu_ms: float
    baseline_cpu_ms: float
    peak_rss_mb: float


def run_parallel(threads: int, count: int, work: Callable[[int], None]) -> tuple[float, float]:
    """Run ``work(i)`` for i in range(count), split over ``threads`` threads that start
    together; the wall-clock and the process CPU seconds until the last one is done."""
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker(share: range) -> None:
        barrier.wait()
        try:
            for i in share:
                work(i)
        except BaseException as exc:
            errors.append(exc)

    pool = [
        threading.Thread(target=worker, args=(range(n, count, threads),)) for n in range(threads)
    ]
    for thread in pool:
        thread.start()
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for thread in pool:
        thread.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if errors:
        raise errors[0]
    return elapsed, cpu


def ledger_lifecycle(store: Store, ids: Sequence[str]) -> Callable[[int], None]:
    """Job ``i``'s whole life through jobledger: publish records it, a worker claims and ends it."""
    worker = Lifecycle(store, owner=OWNER, ttl=30.0)

    def one(i: int) -> None:
        job_id = ids[i]
        record = JobRecord(
            id=job_id,
            system="celery",
            name="reports.build",
            queue="reports",
            args=[i],
            kwargs={"model_id": i, "user": f"u{i % 97}"},
        )
        if not store.create(record):
            raise RuntimeError(f"job {job_id} already existed")
        if worker.claim(job_id) is not Claim.CLAIMED or not worker.succeed(job_id):
            raise RuntimeError(f"job {job_id} did not go through claim and succeed")

    return one


def baseline_lifecycle(engine: Engine, ids: Sequence[str]) -> Callable[[int], None]:
    """Job ``i``'s life on the hand-rolled table: INSERT, then two UPDATEs by primary key."""
    table = baseline_jobs

    def one(i: int) -> None:
        job_id = ids[i]
        kwargs = json.dumps({"model_id": i, "user": f"u{i % 97}"})
        with engine.begin() as conn:
            conn.execute(
                insert(table).values(
                    id=job_id,
                    name="reports.build",
                    queue="reports",
                    kwargs=kwargs,
                    state="queued",
                    created_at=time.time(),
                )
            )
        with engine.begin() as conn:
            conn.execute(
                update(table)
                .where(table.c.id == job_id)
                .values(state="started", owner=OWNER, started_at=time.time())
            )
        with engine.begin() as conn:
            conn.execute(
                update(table)
                .where(table.c.id == job_id)
                .values(state="succeeded", finished_at=time.time())
            )

    return one


def engine_options(url: URL, threads: int, pre_ping: bool) -> dict[str, Any]:
    """A pool that fits the threads. The baseline gets the same, except that it keeps
    SQLAlchemy's default of no pre-ping, as a hand-rolled engine would."""
    options: dict[str, Any] = {"pool_size": threads, "max_overflow": 2}
    if not pre_ping:
        options["pool_pre_ping"] = False
    if url.get_backend_name() == "sqlite":
        options["connect_args"] = {"timeout": 30}
    return options


def measure_lifecycles(
    database: str, url: URL | str, threads: int, jobs: int, rounds: int, pre_ping: bool
) -> LifecycleResult:
    """jobledger and the baseline, warmed up, then ``rounds`` times each in turn over ``jobs``
    lifecycles (taking turns evens out a server that speeds up or slows down meanwhile)."""
    store: Store
    if database == "redis":
        store = redis_ledger.open_ledger(str(url))
        baseline_side = functools.partial(redis_ledger.baseline_lifecycle, store)
        close: Callable[[], None] = functools.partial(redis_ledger.drop, store)
    else:
        assert isinstance(url, URL)
        options = engine_options(url, threads, pre_ping)
        store = SQLStore(url, engine_options=options)
        plain = {k: v for k, v in options.items() if k != "pool_pre_ping"}
        baseline = create_engine(url, **plain)
        if database == "sqlite":
            event.listen(baseline, "connect", _sqlite_pragmas)
        store.migrate()
        baseline_metadata.create_all(baseline)
        baseline_side = functools.partial(baseline_lifecycle, baseline)

        def close() -> None:
            store.close()
            baseline.dispose()

    sides: dict[str, Callable[[Sequence[str]], Callable[[int], None]]] = {
        "baseline": baseline_side,
        "jobledger": functools.partial(ledger_lifecycle, store),
    }
    rates: dict[str, list[float]] = {side: [] for side in sides}
    cpus: dict[str, list[float]] = {side: [] for side in sides}
    try:
        warm = threads * 10
        for make in sides.values():
            run_parallel(threads, warm, make([str(uuid.uuid4()) for _ in range(warm)]))
        for _ in range(rounds):
            for side, make in sides.items():
                work = make([str(uuid.uuid4()) for _ in range(jobs)])
                elapsed, cpu = run_parallel(threads, jobs, work)
                rates[side].append(jobs / elapsed)
                cpus[side].append(cpu / jobs * 1000)
    finally:
        close()
    ledger_rate = statistics.median(rates["jobledger"])
    plain_rate = statistics.median(rates["baseline"])
    return LifecycleResult(
        database=database,
        threads=threads,
        jobs=jobs,
        rounds=rounds,
        jobledger_per_s=ledger_rate,
        baseline_per_s=plain_rate,
        ratio=ledger_rate / plain_rate,
        jobledger_cpu_ms=statistics.median(cpus["jobledger"]),
        baseline_cpu_ms=statistics.median(cpus["baseline"]),
        peak_rss_mb=peak_rss_mb(),
    )


# -- part 2: a million jobs in PostgreSQL --------------------------------------------------------
#: Realistic rows: six task names over five queues, kwargs ``{"model_id": N, "user": "uM"}`` with
#: 100,000 models, created over the last 30 days; 95% finished (91% succeeded, 3% failed, 0.5%
#: dead, 0.5% cancelled), 5% uncompleted (1% staged, 2% queued, 1.5% started, 0.5% retrying).
LOAD_SQL = """
WITH raw AS (
    SELECT g, random() AS r, extract(epoch FROM now()) - 2592000 * random() AS t0,
           random() * 5 AS wait, 0.05 + random() * 120 AS run
    FROM generate_series(1, :rows) AS g
), states AS (
    SELECT g, t0, wait, run,
        CASE WHEN r < 0.010 THEN 'staged' WHEN r < 0.030 THEN 'queued'
             WHEN r < 0.045 THEN 'started' WHEN r < 0.050 THEN 'retrying'
             WHEN r < 0.080 THEN 'failed' WHEN r < 0.085 THEN 'dead'
             WHEN r < 0.090 THEN 'cancelled' ELSE 'succeeded' END AS state
    FROM raw
), phases AS (
    SELECT *,
        CASE WHEN state <> 'staged' THEN t0 + 0.01 END AS queued_at,
        CASE WHEN state NOT IN ('staged', 'queued', 'cancelled') THEN t0 + 0.01 + wait END
            AS started_at
    FROM states
), finished AS (
    SELECT *,
        CASE WHEN state IN ('succeeded', 'failed', 'dead') THEN started_at + run
             WHEN state = 'cancelled' THEN queued_at + wait END AS finished_at
    FROM phases
)
INSERT INTO jobledger_jobs (
    id, system, name, queue, args, kwargs, tags, options, state, owner,
    attempts, recoveries, restarts, error, created_at, staged_at, first_queued_at, queued_at,
    started_at, finished_at, recovered_at, updated_at)
SELECT
    md5(g::text)::uuid::text, 'celery',
    (ARRAY['reports.build', 'mail.send', 'billing.charge', 'images.resize', 'search.reindex',
           'exports.csv'])[1 + g % 6],
    (ARRAY['reports', 'mail', 'billing', 'default', 'low', 'reports'])[1 + g % 6],
    '[' || g % 1000 || ']',
    '{"model_id": ' || g % 100000 || ', "user": "u' || g % 5003 || '"}',
    '{}', '{"retries": 3}', state,
    CASE WHEN started_at IS NOT NULL
         THEN 'worker-' || g % 16 || ':' || substr(md5((g % 16)::text), 1, 8) END,
    CASE WHEN started_at IS NOT NULL THEN 1 ELSE 0 END, 0, 0,
    CASE WHEN state IN ('failed', 'dead', 'retrying')
         THEN 'ValueError: model ' || g % 100000 || ' is not ready' END,
    t0, CASE WHEN state = 'staged' THEN t0 END, queued_at, queued_at, started_at, finished_at,
    NULL, coalesce(finished_at, started_at, queued_at, t0)
FROM finished
"""


@dataclass
class Timing:
    """One query of part 2: the median of ``runs`` timed runs after one untimed."""

    what: str
    median_ms: float
    runs: int
    rows: int
    peak_rss_mb: float


@dataclass
class BigResult:
    """Part 2 as a whole."""

    rows: int
    repeat: int
    load_s: float
    analyze_s: float
    table_mb: float
    search: str
    peak_rss_after_load_mb: float
    timings: list[Timing] = field(default_factory=list)
    deep_page: int = 0
    walk_s: float = 0.0
    iter_jobs: int = 0
    iter_s: float = 0.0
    iter_peak_before_mb: float = 0.0
    iter_peak_after_mb: float = 0.0
    explain: dict[str, list[str]] = field(default_factory=dict)


@contextlib.contextmanager
def captured(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The statements (and parameters) ``engine`` sends to the database meanwhile."""
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def explain(engine: Engine, statement: str, params: Any) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of a statement exactly as jobledger sent it (in a transaction
    that is rolled back, so an UPDATE explained changes nothing)."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {statement}", params)
        plan = [str(row[0]) for row in rows]
        conn.rollback()
    return plan


def timed(calls: Sequence[tuple[str, Callable[[], int]]], runs: int) -> list[Timing]:
    """Median wall time of each call (which returns how many rows it got) over ``runs`` runs.

    Each call runs once untimed first (cache, connection pool), then the calls take turns, so
    a machine that gets busier meanwhile weighs on all of them alike.
    """
    rows = {what: call() for what, call in calls}
    samples: dict[str, list[float]] = {what: [] for what, _ in calls}
    for _ in range(runs):
        for what, call in calls:
            start = time.perf_counter()
            rows[what] = call()
            samples[what].append(time.perf_counter() - start)
    return [
        Timing(what, statistics.median(samples[what]) * 1000, runs, rows[what], peak_rss_mb())
        for what, _ in calls
    ]


def measure_big(args: argparse.Namespace) -> BigResult:
    """Load ``args.big`` jobs into a fresh PostgreSQL ledger and time the queries on it.

    A second, empty ledger (database ``<--database>_empty``) is the lifecycle's yardstick.
    """
    store = SQLStore(recreate_database(args.postgres_url, args.database))
    empty = SQLStore(recreate_database(args.postgres_url, f"{args.database}_empty"))
    try:
        empty.migrate()
        search = store.migrate_report()
        note(f"postgresql: loading {args.big:,} jobs with generate_series")
        start = time.perf_counter()
        with store.engine.begin() as conn:
            conn.exec_driver_sql("SELECT setseed(0.42)")
            conn.execute(text(LOAD_SQL), {"rows": args.big})
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) jobledger_jobs")
            size = conn.exec_driver_sql("SELECT pg_total_relation_size('jobledger_jobs')").scalar()
        result = BigResult(
            rows=args.big,
            repeat=args.repeat,
            load_s=load_s,
            analyze_s=time.perf_counter() - start,
            table_mb=float(size or 0) / 2**20,
            search=search,
            peak_rss_after_load_mb=peak_rss_mb(),
        )
        note("postgresql: timing queries")
        run_queries(store, empty, args, result)
    finally:
        store.close()
        empty.close()
    return result


def run_queries(
    store: SQLStore, empty: SQLStore, args: argparse.Namespace, result: BigResult
) -> None:
    """The timings of part 2, in the order they print, and the plans of their SQL; ``empty``
    is an empty ledger on the same server, for the lifecycle's comparison."""
    manager = Manager(store)
    everything = JobQuery()
    size = args.page_size
    plans: dict[str, tuple[str, Any]] = {}

    def measure(*calls: tuple[str, Callable[[], int]]) -> None:
        for what, call in calls:
            with captured(store.engine) as seen:
                call()
            plans[what] = [s for s in seen if s[0].lstrip().upper().startswith("SELECT")][-1]
        result.timings.extend(timed(calls, args.repeat))

    measure(
        (
            f"Manager.uncompleted_jobs(match={MATCH!r})",
            lambda: len(list(manager.uncompleted_jobs(match=MATCH))),
        )
    )

    note(f"postgresql: walking the cursor to page {args.deep_page:,}")
    cursor: str | None = None
    start = time.perf_counter()
    for _ in range(args.deep_page - 1):
        cursor = store.query(everything, limit=size, cursor=cursor).next_cursor
        if cursor is None:
            raise SystemExit(f"--deep-page {args.deep_page} is past the end of the ledger")
    result.walk_s = time.perf_counter() - start
    result.deep_page = args.deep_page
    offset = (args.deep_page - 1) * size
    offset_sql = text(
        "SELECT * FROM jobledger_jobs ORDER BY created_at DESC, id DESC LIMIT :size OFFSET :skip"
    )

    def offset_page() -> int:
        with store.engine.connect() as conn:
            return len(conn.execute(offset_sql, {"size": size, "skip": offset}).all())

    measure(
        (
            f"store.query(JobQuery(), limit={size}): page 1",
            lambda: len(store.query(everything, limit=size).items),
        ),
        (
            f"store.query(..., cursor=…): page {args.deep_page:,}",
            lambda: len(store.query(everything, limit=size, cursor=cursor).items),
        ),
        (f"  for contrast, raw SQL OFFSET {offset:,}", offset_page),
    )
    measure(
        ("store.count(JobQuery())", lambda: store.count(everything)),
        (
            "store.count(uncompleted states)",
            lambda: store.count(JobQuery(states=UNCOMPLETED_STATES)),
        ),
        ("store.queue_stats()", lambda: len(store.queue_stats())),
    )

    note(f"postgresql: iterating all {result.rows:,} jobs with iter_jobs")
    result.iter_peak_before_mb = peak_rss_mb()
    start = time.perf_counter()
    result.iter_jobs = sum(1 for _ in store.iter_jobs(everything, page_size=size))
    result.iter_s = time.perf_counter() - start
    result.iter_peak_after_mb = peak_rss_mb()

    # A worker's path on this ledger against an empty one, taking turns: does it stay three
    # primary-key hits at a million rows? (The plans show which index each UPDATE uses.)
    runs = 100

    def lifecycles(target: SQLStore) -> Callable[[], int]:
        one = ledger_lifecycle(target, [str(uuid.uuid4()) for _ in range(runs + 2)])
        position = itertools.count()

        def call() -> int:
            one(next(position))
            return 1

        return call

    on_this, on_empty = lifecycles(store), lifecycles(empty)
    with captured(store.engine) as seen:
        on_this()
    claim, succeed = [s for s in seen if s[0].lstrip().upper().startswith("UPDATE")]
    # Run again after the job succeeded, each UPDATE matches nothing: EXPLAIN ANALYZE is safe.
    plans["Lifecycle.claim: UPDATE"] = claim
    plans["Lifecycle.succeed: UPDATE"] = succeed
    result.timings.extend(
        timed(
            [
                (f"one lifecycle on this ledger (median of {runs})", on_this),
                (f"one lifecycle on an empty ledger (median of {runs})", on_empty),
            ],
            runs,
        )
    )
    if args.explain:
        for what, (statement, params) in plans.items():
            result.explain[what.strip()] = explain(store.engine, statement, params)


# -- output ------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def render(report: dict[str, Any], lifecycles: list[LifecycleResult], big: BigResult | None) -> str:
    env = report["environment"]
    out = [
        f"jobledger {env['jobledger']} · Python {env['python']} · SQLAlchemy {env['sqlalchemy']}"
        f" · {env['platform']}, {env['cpus']} CPUs",
        " · ".join(env["servers"].values()),
    ]
    if lifecycles:
        out += [
            "",
            "Lifecycles per second: store.create(queued) -> Lifecycle.claim -> .succeed,",
            f"median of {lifecycles[0].rounds} round(s) of {lifecycles[0].jobs:,} jobs; baseline: "
            "INSERT + 2 UPDATE by primary key",
            "on a hand-rolled table in the same database; CPU = this process's CPU ms per job.",
            table(
                [
                    "database",
                    "threads",
                    "jobledger/s",
                    "baseline/s",
                    "ratio",
                    "CPU ms jl",
                    "CPU ms base",
                    "peak RSS MiB",
                ],
                [
                    [
                        r.database,
                        str(r.threads),
                        f"{r.jobledger_per_s:,.0f}",
                        f"{r.baseline_per_s:,.0f}",
                        f"{r.ratio:.2f}",
                        f"{r.jobledger_cpu_ms:.2f}",
                        f"{r.baseline_cpu_ms:.2f}",
                        f"{r.peak_rss_mb:.0f}",
                    ]
                    for r in lifecycles
                ],
            ),
        ]
    if big is not None:
        out += [
            "",
            f"PostgreSQL ledger of {big.rows:,} jobs: loaded in {big.load_s:.1f} s, "
            f"VACUUM ANALYZE {big.analyze_s:.1f} s, {big.table_mb:,.0f} MiB with indexes; "
            f"argument search: {big.search}; peak RSS after load {big.peak_rss_after_load_mb:.0f}"
            " MiB.",
            table(
                [f"query (median of {big.repeat} runs)", "ms", "rows", "peak RSS MiB"],
                [
                    [t.what, f"{t.median_ms:,.1f}", f"{t.rows:,}", f"{t.peak_rss_mb:.0f}"]
                    for t in big.timings
                ],
            ),
            f"walking the cursor to page {big.deep_page:,}: {big.deep_page - 1:,} pages in "
            f"{big.walk_s:.1f} s",
            f"store.iter_jobs(JobQuery()): {big.iter_jobs:,} jobs in {big.iter_s:.1f} s "
            f"({big.iter_jobs / big.iter_s:,.0f} jobs/s); peak RSS {big.iter_peak_before_mb:.0f} "
            f"MiB before, {big.iter_peak_after_mb:.0f} MiB after",
        ]
        for label, plan in big.explain.items():
            out += ["", f"EXPLAIN (ANALYZE, BUFFERS) of {label}:", *plan]
    return "\n".join(out)


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="jobledger's benchmark: lifecycles per second and a million-job ledger."
    )
    parser.add_argument(
        "--databases",
        default=",".join(DATABASES),
        help="comma-separated, of: sqlite, postgresql, mariadb, redis (default: all)",
    )
    parser.add_argument("--jobs", type=int, default=2000, help="lifecycles per round (2000)")
    parser.add_argument("--threads", default="1,8", help="thread counts (1,8)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed turns of each side per row, median (3)"
    )
    parser.add_argument(
        "--big", type=int, default=1_000_000, help="jobs in the PostgreSQL ledger; 0 skips it"
    )
    parser.add_argument("--deep-page", type=int, default=1000, help="the deep page (1000)")
    parser.add_argument("--page-size", type=int, default=500, help="rows per page (500)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per query (5)")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "JOBLEDGER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
        help="any database on the PostgreSQL server (only connected to)",
    )
    parser.add_argument(
        "--mysql-url",
        default=os.environ.get("JOBLEDGER_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
        help="any database on the MariaDB/MySQL server (only connected to)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="the Redis of the Redis ledgers (each under a prefix of its own, deleted after)",
    )
    parser.add_argument(
        "--redis-big",
        type=int,
        default=1_000_000,
        help="jobs in the Redis ledger of uncompleted --match; 0 skips it",
    )
    parser.add_argument(
        "--database", default="jobledger_bench", help="the database the bench (re)creates"
    )
    parser.add_argument(
        "--no-pre-ping",
        action="store_true",
        help="turn off SQLStore's pool_pre_ping (one SELECT 1 per connection checkout)",
    )
    parser.add_argument("--explain", action="store_true", help="EXPLAIN ANALYZE the part 2 SQL")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    args = parser.parse_args(argv)
    args.databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    unknown = sorted(set(args.databases) - set(DATABASES))
    if unknown:
        parser.error(f"unknown database(s) {', '.join(unknown)}; known: {', '.join(DATABASES)}")
    args.threads = [int(t) for t in args.threads.split(",")]
    positive = (args.jobs, args.rounds, args.deep_page, args.page_size, args.repeat)
    if min(positive) < 1 or min(args.threads) < 1 or min(args.big, args.redis_big) < 0:
        parser.error(
            "--jobs, --threads, --rounds, --deep-page, --page-size and --repeat must be "
            "positive, --big and --redis-big not negative"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lifecycles: list[LifecycleResult] = []
    servers: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="jobledger-bench-") as tmp:
        for database in args.databases:
            url = fresh_url(database, args, Path(tmp))
            servers[database] = server_version(url)
            for threads in args.threads:
                note(f"{database}: {args.jobs:,} lifecycles on {threads} thread(s)")
                lifecycles.append(
                    measure_lifecycles(
                        database, url, threads, args.jobs, args.rounds, not args.no_pre_ping
                    )
                )
    big = None
    if args.big:
        big = measure_big(args)
        servers.setdefault("postgresql", server_version(parse_url(args.postgres_url)))
    redis_big = None
    if args.redis_big:
        note(f"redis: loading {args.redis_big:,} jobs, then uncompleted --match")
        redis_big = redis_ledger.measure_big(args.redis_url, args.redis_big, args.repeat, MATCH)
        servers.setdefault("redis", server_version(args.redis_url))
    report: dict[str, Any] = {
        "environment": {
            "jobledger": jobledger.__version__,
            "python": platform.python_version(),
            "sqlalchemy": sqlalchemy.__version__,
            "platform": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "servers": servers,
            "command": " ".join(["python", "bench/ledger.py", *sys.argv[1:]]),
        },
        "lifecycles": [asdict(r) for r in lifecycles],
        "big": asdict(big) if big is not None else None,
        "redis_big": asdict(redis_big) if redis_big is not None else None,
    }
    text = render(report, lifecycles, big)
    if redis_big is not None:
        text = "\n".join([text, *redis_ledger.render_big(redis_big)])
    print(json.dumps(report, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
