"""The chaos run: real Celery workers, a private PostgreSQL ledger and a private Redis broker,
seeded faults while jobs run, then a verdict on what the ledger and the bodies say.

    scripts/chaos --jobs 3000 --faults 21 --seed 7      # the long run (2-6 minutes)
    scripts/chaos --jobs 400 --faults 9 --seed 3        # what tests/e2e/celery/test_chaos.py runs

Faults (the kinds are dealt round-robin, then shuffled by the seed): SIGKILL of a worker's whole
process group (a killed pod), SIGKILL of one pool child, SIGTERM (warm shutdown, the worker
drains), a SIGKILL and restart of the broker (its append-only file kept), ``pg_ctl restart -m
fast`` of the ledger, and a ledger outage of a few seconds (stop, wait, start). A worker that
exits is started again, as an orchestrator would, under the same instance name (``--new-names``:
a new one each time). Fault *i* fires when the bodies completed reach a seeded fraction of the
jobs (so a slow machine gets the same faults at the same progress), or 30 s after the previous
one if the run stalls, and never within ``MIN_GAP`` of it. The seed fixes the plan (kinds,
order, progress points, targets, down times); what the processes are doing at that instant is
up to the machine.

The verdict, once the faults stopped and the run settled (polled with a deadline): every job
``succeeded`` in the ledger, every body completed at least once, no body started after the
ledger recorded its job succeeded (same host, one clock), nothing left queued/started/staged.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
for _path in (str(HERE), str(ROOT / "src"), str(ROOT / "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import redis  # noqa: E402
from chaosapp import DONE, EVENTS, make_app  # noqa: E402
from harness import spawn_worker  # noqa: E402
from services import PrivatePostgres, PrivateRedis  # noqa: E402

from jobledger.config import Settings  # noqa: E402
from jobledger.model import JobRecord, JobState  # noqa: E402
from jobledger.query import JobQuery  # noqa: E402
from jobledger.stores.sql import SQLStore  # noqa: E402
from jobledger.testing.contract.processes import WorkerProcess  # noqa: E402

#: The test's own store of starts and completions: the machine's main Redis, never restarted.
COUNTS_URL = os.environ.get("JOBLEDGER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
KINDS = (
    "worker_sigkill",
    "child_sigkill",
    "worker_sigterm",
    "broker_restart",
    "ledger_restart",
    "ledger_outage",
)
STUCK = frozenset({JobState.QUEUED, JobState.STARTED, JobState.STAGED, JobState.RETRYING})
#: Heartbeat 1 s, TTL 3 s, sweep 1 s: the shortest settings an e2e run may use (TTL >= 3 s).
LEDGER_ENV = {
    "JOBLEDGER_HEARTBEAT_INTERVAL": "1",
    "JOBLEDGER_HEARTBEAT_TTL": "3",
    "JOBLEDGER_RECOVERY_INTERVAL": "1",
}
DRAIN_TIMEOUT = 60.0
STALL_TIMEOUT = 30.0
#: Log lines shown in a failing job's history.
HISTORY_LINES = 15
#: Faults are at least this far apart, so that each one is a fault of its own.
MIN_GAP = 1.0


@dataclass
class Config:
    jobs: int = 400
    faults: int = 9
    seed: int = 1
    workers: int = 3
    concurrency: int = 2
    new_names: bool = False
    settle_timeout: float = 120.0
    keep: bool = False

    def command(self) -> str:
        names = " --new-names" if self.new_names else ""
        return (
            f"scripts/chaos --jobs {self.jobs} --faults {self.faults} --seed {self.seed}"
            f" --workers {self.workers}{names}"
        )


@dataclass
class Fault:
    kind: str
    at_fraction: float  # of the jobs completed
    target: int  # worker slot (worker kinds)
    down: float  # seconds a broker or ledger stays down


def plan(config: Config) -> tuple[list[float], list[Fault]]:
    """The seeded part of a run: each job's body time and the faults, in order."""
    rng = random.Random(config.seed)
    seconds = [round(rng.uniform(0.05, 0.4), 3) for _ in range(config.jobs)]
    kinds = [KINDS[i % len(KINDS)] for i in range(config.faults)]
    rng.shuffle(kinds)
    points = sorted(rng.uniform(0.03, 0.85) for _ in kinds)
    faults = [
        Fault(kind, point, rng.randrange(config.workers), round(rng.uniform(1.0, 5.0), 2))
        for kind, point in zip(kinds, points, strict=True)
    ]
    return seconds, faults


