"""Benchmark of issue 10: what tracking costs a Dramatiq deployment, on each broker.

The same no-op actor (it bumps a Redis counter so the bench sees it done), the same worker
(``dramatiq``, one process of ``--threads`` threads), three ways: plain Dramatiq, Dramatiq with
jobledger on a SQLite ledger, and on a PostgreSQL ledger. Each round publishes ``--jobs``
messages while the worker consumes and measures publish jobs/s (the client's side: a tracked
send writes a ``queued`` record) and end-to-end jobs/s (first send to last body done).

Rounds are paired and interleaved: every round runs the three modes back to back, in an order
that rotates from round to round, and each tracked mode's ratio is taken against the plain run
of the *same* round, so a neighbour's load on this shared machine moves both sides of a ratio.
The table shows each ratio's median and min-max over the rounds.

    python bench/dramatiq.py                          # both brokers, 5 rounds (a few minutes)
    python bench/dramatiq.py --brokers redis --rounds 3 --jobs 500   # a quick look

PostgreSQL gets a database of the bench's own (``--database``, dropped and recreated); SQLite
ledgers live in a temporary directory. The file is named after what it measures, so it takes
its own directory off ``sys.path`` before importing Dramatiq.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.append(str(HERE))  # after site-packages: the queue system wins its own name

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import dramatiq  # noqa: E402
import redis  # noqa: E402
from dramatiq import Broker  # noqa: E402
from sqlalchemy import create_engine, make_url, text  # noqa: E402

from _workers import WorkerProcess, wait_for  # noqa: E402
from jobledger.config import Settings  # noqa: E402
from jobledger.integrations.base import registry  # noqa: E402
from jobledger.model import JobState  # noqa: E402
from jobledger.query import JobQuery  # noqa: E402
from jobledger.stores.sql import SQLStore, parse_url  # noqa: E402

REDIS_URL = os.environ.get("JOBLEDGER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("JOBLEDGER_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
POSTGRES_SERVER = os.environ.get(
    "JOBLEDGER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
MODES = ("plain", "sqlite", "postgresql")
WARM_UP = 50

#: The worker's broker (``dramatiq __main__:BROKER`` in a forked worker process).
BROKER: Broker | None = None


# -- the app, in the bench process and in its worker processes ------------------------------
def make_broker(broker: str, queue: str, counter: str, settings: Settings | None) -> Broker:
    """The broker with the no-op actor; tracked by jobledger with ``settings``, if given."""
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from dramatiq.brokers.redis import RedisBroker

    made: Broker = (
        RedisBroker(url=REDIS_URL, namespace=f"jlbench-{queue}")
        if broker == "redis"
        else RabbitmqBroker(url=AMQP_URL)
    )
    options: dict[str, object] = {}
    if settings is not None:
        from jobledger.integrations.dramatiq import install

        install(made, settings)
        options["tracked"] = True
    client: list[redis.Redis] = []

    @dramatiq.actor(
        broker=made, actor_name="bench.noop", queue_name=queue, max_retries=0, **options
    )
    def noop() -> None:
        if not client:
            client.append(redis.Redis.from_url(REDIS_URL))
        client[0].incr(counter)

    return made


def worker_main() -> None:
    """``bench/dramatiq.py --worker``: one ``dramatiq`` worker, configured by BENCH_* vars."""
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    global BROKER
    queue = os.environ["BENCH_QUEUE"]
    settings = Settings.from_env() if os.environ["BENCH_TRACKED"] == "1" else None
    BROKER = make_broker(os.environ["BENCH_BROKER"], queue, os.environ["BENCH_COUNTER"], settings)
    argv = ["__main__:BROKER", "--processes", "1", "--threads", os.environ["BENCH_THREADS"]]
    argv += ["--queues", queue]
    sys.exit(dramatiq_main(make_argument_parser().parse_args(argv)))


def start_worker(env: dict[str, str], log: Path) -> WorkerProcess:
    """``bench/dramatiq.py --worker`` as a process of its own."""
    return WorkerProcess([sys.executable, str(Path(__file__).resolve()), "--worker"], env, log)


# -- ledgers ---------------------------------------------------------------------------------
def ledger_url(mode: str, workdir: Path, database: str) -> str:
    """A fresh, migrated ledger: a SQLite file, or the bench's own PostgreSQL database."""
    if mode == "sqlite":
        url = f"sqlite:///{workdir / f'ledger-{uuid.uuid4().hex[:6]}.db'}"
    else:
        admin = create_engine(parse_url(POSTGRES_SERVER), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            conn.execute(text(f"CREATE DATABASE {database}"))
        admin.dispose()
        url = make_url(POSTGRES_SERVER).set(database=database).render_as_string(False)
    store = SQLStore(url)
    store.migrate()
    store.close()
    return url


# -- a round ---------------------------------------------------------------------------------
def run(
    broker: str, mode: str, args: argparse.Namespace, workdir: Path, r: redis.Redis
) -> tuple[float, float]:
    """One run of ``mode`` on ``broker``: (publish jobs/s, end-to-end jobs/s)."""
    queue = f"jlbench-{uuid.uuid4().hex[:8]}"
    counter = f"{queue}-done"
    tracked = mode != "plain"
    env = {  # the worker's settings are the bench's, whatever the shell says
        k: v
        for k, v in os.environ.items()
        if not k.startswith("JOBLEDGER_") or k.startswith("JOBLEDGER_BENCH_")
    }
    env.update(
        BENCH_BROKER=broker,
        BENCH_QUEUE=queue,
        BENCH_COUNTER=counter,
        BENCH_TRACKED="1" if tracked else "0",
        BENCH_THREADS=str(args.threads),
        JOBLEDGER_INSTANCE_NAME="bench-worker",
        JOBLEDGER_JOURNAL_DIR=str(workdir / "journal"),
    )
    settings = None
    if tracked:
        env["JOBLEDGER_DATABASE_URL"] = ledger_url(mode, workdir, args.database)
        settings = Settings(
            database_url=env["JOBLEDGER_DATABASE_URL"],
            instance_name="bench-client",
            journal_dir=env["JOBLEDGER_JOURNAL_DIR"],
        )
    client = make_broker(broker, queue, counter, settings)
    noop = client.get_actor("bench.noop")
    worker = start_worker(env, workdir / f"{queue}.log")
    try:
        for _ in range(WARM_UP):  # and the worker is up once these are done
            noop.send()
        wait_for("the warm-up", lambda: worker.alive() and int(r.get(counter) or 0) >= WARM_UP)
        started = time.perf_counter()
        for _ in range(args.jobs):
            noop.send()
        published = time.perf_counter() - started
        wait_for("the round", lambda: int(r.get(counter) or 0) >= WARM_UP + args.jobs)
        finished = time.perf_counter() - started
        if tracked:
            check = SQLStore(env["JOBLEDGER_DATABASE_URL"])
            succeeded = frozenset({JobState.SUCCEEDED})
            wait_for(  # the last finishes are written right after the counter moved
                "the ledger to say every job succeeded",
                lambda: check.count(JobQuery(states=succeeded)) == WARM_UP + args.jobs,
                timeout=30,
            )
            check.close()
    finally:
        worker.kill()
        r.delete(counter)
        with contextlib.suppress(Exception):
            client.flush_all()
        client.close()
        registry.unregister("dramatiq")
    return args.jobs / published, args.jobs / finished


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):5.2f} ({min(values):.2f}-{max(values):.2f})"


