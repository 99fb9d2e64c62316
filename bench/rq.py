"""What tracking costs an RQ deployment, and how fast a crash heals.

Part 1, throughput. The same no-op job (it bumps a Redis counter so the bench sees it done),
one worker, Redis as RQ's broker, for RQ's ``SimpleWorker`` and its forking ``Worker`` (a work
horse per job): plain RQ against jobledger's worker class with a tracked queue, on the ledger
of ``--ledger``. Each round runs plain and tracked back to back (the order alternating), so a
round's ratio compares two runs under the same load of this shared machine; the ratios of
tracked to plain jobs/s (enqueue, the client's side, which writes a ``queued`` record; and
end to end, first enqueue to last job done) are reported as median and min-max over
``--rounds``.

Part 2, crash to re-enqueue, short settings (heartbeat ``--interval``, TTL 3x, sweep every
``--interval``): a victim worker holds a long job and is SIGKILLed (its work horse too); a
second worker's sweep puts the job back. Latency is from the SIGKILL to the job's
``recovered_at``. For the forking worker the work horse alone is killed as well: its own
worker puts the job back as soon as it sees the horse die.

    python bench/rq.py                            # everything (a few minutes)
    python bench/rq.py --jobs 200 --rounds 2 --kills 2

The job functions live in a module the bench writes to its temporary directory. The file is
named after what it measures, so it takes its own directory off ``sys.path`` before importing
RQ.
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
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import redis  # noqa: E402
import rq  # noqa: E402
from sqlalchemy import create_engine, make_url, text  # noqa: E402

from _workers import WorkerProcess, wait_for  # noqa: E402
from jobledger.config import Settings  # noqa: E402
from jobledger.integrations.base import registry  # noqa: E402
from jobledger.integrations.rq import Queue as TrackedQueue  # noqa: E402
from jobledger.integrations.rq import install  # noqa: E402
from jobledger.model import JobState  # noqa: E402
from jobledger.query import JobQuery  # noqa: E402
from jobledger.stores.sql import SQLStore, parse_url  # noqa: E402

REDIS_URL = os.environ.get("JOBLEDGER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_SERVER = os.environ.get(
    "JOBLEDGER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
JOBS_MODULE = """
import os, time, redis
_client = []
def noop(counter):
    if not _client or _client[0][0] != os.getpid():
        _client[:] = [(os.getpid(), redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]))]
    _client[0][1].incr(counter)
def hold(seconds):
    time.sleep(seconds)
"""
CLASSES = {"SimpleWorker": "SimpleWorker", "Worker": "Worker"}


class Worker(WorkerProcess):
    """One ``rq worker`` process; ready once RQ lists it."""

    def __init__(self, cls: str, tracked: bool, queue: str, env: dict[str, str], log: Path):
        self.name = f"jlbench-{uuid.uuid4().hex[:8]}"
        where = "jobledger.integrations.rq" if tracked else "rq.worker"
        cmd = [
            sys.executable, "-m", "rq.cli", "worker", "--url", REDIS_URL, "--worker-class",
            f"{where}.{cls}", "--name", self.name, "--logging_level", "WARNING", queue,
        ]  # fmt: skip
        super().__init__(cmd, env, log, cwd=env["PYTHONPATH"].split(os.pathsep)[0])

    def wait_ready(self, r: redis.Redis) -> None:
        self.wait_until("a worker to be ready", lambda: r.exists(f"rq:worker:{self.name}"))

    def stopped(self) -> bool:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0] in ("T", "t", "Z")
        return True

    def kill(self) -> None:
        """SIGKILL the worker and its work horse (stopped first: it forks no new one)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGSTOP)
            wait_for("the worker to stop", self.stopped, 10)
            for pid in self.children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def ledger_url(kind: str, workdir: Path, database: str) -> str:
    if kind == "sqlite":
        url = f"sqlite:///{workdir / f'ledger-{uuid.uuid4().hex[:6]}.db'}"
    else:
        server = parse_url(POSTGRES_SERVER)
        admin = create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            conn.execute(text(f"CREATE DATABASE {database}"))
        admin.dispose()
        url = make_url(POSTGRES_SERVER).set(database=database).render_as_string(False)
    store = SQLStore(url)
    store.migrate()
    store.close()
    return url


