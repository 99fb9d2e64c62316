"""Benchmarks of issues 3 and 12: what tracking costs a Celery deployment, and how fast a crash
heals.

Part 1, throughput, in paired rounds. For each configuration (``--configs``: the task body's
length and the worker's pool, by default 0 ms, 5 ms and 50 ms bodies on prefork ``-c 2`` and
5 ms on ``-P threads -c 8``) one worker per mode is started and kept (Redis broker, default
prefetch): plain Celery; Celery with jobledger on a SQLite ledger, on a PostgreSQL ledger and
on a Redis ledger (the broker's own Redis, under a key prefix of the bench's); and the peer
users pick instead, plain Celery with its own database result backend on
PostgreSQL (``result_backend="db+postgresql+psycopg://…"``, ``task_track_started=True``: a row
written when a task starts and again when it ends). A round publishes ``--jobs`` tasks (fewer for
long bodies: about ``--round-seconds`` of work) while its worker consumes, and measures publish
jobs/s (the client's side: tracked publishing writes a ``queued`` record) and end-to-end jobs/s
(first publish to last body done). The modes take turns, one round each per pair, in an order
rotated every pair; each mode's ratio to the plain round *of the same pair* is printed as the
median and min-max over ``--pairs`` (the machine is shared: ratios within a pair are what
count, absolute rates move with the load).

Part 2, crash-to-requeue latency, PostgreSQL ledger, short settings (heartbeat ``--interval``,
TTL 3x, sweep every ``--interval``): a victim worker holds two long jobs, is SIGKILLed (main
process and pool), and a second live worker's sweep re-enqueues them; the latency of each kill
is from the SIGKILL to the jobs' ``recovered_at``. The bound it checks is TTL + recovery
interval + one sweep.

    python bench/celery.py                                  # everything (about 15 minutes)
    python bench/celery.py --configs 0:prefork:2 --pairs 3 --kills 0   # a quick look

``JOBLEDGER_*`` variables reach the workers (``JOBLEDGER_SYNCHRONOUS_PUBLISH=false`` measures
the relaxed publish record). PostgreSQL gets databases of the bench's own (``--database`` and
``<--database>_rb``, dropped and recreated); the SQLite ledger lives in a temporary directory;
the Redis ledger's keys are deleted at the end.
The file is named after what it measures, so it takes its own directory off ``sys.path``
before importing Celery.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.append(str(HERE))  # after site-packages: the queue system wins its own name

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import redis  # noqa: E402
from celery import Celery, signals  # noqa: E402
from sqlalchemy import create_engine, make_url, text  # noqa: E402

from _workers import WorkerProcess, wait_for  # noqa: E402
from jobledger.config import Settings  # noqa: E402
from jobledger.model import JobState  # noqa: E402
from jobledger.query import JobQuery  # noqa: E402
from jobledger.stores import Store, open_store  # noqa: E402
from jobledger.stores.redis import RedisStore  # noqa: E402
from jobledger.stores.sql import parse_url  # noqa: E402

REDIS_URL = os.environ.get("JOBLEDGER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_SERVER = os.environ.get(
    "JOBLEDGER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


# -- the app, in the bench process and in its worker processes ------------------------------
MODES = ("plain", "sqlite", "postgresql", "redis", "result-backend")
TRACKED = ("sqlite", "postgresql", "redis")
LABELS = {
    "plain": "plain Celery",
    "sqlite": "tracked, SQLite",
    "postgresql": "tracked, PostgreSQL",
    "redis": "tracked, Redis",
    "result-backend": "Celery + db result backend",
}


def make_app(
    queue: str, counter: str, mode: str, settings: Settings | None, result_backend: str = ""
) -> tuple[Celery, Any]:
    """The bench's app in ``mode``, and its jobledger integration (None when untracked)."""
    app = Celery("jlbench", broker=REDIS_URL, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_lost_wait=1.0,
    )
    if mode == "result-backend":
        app.conf.update(
            result_backend=result_backend, task_ignore_result=False, task_track_started=True
        )
    tracked = mode in TRACKED
    client: list[redis.Redis] = []

    @app.task(name="bench.work", tracked=tracked, shared=False)
    def work(seconds: float) -> None:
        if seconds:
            time.sleep(seconds)
        if not client:
            client.append(redis.Redis.from_url(REDIS_URL))
        client[0].incr(counter)

    @app.task(name="bench.hold", tracked=tracked, shared=False)
    def hold(seconds: float) -> None:
        time.sleep(seconds)

    integration = None
    if tracked:
        from jobledger.integrations.celery import install

        integration = install(app, settings=settings or Settings.from_env())
    return app, integration