def bench(broker: str, args: argparse.Namespace, workdir: Path, r: redis.Redis) -> None:
    ratios: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES[1:]}
    rates: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for round_ in range(args.rounds):
        order = MODES[round_ % 3 :] + MODES[: round_ % 3]
        got = {mode: run(broker, mode, args, workdir, r) for mode in order}
        line = "  ".join(f"{m} {got[m][0]:5.0f}/{got[m][1]:5.0f}" for m in MODES)
        print(f"  {broker} round {round_ + 1}: publish/e2e jobs/s  {line}", flush=True)
        for mode in MODES:
            rates[mode].append(got[mode])
        for mode in MODES[1:]:
            ratios[mode].append((got[mode][0] / got["plain"][0], got[mode][1] / got["plain"][1]))
    print(f"\n  {broker}: tracked/plain, median (min-max) over {args.rounds} paired rounds")
    print(f"  {'mode':<24}{'publish jobs/s':>16}{'ratio':>20}{'e2e jobs/s':>14}{'ratio':>20}")
    for mode in MODES:
        publish = statistics.median(x[0] for x in rates[mode])
        e2e = statistics.median(x[1] for x in rates[mode])
        label = "plain Dramatiq" if mode == "plain" else f"tracked, {mode}"
        if mode == "plain":
            print(f"  {label:<24}{publish:>16.0f}{'1':>20}{e2e:>14.0f}{'1':>20}")
        else:
            p = spread([x[0] for x in ratios[mode]])
            e = spread([x[1] for x in ratios[mode]])
            print(f"  {label:<24}{publish:>16.0f}{p:>20}{e2e:>14.0f}{e:>20}")
    print()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--brokers", default="redis,rabbitmq", help="redis,rabbitmq (both)")
    parser.add_argument("--jobs", type=int, default=1000, help="messages per run (1000)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (5)")
    parser.add_argument("--threads", type=int, default=4, help="worker threads (4)")
    parser.add_argument("--database", default="jl_bench_dramatiq", help="PostgreSQL database")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main()
        return
    r = redis.Redis.from_url(REDIS_URL)
    print(f"jobledger Dramatiq benchmark: {platform.python_version()}, {os.cpu_count()} CPUs")
    print(
        f"{args.jobs} no-op messages a run, one worker process of {args.threads} threads, "
        f"dramatiq {dramatiq.__version__}\n"
    )
    with tempfile.TemporaryDirectory(prefix="jlbench-") as tmp:
        for broker in args.brokers.split(","):
            bench(broker, args, Path(tmp), r)


if __name__ == "__main__":
    main()