def base_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env.update(PYTHONPATH=os.pathsep.join([str(workdir), src]), BENCH_REDIS_URL=REDIS_URL)
    return env


# -- part 1 ----------------------------------------------------------------------------------
def throughput_run(
    cls: str, tracked: bool, args: argparse.Namespace, workdir: Path, r: redis.Redis
) -> tuple[float, float]:
    """One run: (enqueue jobs/s, end-to-end jobs/s)."""
    name = f"jlbench-{uuid.uuid4().hex[:8]}"
    counter = f"{name}-done"
    env = base_env(workdir)
    connection = redis.Redis.from_url(REDIS_URL)
    queue: rq.Queue
    if tracked:
        url = ledger_url(args.ledger, workdir, args.database)
        env.update(JOBLEDGER_DATABASE_URL=url, JOBLEDGER_INSTANCE_NAME="bench-worker")
        install(connection, Settings(database_url=url, instance_name="bench-client"))
        queue = TrackedQueue(name, connection=connection)
    else:
        queue = rq.Queue(name, connection=connection)
    worker = Worker(cls, tracked, name, env, workdir / f"{name}.log")
    try:
        worker.wait_ready(r)
        for _ in range(20):  # warm up: imports, connections
            queue.enqueue("jlbench_rq_jobs.noop", counter, result_ttl=0)
        wait_for("the warm-up", lambda: int(r.get(counter) or 0) >= 20)
        started = time.perf_counter()
        for _ in range(args.jobs):
            queue.enqueue("jlbench_rq_jobs.noop", counter, result_ttl=0)
        enqueued = time.perf_counter() - started
        wait_for("the run", lambda: int(r.get(counter) or 0) >= 20 + args.jobs)
        finished = time.perf_counter() - started
        if tracked:
            check = SQLStore(env["JOBLEDGER_DATABASE_URL"])
            done = check.count(JobQuery(states=frozenset({JobState.SUCCEEDED})))
            check.close()
            assert done == 20 + args.jobs, f"{cls}: {done} succeeded in the ledger"
    finally:
        worker.kill()
        for key in r.scan_iter(f"*{name}*"):
            r.delete(key)
        registry.unregister("rq")
        connection.close()
    return args.jobs / enqueued, args.jobs / finished


def spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


