"""Benchmark of issue 3: what tracking costs a Celery deployment, and how fast a crash heals.

Part 1, throughput. The same no-op task (it bumps a Redis counter so the bench sees it done),
the same worker (prefork, ``--concurrency``, default prefetch, Redis broker), three ways:
plain Celery, Celery with jobledger on a SQLite ledger, and on a PostgreSQL ledger. Each round
publishes ``--jobs`` tasks while the worker consumes; it reports publish jobs/s (the client's
side: tracked publishing writes a ``queued`` record) and end-to-end jobs/s (first publish to
last task done), and the ratio of each to plain Celery. Modes alternate over ``--rounds`` and
the best round of each counts (the machine is shared; the best is the least disturbed).

Part 2, crash-to-requeue latency, PostgreSQL ledger, short settings (heartbeat ``--interval``,
TTL 3x, sweep every ``--interval``): a victim worker holds two long jobs, is SIGKILLed (main
process and pool), and a second live worker's sweep re-enqueues them; the latency of each kill
is from the SIGKILL to the jobs' ``recovered_at``. The bound it checks is TTL + recovery
interval + one sweep.

    python bench/celery.py                       # everything (about two minutes)
    python bench/celery.py --jobs 500 --kills 2  # a quick look

PostgreSQL gets a database of the bench's own (``--database``, dropped and recreated); the
SQLite ledger lives in a temporary directory. The file is named after what it measures, so it
takes its own directory off ``sys.path`` before importing Celery.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import redis  # noqa: E402
from celery import Celery, signals  # noqa: E402
from sqlalchemy import create_engine, make_url, text  # noqa: E402

from jobledger.config import Settings  # noqa: E402
from jobledger.model import JobState  # noqa: E402
from jobledger.query import JobQuery  # noqa: E402
from jobledger.stores.sql import SQLStore, parse_url  # noqa: E402

REDIS_URL = os.environ.get("JOBLEDGER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_SERVER = os.environ.get(
    "JOBLEDGER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


# -- the app, in the bench process and in its worker processes ------------------------------
def make_app(queue: str, counter: str, tracked: bool, settings: Settings | None) -> Celery:
    app = Celery("jlbench", broker=REDIS_URL, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_lost_wait=1.0,
    )
    client: list[redis.Redis] = []

    @app.task(name="bench.noop", tracked=tracked, shared=False)
    def noop() -> None:
        if not client:
            client.append(redis.Redis.from_url(REDIS_URL))
        client[0].incr(counter)

    @app.task(name="bench.hold", tracked=tracked, shared=False)
    def hold(seconds: float) -> None:
        time.sleep(seconds)

    if tracked:
        from jobledger.integrations.celery import install

        install(app, settings=settings or Settings.from_env())
    return app


def worker_main() -> None:
    """``bench/celery.py --worker``: one worker, configured by BENCH_* variables."""
    queue, counter, tracked = (
        os.environ["BENCH_QUEUE"],
        os.environ["BENCH_COUNTER"],
        os.environ["BENCH_TRACKED"] == "1",
    )
    app = make_app(queue, counter, tracked, None)
    ready_key = os.environ["BENCH_READY_KEY"]

    def on_ready(**_: Any) -> None:
        redis.Redis.from_url(REDIS_URL).set(ready_key, "1", ex=600)

    signals.worker_ready.connect(on_ready, weak=False)
    argv = ["worker", "-P", "prefork", "-c", os.environ["BENCH_CONCURRENCY"]]
    argv += ["-Q", queue, "--loglevel=WARNING"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    app.worker_main(argv)


class Worker:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.ready_key = f"jlbench-ready-{uuid.uuid4().hex[:8]}"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker"],
                env={**env, "BENCH_READY_KEY": self.ready_key},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.log = log

    def wait_ready(self, r: redis.Redis, timeout: float = 60) -> None:
        wait_for(
            "a worker to be ready",
            lambda: self._alive() and bool(r.get(self.ready_key)),
            timeout,
        )

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited:\n{self.log.read_text(errors='replace')[-3000:]}")
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def wait_for(what: str, check: Callable[[], object], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        pause.wait(0.01)


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
    if mode == "sqlite":
        path = workdir / f"ledger-{uuid.uuid4().hex[:6]}.db"
        url = f"sqlite:///{path}"
    else:
        url = fresh_postgres(database)
    store = SQLStore(url)
    store.migrate()
    store.close()
    return url


# -- part 1 ----------------------------------------------------------------------------------
def throughput_round(
    mode: str, args: argparse.Namespace, workdir: Path, r: redis.Redis
) -> tuple[float, float]:
    """One round of ``mode``: (publish jobs/s, end-to-end jobs/s)."""
    queue = f"jlbench-{uuid.uuid4().hex[:8]}"
    counter = f"{queue}-done"
    tracked = mode != "plain"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
    env.update(
        BENCH_QUEUE=queue,
        BENCH_COUNTER=counter,
        BENCH_TRACKED="1" if tracked else "0",
        BENCH_CONCURRENCY=str(args.concurrency),
    )
    settings = None
    if tracked:
        url = ledger_url(mode, workdir, args.database)
        env["JOBLEDGER_DATABASE_URL"] = url
        settings = Settings(database_url=url, instance_name="bench-client")
    app = make_app(queue, counter, tracked, settings)
    worker = Worker(env, workdir / f"{queue}.log")
    try:
        worker.wait_ready(r)
        for _ in range(50):  # warm up: connections, pool processes, caches
            app.send_task("bench.noop")
        wait_for("the warm-up", lambda: int(r.get(counter) or 0) >= 50)
        started = time.perf_counter()
        for _ in range(args.jobs):
            app.send_task("bench.noop")
        published = time.perf_counter() - started
        wait_for("the round", lambda: int(r.get(counter) or 0) >= 50 + args.jobs)
        finished = time.perf_counter() - started
        if tracked:
            check = SQLStore(env["JOBLEDGER_DATABASE_URL"])
            done = check.count(JobQuery(states=frozenset({JobState.SUCCEEDED})))
            check.close()
            assert done == 50 + args.jobs, f"{mode}: {done} succeeded in the ledger"
    finally:
        worker.kill()
        r.delete(counter, queue, worker.ready_key)
        from jobledger.integrations.base import registry

        registry.unregister("celery")
    return args.jobs / published, args.jobs / finished


# -- part 2 ----------------------------------------------------------------------------------
def crash_latencies(args: argparse.Namespace, workdir: Path, r: redis.Redis) -> list[float]:
    url = ledger_url("postgresql", workdir, args.database)
    store = SQLStore(url)
    base = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
    base.update(
        JOBLEDGER_DATABASE_URL=url,
        JOBLEDGER_HEARTBEAT_INTERVAL=str(args.interval),
        JOBLEDGER_RECOVERY_INTERVAL=str(args.interval),
        JOBLEDGER_MAX_RECOVERIES="100",
        BENCH_TRACKED="1",
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
            app = make_app(queue, "unused", True, settings)
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
            from jobledger.integrations.base import registry

            registry.unregister("celery")
    finally:
        rescuer.kill()
        r.delete(idle)
        store.close()
    return latencies


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=2000, help="tasks per round (2000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per mode (2)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes (2)")
    parser.add_argument("--kills", type=int, default=6, help="crashes measured (6)")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat/sweep (1s)")
    parser.add_argument("--database", default="jl_bench_celery", help="PostgreSQL database")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main()
        return
    r = redis.Redis.from_url(REDIS_URL)
    modes = ["plain", "sqlite", "postgresql"]
    best: dict[str, tuple[float, float]] = {}
    print(f"jobledger Celery benchmark: {platform.python_version()}, {os.cpu_count()} CPUs")
    print(
        f"{args.jobs} no-op tasks a round, {args.rounds} rounds a mode, Redis broker, "
        f"prefork -c {args.concurrency}\n"
    )
    with tempfile.TemporaryDirectory(prefix="jlbench-") as tmp:
        workdir = Path(tmp)
        for round_ in range(args.rounds):
            for mode in modes:
                publish, e2e = throughput_round(mode, args, workdir, r)
                print(f"  round {round_ + 1} {mode:<10} publish {publish:7.0f}/s  e2e {e2e:7.0f}/s")
                old = best.get(mode, (0.0, 0.0))
                best[mode] = (max(old[0], publish), max(old[1], e2e))
        plain_publish, plain_e2e = best["plain"]
        print(f"\n{'mode':<22}{'publish jobs/s':>16}{'ratio':>8}{'e2e jobs/s':>14}{'ratio':>8}")
        for mode in modes:
            publish, e2e = best[mode]
            label = "plain Celery" if mode == "plain" else f"tracked, {mode}"
            print(
                f"{label:<22}{publish:>16.0f}{publish / plain_publish:>8.2f}"
                f"{e2e:>14.0f}{e2e / plain_e2e:>8.2f}"
            )
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