def worker_main() -> None:
    """``bench/celery.py --worker``: one worker, configured by BENCH_* variables."""
    queue, counter, mode = (
        os.environ["BENCH_QUEUE"],
        os.environ["BENCH_COUNTER"],
        os.environ["BENCH_MODE"],
    )
    app, _ = make_app(queue, counter, mode, None, os.environ.get("BENCH_RESULT_BACKEND", ""))
    ready_key = os.environ["BENCH_READY_KEY"]

    def on_ready(**_: Any) -> None:
        redis.Redis.from_url(REDIS_URL).set(ready_key, "1", ex=3600)

    signals.worker_ready.connect(on_ready, weak=False)
    argv = ["worker", "-P", os.environ.get("BENCH_POOL", "prefork")]
    argv += ["-c", os.environ["BENCH_CONCURRENCY"], "-Q", queue, "--loglevel=WARNING"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    app.worker_main(argv)


class Worker(WorkerProcess):
    """``bench/celery.py --worker`` as a process of its own; ready once it says so in Redis."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.ready_key = f"jlbench-ready-{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        super().__init__(cmd, {**env, "BENCH_READY_KEY": self.ready_key}, log)

    def wait_ready(self, r: redis.Redis, timeout: float = 60) -> None:
        self.wait_until("a worker to be ready", lambda: r.get(self.ready_key), timeout)


# -- ledgers ---------------------------------------------------------------------------------
def fresh_postgres(database: str) -> str:
    """Drop and recreate the bench's own database; its URL."""
    server = parse_url(POSTGRES_SERVER)
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {database}"))
    admin.dispose()
    return make_url(POSTGRES_SERVER).set(database=database).render_as_string(False)


def ledger_url(mode: str, workdir: Path, database: str) -> str:
    """A fresh, migrated ledger for ``mode``: a SQLite file, the bench's PostgreSQL database,
    or a key prefix of its own on the broker's Redis."""
    if mode == "sqlite":
        url = f"sqlite:///{workdir / f'ledger-{uuid.uuid4().hex[:6]}.db'}"
    elif mode == "redis":
        separator = "&" if "?" in REDIS_URL else "?"
        url = f"{REDIS_URL}{separator}prefix=jlbench-{uuid.uuid4().hex[:8]}"
    else:
        url = fresh_postgres(database)
    store = open_store(url)
    store.migrate()
    store.close()
    return url


def drop_ledger(url: str) -> None:
    """Delete a Redis ledger's keys (the SQL ones go with their file or database)."""
    store: Store = open_store(url)
    if isinstance(store, RedisStore):
        for key in list(store.client.scan_iter(store.keys.pattern, count=1000)):
            store.client.delete(key)
    store.close()


# -- part 1 ----------------------------------------------------------------------------------
class Config:
    """A body length and a worker pool, from ``0:prefork:2`` (milliseconds:pool:concurrency)."""

    def __init__(self, text: str, args: argparse.Namespace) -> None:
        body, self.pool, concurrency = text.split(":")
        self.body = float(body) / 1000
        self.concurrency = int(concurrency)
        if self.pool not in ("prefork", "threads") or self.concurrency < 1 or self.body < 0:
            raise ValueError(f"bad configuration {text!r}")
        work = args.round_seconds * self.concurrency / self.body if self.body else args.jobs
        self.jobs = max(50, min(args.jobs, int(work)))

    def __str__(self) -> str:
        return (
            f"{self.body * 1000:g} ms bodies, {self.pool} -c {self.concurrency}, "
            f"{self.jobs} tasks a round"
        )


class Side:
    """One mode's worker for one configuration, kept across the pairs, and its publisher."""

    def __init__(
        self, mode: str, config: Config, args: argparse.Namespace, workdir: Path, r: redis.Redis
    ) -> None:
        self.mode, self.config, self.r = mode, config, r
        self.queue = f"jlbench-{mode}-{uuid.uuid4().hex[:8]}"
        self.counter = f"{self.queue}-done"
        self.done = 0
        env = dict(os.environ)  # JOBLEDGER_* included: the bench's Redis URL, the settings
        env.update(
            BENCH_QUEUE=self.queue,
            BENCH_COUNTER=self.counter,
            BENCH_MODE=mode,
            BENCH_POOL=config.pool,
            BENCH_CONCURRENCY=str(config.concurrency),
        )
        self.url = ""
        self.result_backend = ""
        if mode in TRACKED:
            self.url = ledger_url(mode, workdir, args.database)
            env["JOBLEDGER_DATABASE_URL"] = self.url
            env["JOBLEDGER_INSTANCE_NAME"] = f"bench-{mode}"
        elif mode == "result-backend":
            url = make_url(fresh_postgres(f"{args.database}_rb"))
            self.result_backend = "db+" + url.set(drivername="postgresql+psycopg").render_as_string(
                False
            )
            env["BENCH_RESULT_BACKEND"] = self.result_backend
        self.worker = Worker(env, workdir / f"{self.queue}.log")

    def start(self) -> None:
        self.worker.wait_ready(self.r)
        self.run(50, timed=False)  # warm up: connections, pool processes, caches

    def run(self, jobs: int, *, timed: bool = True) -> tuple[float, float]:
        """Publish ``jobs`` tasks and wait for their bodies: (publish jobs/s, end-to-end
        jobs/s). The publisher's integration is disconnected afterwards, so no later round's
        publishes reach this round's ledger."""
        settings = None
        if self.url:
            settings = Settings.from_env(database_url=self.url, instance_name="bench-client")
        app, integration = make_app(
            self.queue, self.counter, self.mode, settings, self.result_backend
        )
        try:
            for _ in range(10):  # the publisher's own connections
                app.send_task("bench.work", args=[self.config.body])
            self.done += 10
            wait_for("the round's warm-up", lambda: int(self.r.get(self.counter) or 0) >= self.done)
            started = time.perf_counter()
            for _ in range(jobs):
                app.send_task("bench.work", args=[self.config.body])
            published = time.perf_counter() - started
            self.done += jobs
            wait_for("the round", lambda: int(self.r.get(self.counter) or 0) >= self.done)
            finished = time.perf_counter() - started
        finally:
            if integration is not None:
                integration.close()
        if self.url:  # a body counts itself done a moment before its success is recorded
            check = open_store(self.url)
            succeeded = JobQuery(states=frozenset({JobState.SUCCEEDED}))
            wait_for("the ledger", lambda: check.count(succeeded) == self.done, 60)
            check.close()
        return jobs / published, jobs / finished

    def stop(self) -> None:
        self.worker.kill()
        self.r.delete(self.counter, self.queue, self.worker.ready_key)
        if self.url:
            drop_ledger(self.url)


def throughput(
    config: Config, args: argparse.Namespace, workdir: Path, r: redis.Redis
) -> dict[str, list[tuple[float, float]]]:
    """Each mode's (publish, end-to-end) jobs/s of every pair, for ``config``."""
    sides = [Side(mode, config, args, workdir, r) for mode in args.modes]
    rates: dict[str, list[tuple[float, float]]] = {mode: [] for mode in args.modes}
    try:
        for side in sides:
            side.start()
        for pair in range(args.pairs):
            turn = sides[pair % len(sides) :] + sides[: pair % len(sides)]
            for side in turn:
                rates[side.mode].append(side.run(config.jobs))
            line = "  ".join(
                f"{mode} {rates[mode][-1][0]:5.0f}/{rates[mode][-1][1]:4.0f}" for mode in args.modes
            )
            print(f"  pair {pair + 1}: publish/e2e jobs/s  {line}", flush=True)
    finally:
        for side in sides:
            side.stop()
    return rates


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(config: Config, rates: dict[str, list[tuple[float, float]]]) -> None:
    """Medians of each mode's rates, and of its ratios to the plain round of the same pair."""
    print(
        f"\n{config}: median (min-max) over {len(next(iter(rates.values())))} pairs\n"
        f"{'mode':<28}{'publish/s':>10}{'ratio':>20}{'e2e/s':>8}{'ratio':>20}"
    )
    plain = rates.get("plain")
    for mode, pairs in rates.items():
        publish = [p for p, _ in pairs]
        e2e = [e for _, e in pairs]
        ratios = ["", ""]
        if plain is not None:
            ratios = [
                spread([x / base[i] for x, base in zip(values, plain, strict=True)])
                for i, values in enumerate((publish, e2e))
            ]
        print(
            f"{LABELS[mode]:<28}{statistics.median(publish):>10.0f}{ratios[0]:>20}"
            f"{statistics.median(e2e):>8.0f}{ratios[1]:>20}"
        )
    peer = rates.get("result-backend")
    if peer is not None:
        for mode in ("postgresql", "redis", "sqlite"):
            if mode in rates:
                versus = [t[1] / b[1] for t, b in zip(rates[mode], peer, strict=True)]
                print(f"  {LABELS[mode]} / result backend, end to end: {spread(versus)}")


# -- part 2 ----------------------------------------------------------------------------------
def crash_latencies(args: argparse.Namespace, workdir: Path, r: redis.Redis) -> list[float]:
    url = ledger_url("postgresql", workdir, args.database)
    store = open_store(url)
    base = dict(os.environ)
    base.update(
        JOBLEDGER_DATABASE_URL=url,
        JOBLEDGER_HEARTBEAT_INTERVAL=str(args.interval),
        JOBLEDGER_RECOVERY_INTERVAL=str(args.interval),
        JOBLEDGER_MAX_RECOVERIES="100",
        BENCH_MODE="postgresql",
        BENCH_COUNTER="unused",
        BENCH_CONCURRENCY="2",
    )
    idle = f"jlbench-idle-{uuid.uuid4().hex[:6]}"
    # the rescuer consumes a queue nobody publishes to: it only sweeps
    rescuer = Worker(
        {**base, "BENCH_QUEUE": idle, "JOBLEDGER_INSTANCE_NAME": "rescuer"},
        workdir / "rescuer.log",
    )
    latencies: list[float] = []
    try:
        rescuer.wait_ready(r)
        for kill in range(args.kills):
            queue = f"jlbench-victim-{uuid.uuid4().hex[:6]}"
            settings = Settings(database_url=url, instance_name="bench-client")
            app, integration = make_app(queue, "unused", "postgresql", settings)
            victim = Worker(
                {**base, "BENCH_QUEUE": queue, "JOBLEDGER_INSTANCE_NAME": f"victim{kill}"},
                workdir / f"victim{kill}.log",
            )
            victim.wait_ready(r)
            ids = [app.send_task("bench.hold", args=[600]).id for _ in range(2)]

            def held(ids: list[str] = ids) -> bool:
                jobs = [store.get(i) for i in ids]
                return all(j is not None and j.state is JobState.STARTED for j in jobs)

            wait_for("the victim to hold its jobs", held)
            # land the kill at a random point of the heartbeat and sweep cycles
            threading.Event().wait(args.interval * (kill % 4) / 4 + 0.3)
            victim.kill()
            killed_at = time.time()

            def recovered(ids: list[str] = ids) -> bool:
                jobs = [store.get(i) for i in ids]
                return all(j is not None and j.recovered_at is not None for j in jobs)

            wait_for("the sweep to re-enqueue the orphans", recovered, 60)
            at = max(store.get(i).recovered_at.timestamp() for i in ids)  # type: ignore[union-attr]
            latencies.append(at - killed_at)
            r.delete(queue)
            integration.close()
    finally:
        rescuer.kill()
        r.delete(idle)
        store.close()
    return latencies


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--configs",
        default="0:prefork:2,5:prefork:2,5:threads:8,50:prefork:2",
        help="body ms:pool:concurrency, comma-separated (default: the issue's four)",
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"of: {', '.join(MODES)}")
    parser.add_argument("--pairs", type=int, default=5, help="rounds per mode, taking turns (5)")
    parser.add_argument("--jobs", type=int, default=1000, help="tasks per round at most (1000)")
    parser.add_argument(
        "--round-seconds", type=float, default=2.0, help="body time a round of long bodies holds"
    )
    parser.add_argument("--kills", type=int, default=6, help="crashes measured (6)")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat/sweep (1s)")
    parser.add_argument("--database", default="jl_bench_celery", help="PostgreSQL database")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= set(MODES) or args.pairs < 1 or args.jobs < 50:
        parser.error(f"--modes of {', '.join(MODES)}; --pairs >= 1; --jobs >= 50")
    try:
        args.configs = [Config(c, args) for c in args.configs.split(",") if c.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main()
        return
    r = redis.Redis.from_url(REDIS_URL)
    print(
        f"jobledger Celery benchmark: Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, Redis broker, {args.pairs} pairs a configuration"
    )
    with tempfile.TemporaryDirectory(prefix="jlbench-") as tmp:
        workdir = Path(tmp)
        results = []
        for config in args.configs:
            print(f"\n{config}", flush=True)
            results.append((config, throughput(config, args, workdir, r)))
        for config, rates in results:
            report(config, rates)
        if args.kills:
            latencies = crash_latencies(args, workdir, r)
            ttl = 3 * args.interval
            bound = ttl + args.interval
            print(
                f"\ncrash to re-enqueue (PostgreSQL ledger, heartbeat {args.interval:g}s, "
                f"TTL {ttl:g}s, sweep every {args.interval:g}s), {len(latencies)} SIGKILLs:"
            )
            print("  " + "  ".join(f"{x:.2f}s" for x in latencies))
            print(
                f"  median {statistics.median(latencies):.2f}s  max {max(latencies):.2f}s  "
                f"(bound TTL + interval = {bound:g}s, plus one sweep)"
            )


if __name__ == "__main__":
    main()