# -- part 2 ----------------------------------------------------------------------------------
def crash_latencies(
    cls: str, horse_only: bool, args: argparse.Namespace, workdir: Path, r: redis.Redis
) -> list[float]:
    url = ledger_url(args.ledger, workdir, args.database)
    store = SQLStore(url)
    env = base_env(workdir)
    env.update(
        JOBLEDGER_DATABASE_URL=url,
        JOBLEDGER_HEARTBEAT_INTERVAL=str(args.interval),
        JOBLEDGER_RECOVERY_INTERVAL=str(args.interval),
        JOBLEDGER_MAX_RECOVERIES="100",
    )
    connection = redis.Redis.from_url(REDIS_URL)
    install(connection, Settings(database_url=url, instance_name="bench-client"))
    idle = f"jlbench-idle-{uuid.uuid4().hex[:6]}"
    # the rescuer consumes a queue nobody enqueues to: it only sweeps
    rescuer = Worker(cls, True, idle, {**env, "JOBLEDGER_INSTANCE_NAME": "rescuer"},
                     workdir / "rescuer.log")  # fmt: skip
    latencies: list[float] = []
    try:
        rescuer.wait_ready(r)
        for kill in range(args.kills):
            name = f"jlbench-victim-{uuid.uuid4().hex[:6]}"
            queue = TrackedQueue(name, connection=connection)
            victim = Worker(cls, True, name, {**env, "JOBLEDGER_INSTANCE_NAME": f"victim{kill}"},
                            workdir / f"victim{kill}.log")  # fmt: skip
            victim.wait_ready(r)
            job_id = queue.enqueue("jlbench_rq_jobs.hold", 600).id

            def started(job_id: str = job_id) -> bool:
                job = store.get(job_id)
                return job is not None and job.state is JobState.STARTED

            wait_for("the victim to hold its job", started)
            # land the kill at a random point of the heartbeat and sweep cycles
            threading.Event().wait(args.interval * (kill % 4) / 4 + 0.3)
            if horse_only:
                os.kill(victim.children()[0], signal.SIGKILL)
            else:
                victim.kill()
            killed_at = time.time()

            def recovered(job_id: str = job_id) -> bool:
                job = store.get(job_id)
                return job is not None and job.recovered_at is not None

            wait_for("the job to be put back", recovered, 60)
            latencies.append(store.get(job_id).recovered_at.timestamp() - killed_at)  # type: ignore[union-attr]
            victim.kill()
            for key in r.scan_iter(f"*{name}*"):
                r.delete(key)
    finally:
        rescuer.kill()
        registry.unregister("rq")
        connection.close()
        store.close()
    return latencies


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs per run (300)")
    parser.add_argument("--rounds", type=int, default=4, help="paired rounds per class (4)")
    parser.add_argument("--kills", type=int, default=6, help="crashes measured per kind (6)")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat/sweep (1s)")
    parser.add_argument("--ledger", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--database", default="jl_bench_rq", help="PostgreSQL database")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    r = redis.Redis.from_url(REDIS_URL)
    print(
        f"jobledger RQ benchmark: RQ {rq.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {args.ledger} ledger"
    )
    print(f"{args.jobs} no-op jobs a run, {args.rounds} paired rounds a worker class\n")
    with tempfile.TemporaryDirectory(prefix="jlbench-rq-") as tmp:
        workdir = Path(tmp)
        (workdir / "jlbench_rq_jobs.py").write_text(JOBS_MODULE)
        summary: list[str] = []
        for cls in CLASSES:
            enqueue_ratios: list[float] = []
            e2e_ratios: list[float] = []
            for round_ in range(args.rounds):
                order = [False, True] if round_ % 2 == 0 else [True, False]
                got = {t: throughput_run(cls, t, args, workdir, r) for t in order}
                (pe, p2e), (te, t2e) = got[False], got[True]
                enqueue_ratios.append(te / pe)
                e2e_ratios.append(t2e / p2e)
                print(
                    f"  {cls:<13} round {round_ + 1}: plain enqueue {pe:6.0f}/s e2e {p2e:6.0f}/s"
                    f" | tracked enqueue {te:6.0f}/s e2e {t2e:6.0f}/s"
                )
            summary.append(f"{cls:<14}{spread(enqueue_ratios):>24}{spread(e2e_ratios):>24}")
        print(f"\ntracked/plain   {'enqueue, median (min-max)':>24}{'end to end':>24}")
        print("\n".join(summary))
        if args.kills:
            ttl = 3 * args.interval
            print(
                f"\ncrash to re-enqueue (heartbeat {args.interval:g}s, TTL {ttl:g}s, sweep every "
                f"{args.interval:g}s; bound TTL + interval + a second = "
                f"{ttl + args.interval + 1:g}s):"
            )
            for cls, horse_only, what in (
                ("SimpleWorker", False, "SimpleWorker SIGKILLed"),
                ("Worker", False, "Worker and its horse SIGKILLed"),
                ("Worker", True, "work horse alone SIGKILLed"),
            ):
                latencies = crash_latencies(cls, horse_only, args, workdir, r)
                print(
                    f"  {what:<32} median {statistics.median(latencies):.2f}s  "
                    f"min {min(latencies):.2f}s  max {max(latencies):.2f}s  "
                    f"({len(latencies)} kills)"
                )


if __name__ == "__main__":
    main()