@dataclass
class Slot:
    """One worker's place, as a pod in a deployment: restarted whenever its process exits."""

    index: int
    name: str
    worker: WorkerProcess | None = None
    incarnation: int = 0
    expect_exit: bool = False
    term_sent: float | None = None


@dataclass
class Verdict:
    jobs: int
    states: Counter[str]
    not_succeeded: list[str]
    never_completed: list[str]
    ran_after_success: list[str]
    stuck: list[str]
    duplicate_starts: int
    starts: int
    completions: int
    settle_seconds: float | None
    figures: dict[str, int] = field(default_factory=dict)
    histories: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.not_succeeded or self.never_completed or self.ran_after_success or self.stuck
        )


class ChaosRun:
    """One run: :meth:`run` builds everything, injects the faults, settles, judges, cleans up."""

    def __init__(self, config: Config, say: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = say
        self.seconds, self.faults = plan(config)
        self.prefix = f"jl-chaos-{uuid.uuid4().hex[:10]}:"
        self.queue = f"chaos-{uuid.uuid4().hex[:6]}"
        self.figures: Counter[str] = Counter()
        self.workdir = Path(tempfile.mkdtemp(prefix="jl-chaos-"))
        self.workdir.chmod(0o755)  # the postgres user must reach its cluster under it
        (self.workdir / "logs").mkdir()
        self.ledger = PrivatePostgres(self.workdir)
        self.broker = PrivateRedis(self.workdir)
        self.counts = redis.Redis.from_url(COUNTS_URL)
        self.slots = [Slot(i, f"w{i + 1}") for i in range(config.workers)]
        self.slots_lock = threading.Lock()
        self.stopping = threading.Event()
        self.started = time.time()
        self.ids: list[str] = []

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> Verdict:
        self.say(f"chaos: seed {self.config.seed}; replay with: {self.config.command()}")
        self.say(f"chaos: logs and servers under {self.workdir}")
        with contextlib.ExitStack() as stack:
            stack.callback(self._clean_up)
            stack.enter_context(self._client_log())
            self.ledger.init()
            self.ledger.start()
            self.store = SQLStore(self.ledger.url)
            stack.callback(self.store.close)
            self.store.migrate()
            self.broker.start()
            self.app, self.integration = make_app(
                self.broker.url, self.queue, COUNTS_URL, self.prefix,
                Settings(database_url=self.ledger.url, instance_name="client"),
            )  # fmt: skip
            stack.callback(self.integration.close)
            for slot in self.slots:
                self._spawn(slot)
            for slot in self.slots:
                self._wait_ready(slot)
            keeper = threading.Thread(target=self._keep_workers, daemon=True)
            keeper.start()
            stack.callback(keeper.join, 10)
            stack.callback(self.stopping.set)
            self.started = time.time()
            publisher = threading.Thread(target=self._publish, daemon=True)
            publisher.start()
            self._inject()
            publisher.join()
            calm = time.time()
            settle = self._settle(calm)
            verdict = self._judge(settle)
            self.say(self.summary(verdict))
            if not verdict.ok:
                self.config.keep = True
        return verdict

    @contextlib.contextmanager
    def _client_log(self) -> Iterator[None]:
        """The publishing side's jobledger warnings (hundreds of "published but not recorded"
        during a ledger outage) go to logs/client.log, beside the workers' logs."""
        logger = logging.getLogger("jobledger")
        handler = logging.FileHandler(self.workdir / "logs" / "client.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/client] %(message)s"))
        propagate, level = logger.propagate, logger.level
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.propagate, logger.level = propagate, level
            handler.close()

    def _spawn(self, slot: Slot) -> None:
        slot.incarnation += 1
        if self.config.new_names and slot.incarnation > 1:
            slot.name = f"w{slot.index + 1}r{slot.incarnation - 1}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
        env.update(
            LEDGER_ENV,
            PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT / "src")]),
            PYTHONUNBUFFERED="1",  # a SIGKILL must not eat the log lines that explain it
            CHAOS_BROKER=self.broker.url,
            CHAOS_QUEUE=self.queue,
            CHAOS_COUNTS_URL=COUNTS_URL,
            CHAOS_PREFIX=self.prefix,
            JOBLEDGER_DATABASE_URL=self.ledger.url,
            JOBLEDGER_INSTANCE_NAME=slot.name,
        )
        log = self.workdir / "logs" / f"w{slot.index + 1}.{slot.incarnation}.log"
        slot.worker = spawn_worker(
            "chaosworker", slot.name, self.queue, self.config.concurrency, self.workdir, env, log
        )
        slot.expect_exit, slot.term_sent = False, None

    def _wait_ready(self, slot: Slot) -> None:
        deadline = time.monotonic() + 60
        assert slot.worker is not None
        while "ready." not in slot.worker.output():
            if slot.worker.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {slot.name} did not start:\n{slot.worker.output()}")
            time.sleep(0.1)

    def _keep_workers(self) -> None:
        """The orchestrator: a worker that exited is started again; one that was sent SIGTERM
        and has not drained within ``DRAIN_TIMEOUT`` is killed (and counted)."""
        while not self.stopping.wait(0.2):
            with self.slots_lock:
                for slot in self.slots:
                    worker = slot.worker
                    assert worker is not None
                    if worker.proc.poll() is None:
                        if slot.term_sent and time.monotonic() - slot.term_sent > DRAIN_TIMEOUT:
                            self.figures["drain timeouts (SIGKILLed)"] += 1
                            worker.kill()
                        continue
                    if not slot.expect_exit:
                        self.figures["unexpected worker exits"] += 1
                        self.say(f"chaos: {slot.name} exited by itself ({worker.proc.returncode})")
                    self._spawn(slot)

    def _publish(self) -> None:
        """Publish every job, retrying one the broker refused (an application that gets an
        error back knows its job was not accepted, and sends it again under the same id)."""
        for seconds in self.seconds:
            job_id = str(uuid.uuid4())
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.app.send_task("chaos.work", args=[seconds], task_id=job_id)
                    break
                except Exception as exc:
                    self.figures["publish retries"] += 1
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"could not publish {job_id} for 60 s: {exc}") from exc
                    time.sleep(0.2)
            self.ids.append(job_id)

    def _done(self) -> int:
        return int(self.counts.get(DONE.format(prefix=self.prefix)) or 0)

    def _inject(self) -> None:
        last = time.monotonic()
        for number, fault in enumerate(self.faults, 1):
            threshold = fault.at_fraction * self.config.jobs
            while time.monotonic() - last < MIN_GAP or (
                self._done() < threshold and time.monotonic() - last < STALL_TIMEOUT
            ):
                time.sleep(0.1)
            what = self._fire(fault)
            self.figures[fault.kind] += 1
            self.say(
                f"chaos: fault {number}/{len(self.faults)} at {self._done()} done,"
                f" t+{time.time() - self.started:.1f}s: {what}"
            )
            last = time.monotonic()

    def _fire(self, fault: Fault) -> str:
        if fault.kind == "broker_restart":
            self.broker.kill()
            time.sleep(fault.down)  # the fault's own length, not a wait for a condition
            self.broker.start()
            return f"broker SIGKILLed, down {fault.down}s, started on its AOF"
        if fault.kind == "ledger_restart":
            self.ledger.restart()
            return "ledger pg_ctl restart -m fast"
        if fault.kind == "ledger_outage":
            self.ledger.stop()
            time.sleep(fault.down)
            self.ledger.start()
            return f"ledger stopped for {fault.down}s"
        with self.slots_lock:
            slot = self._target(fault.target)
            worker = slot.worker
            assert worker is not None
            if fault.kind == "worker_sigkill":
                slot.expect_exit = True
                worker.kill(signal.SIGKILL)
                return f"SIGKILL of {slot.name} (pid {worker.proc.pid}, whole group)"
            if fault.kind == "worker_sigterm":
                slot.expect_exit, slot.term_sent = True, time.monotonic()
                worker.warm_shutdown()
                return f"SIGTERM of {slot.name} (pid {worker.proc.pid})"
        child = self._pool_child(fault.target)
        if child is None:
            return "SIGKILL of a pool child: no worker had one (counted anyway)"
        name, pid = child
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return f"SIGKILL of pool child {pid} of {name}"

    def _target(self, wanted: int, ready: bool = False) -> Slot:
        """The planned slot, or the next one that is up and not already shutting down (and,
        with ``ready``, done booting: Celery gives up when a pool child dies at its start)."""
        for offset in range(len(self.slots)):
            slot = self.slots[(wanted + offset) % len(self.slots)]
            worker = slot.worker
            up = worker is not None and worker.proc.poll() is None and not slot.expect_exit
            if up and (not ready or "ready." in worker.output()):
                return slot
        return self.slots[wanted]

    def _pool_child(self, wanted: int) -> tuple[str, int] | None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.slots_lock:
                slot = self._target(wanted, ready=True)
                assert slot.worker is not None
                pid = slot.worker.proc.pid
                with contextlib.suppress(OSError):
                    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                    if children:
                        return slot.name, int(sorted(children)[0])
            time.sleep(0.1)
        return None

    def _settle(self, calm: float) -> float | None:
        """Seconds from the end of the faults until every job succeeded in the ledger and every
        body completed, or None at the deadline."""
        everything = frozenset(self.ids)
        succeeded = JobQuery(states=frozenset({JobState.SUCCEEDED}))
        while time.time() - calm < self.config.settle_timeout:
            with contextlib.suppress(Exception):  # a ledger still coming back: ask again
                if self.store.count(succeeded) == len(everything):
                    done = {e.split()[1] for e in self._events() if e.startswith("done ")}
                    if everything <= done:
                        return time.time() - calm
            time.sleep(0.5)
        return None

    def _events(self) -> list[str]:
        raw = self.counts.lrange(EVENTS.format(prefix=self.prefix), 0, -1)
        return [e.decode() for e in raw]

    # -- the verdict --------------------------------------------------------------------------
    def _judge(self, settle: float | None) -> Verdict:
        jobs: dict[str, JobRecord] = {j.id: j for j in self.store.iter_jobs(JobQuery())}
        starts: dict[str, list[tuple[float, str]]] = defaultdict(list)
        completions: Counter[str] = Counter()
        for event in self._events():
            phase, job_id, at, instance = event.split()
            if phase == "start":
                starts[job_id].append((float(at), instance))
            else:
                completions[job_id] += 1
        states = Counter(jobs[i].state.value if i in jobs else "missing" for i in self.ids)
        not_succeeded = [
            i for i in self.ids if i not in jobs or jobs[i].state is not JobState.SUCCEEDED
        ]
        late = []
        for job_id in self.ids:
            job = jobs.get(job_id)
            if (
                job is not None
                and job.state is JobState.SUCCEEDED
                and job.finished_at
                and any(at > job.finished_at.timestamp() for at, _ in starts[job_id])
            ):
                late.append(job_id)
        verdict = Verdict(
            jobs=len(self.ids),
            states=states,
            not_succeeded=not_succeeded,
            never_completed=[i for i in self.ids if not completions[i]],
            ran_after_success=late,
            stuck=[i for i in self.ids if i in jobs and jobs[i].state in STUCK],
            duplicate_starts=sum(1 for i in self.ids if len(starts[i]) > 1),
            starts=sum(len(s) for s in starts.values()),
            completions=sum(completions.values()),
            settle_seconds=settle,
            figures=dict(self.figures),
        )
        shown: set[str] = set()
        messages = self._messages()
        for title, ids in (
            ("ran after success", late),
            ("not succeeded", not_succeeded),
            ("never completed", verdict.never_completed),
        ):
            for job_id in [i for i in ids if i not in shown][:4]:
                shown.add(job_id)
                history = self._history(title, job_id, jobs.get(job_id), starts[job_id])
                where = messages.get(job_id, "no message")
                verdict.histories.append(
                    f"{history[0]}\n  bodies: completed {completions[job_id]}x; broker: {where}"
                    + "".join(f"\n{line}" for line in history[1:])
                )
        return verdict

    def _messages(self) -> dict[str, str]:
        """Where the broker holds each job's message now: waiting in the queue, or delivered
        to a consumer and not acknowledged (Redis restores those after its visibility
        timeout)."""
        found: dict[str, str] = {}
        client = redis.Redis.from_url(self.broker.url)
        with contextlib.closing(client):
            held = [("in the queue", m) for m in client.lrange(self.queue, 0, -1)]
            held += [("unacked", m) for m in client.hvals("unacked")]
        for where, message in held:
            text = message.decode(errors="replace")
            for job_id in self.ids:  # a few messages at most once the run settled
                if job_id in text:
                    found[job_id] = where if job_id not in found else f"{found[job_id]}, {where}"
        return found

    def _history(
        self, title: str, job_id: str, job: JobRecord | None, starts: list[tuple[float, str]]
    ) -> list[str]:
        def rel(at: float | None) -> str:
            return "-" if at is None else f"t+{at - self.started:.2f}s"

        lines = [f"[{title}] {job_id}"]
        if job is None:
            lines.append("  ledger: no record")
        else:
            stamp = {
                name: rel(value.timestamp() if value else None)
                for name, value in (
                    ("queued", job.queued_at),
                    ("started", job.started_at),
                    ("finished", job.finished_at),
                    ("recovered", job.recovered_at),
                )
            }
            lines.append(
                f"  ledger: {job.state.value}, attempts {job.attempts}, recoveries"
                f" {job.recoveries}, owner {job.owner}, "
                + ", ".join(f"{k} {v}" for k, v in stamp.items())
            )
        body = ", ".join(f"start {rel(at)} on {who}" for at, who in starts) or "never started"
        lines.append(f"  runs: {body}")
        logged = sorted(  # every log line starts with its time: one timeline over all logs
            (line.strip(), log.stem)
            for log in (self.workdir / "logs").glob("*.log")
            for line in log.read_text(errors="replace").splitlines()
            if job_id in line
        )
        if len(logged) > HISTORY_LINES:  # the first lines and the last ones tell the story
            head, tail = HISTORY_LINES // 3, HISTORY_LINES - HISTORY_LINES // 3
            skipped = [(f"... {len(logged) - HISTORY_LINES} more lines ...", "")]
            logged = logged[:head] + skipped + logged[-tail:]
        lines += [f"  {stem}{': ' if stem else ''}{line[:240]}" for line, stem in logged]
        return lines

    def summary(self, verdict: Verdict) -> str:
        config = self.config
        kinds = ", ".join(f"{k} {verdict.figures.get(k, 0)}" for k in KINDS)
        others = ", ".join(f"{k} {v}" for k, v in sorted(verdict.figures.items()) if k not in KINDS)
        settle = (
            f"{verdict.settle_seconds:.1f} s"
            if verdict.settle_seconds is not None
            else f"did not settle within {config.settle_timeout:g} s"
        )
        failed = [
            f"{len(ids)} {what}"
            for what, ids in (
                ("not succeeded", verdict.not_succeeded),
                ("never completed", verdict.never_completed),
                ("ran after success", verdict.ran_after_success),
                ("stuck", verdict.stuck),
            )
            if ids
        ]
        lines = [
            "=" * 30 + " chaos summary " + "=" * 30,
            f"seed {config.seed}: {verdict.jobs} jobs, {len(self.faults)} faults, "
            f"{config.workers} workers x prefork {config.concurrency}, "
            f"{'new names' if config.new_names else 'same names'} on restart",
            f"faults: {kinds}",
            "ledger: " + ", ".join(f"{k} {v}" for k, v in sorted(verdict.states.items())),
            f"bodies: {verdict.starts} starts, {verdict.completions} completions; "
            f"jobs started more than once: {verdict.duplicate_starts}; "
            f"never completed: {len(verdict.never_completed)}",
            f"runs after success: {len(verdict.ran_after_success)}",
            f"stuck (queued/started/staged/retrying): {len(verdict.stuck)}",
            f"time to settle after the last fault: {settle}",
            f"other: {others or 'none'}",
            "verdict: " + ("PASS" if verdict.ok else "FAIL (" + ", ".join(failed) + ")"),
            f"replay: {config.command()}",
            *verdict.histories,
            "=" * 75,
        ]
        return "\n".join(lines)

    def _clean_up(self) -> None:
        self.stopping.set()
        with self.slots_lock:
            for slot in self.slots:
                if slot.worker is not None:
                    slot.worker.kill(signal.SIGKILL)
            for slot in self.slots:
                if slot.worker is not None:
                    with contextlib.suppress(Exception):
                        slot.worker.wait(10)
        self.broker.close()
        self.ledger.close()
        with contextlib.suppress(redis.RedisError):
            self.counts.delete(EVENTS.format(prefix=self.prefix), DONE.format(prefix=self.prefix))
        self.counts.close()
        if self.config.keep:
            self.say(f"chaos: kept {self.workdir} (worker logs in logs/, server logs beside)")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="jobs published (3000)")
    parser.add_argument("--faults", type=int, default=21, help="faults injected (21)")
    parser.add_argument("--seed", type=int, default=None, help="the plan's seed (random)")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool children each (2)")
    parser.add_argument(
        "--new-names", action="store_true", help="restart workers under new instance names"
    )
    parser.add_argument(
        "--settle-timeout", type=float, default=180.0, help="seconds to settle (180)"
    )
    parser.add_argument("--keep", action="store_true", help="keep logs and data directories")
    args = parser.parse_args(argv)
    for name in ("jobs", "workers", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.faults < 0 or args.settle_timeout <= 0:
        parser.error("--faults must be 0 or more and --settle-timeout positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    return Config(
        jobs=args.jobs,
        faults=args.faults,
        seed=seed,
        workers=args.workers,
        concurrency=args.concurrency,
        new_names=args.new_names,
        settle_timeout=args.settle_timeout,
        keep=args.keep,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when the verdict passes, 1 when it fails, 2 on bad arguments."""
    config = parse_args(argv)
    try:
        verdict = ChaosRun(config).run()
    except KeyboardInterrupt:
        return 130
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
