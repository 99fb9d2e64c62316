"""``jobledger demo``: a real Celery worker is SIGKILLed mid-batch and no job is lost.

No server is needed: the broker is kombu's filesystem transport in a temporary directory and the
ledger a SQLite file (``--broker redis://…`` and ``--database-url postgresql://…`` use real
ones). The story: worker-a starts and takes a batch; it is killed with SIGKILL (main process
and pool) while it runs some jobs; worker-b starts, its recovery sweep finds worker-a silent
past the heartbeat TTL and publishes the jobs it held again, same ids; every job ends
``succeeded`` and the recovered ones are named. The last line says whether that held.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.table import Table

from jobledger.config import Settings
from jobledger.demo_worker import TASK, make_app  # Celery: `jobledger demo` names the extra
from jobledger.model import JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.stores import open_store
from jobledger.testing import wait_for

console = Console(highlight=False, soft_wrap=True)
T = TypeVar("T")

#: Heartbeat interval of the demo's workers (TTL 3x): short, so the story takes seconds.
INTERVAL = 0.5
#: Seconds each demo job runs.
JOB_SECONDS = 1.0
#: How long the demo waits for any one step before it gives up.
STEP_TIMEOUT = 40.0


class DemoFailed(Exception):
    """A step of the demo did not happen in time."""


class _Worker:
    """One ``celery worker`` process group of the demo."""

    def __init__(self, name: str, env: dict[str, str], queue: str, log: Path) -> None:
        self.name = name
        self.log = log
        command = [
            sys.executable, "-m", "celery", "-A", "jobledger.demo_worker", "worker",
            "-P", "prefork", "-c", "2", "-Q", queue, "-n", f"{name}@%h",
            "--loglevel=WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                command,
                env={**env, "JOBLEDGER_INSTANCE_NAME": name},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise DemoFailed(f"{self.name} exited ({self.proc.returncode}):\n{tail}")
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM to the main process), SIGKILL to the group if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        self.kill()


def run_demo(database_url: str | None = None, broker: str | None = None, jobs: int = 10) -> bool:
    """Run the story; True if every job succeeded and the killed worker's jobs were recovered."""
    workdir = Path(tempfile.mkdtemp(prefix="jobledger-demo-"))
    folder = workdir / "broker"
    folder.mkdir()
    keep_dir = database_url is None
    database_url = database_url or f"sqlite:///{workdir / 'ledger.db'}"
    broker = broker or "filesystem://"
    queue = f"jobledger-demo-{uuid.uuid4().hex[:8]}"
    store = open_store(database_url)
    store.migrate()
    settings = Settings.from_env(
        database_url=database_url,
        instance_name="demo-client",
        heartbeat_interval=INTERVAL,
        recovery_interval=INTERVAL,
    )
    app, integration = make_app(broker, str(folder), queue, settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBLEDGER_")}
    env.update(
        JOBLEDGER_DATABASE_URL=database_url,
        JOBLEDGER_HEARTBEAT_INTERVAL=str(INTERVAL),
        JOBLEDGER_RECOVERY_INTERVAL=str(INTERVAL),
        JOBLEDGER_JOURNAL_DIR=str(workdir / "journal"),  # not in the caller's directory
        JLDEMO_BROKER=broker,
        JLDEMO_FOLDER=str(folder),
        JLDEMO_QUEUE=queue,
    )
    workers: list[_Worker] = []

    def start(name: str) -> _Worker:
        worker = _Worker(name, env, queue, workdir / f"{name}.log")
        workers.append(worker)
        wait_for(
            f"{name} to register",
            lambda: worker.alive() and any(i.name == name for i in store.instances(60)),
        )
        return worker

    def held_by(name: str) -> set[str]:
        started = store.iter_jobs(
            JobQuery(states=frozenset({JobState.STARTED}), queues=frozenset({queue}))
        )
        return {j.id for j in started if j.owner and j.owner.split(":")[0] == name}

    def succeeded() -> int:
        query = JobQuery(states=frozenset({JobState.SUCCEEDED}), queues=frozenset({queue}))
        return store.count(query)

    shown = "filesystem transport in " + str(folder) if broker == "filesystem://" else broker
    console.print("[bold]jobledger demo[/bold]: a Celery worker is killed mid-batch")
    console.print(f"  broker: {shown}\n  ledger: {store.safe_url}\n")
    ok = False
    try:
        began = time.monotonic()
        console.print("1. worker-a starts (2 pool processes)")
        victim = start("worker-a")
        ids = [app.send_task(TASK, args=[n, JOB_SECONDS]).id for n in range(jobs)]
        number = {job_id: n for n, job_id in enumerate(ids)}
        console.print(f"2. {jobs} jobs enqueued: {TASK}(0..{jobs - 1}), {JOB_SECONDS:.0f}s each")
        wait_for(
            "worker-a to be mid-batch",
            lambda: victim.alive() and succeeded() >= 2 and len(held_by("worker-a")) >= 2,
        )
        victim.kill()
        held = held_by("worker-a")  # read after the kill: nothing more finishes there
        console.print(
            f"3. [red]SIGKILL[/red] to worker-a and its pool after {succeeded()} jobs, while it "
            f"ran {', '.join(f'#{number[i]}' for i in sorted(held, key=lambda i: number[i]))}"
        )
        console.print(
            f"4. worker-b starts; once worker-a is silent for {3 * INTERVAL:.1f}s (its TTL) "
            "the recovery sweep publishes the jobs it held again, same ids"
        )
        start("worker-b")
        wait_for(f"all {jobs} jobs to succeed", lambda: succeeded() == jobs)
        records = {r.id: r for r in store.iter_jobs(JobQuery(queues=frozenset({queue})))}
        _print_jobs(ids, records)
        recovered = [i for i in ids if records[i].recoveries]
        ok = held <= set(recovered) and succeeded() == jobs
        names = ", ".join(f"#{number[i]} {i}" for i in recovered) or "none"
        console.print(
            f"\noutcome: {'ok' if ok else 'FAILED'}: {succeeded()}/{jobs} jobs succeeded in "
            f"{time.monotonic() - began:.1f}s; {len(recovered)} recovered from the killed "
            f"worker: {names}"
        )
    except (DemoFailed, TimeoutError) as exc:
        console.print(f"\noutcome: FAILED: {exc}")
    finally:
        for worker in workers:
            worker.stop()
        if broker != "filesystem://":  # leave nothing behind on a real broker
            with contextlib.suppress(Exception), app.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
        integration.close()
        store.close()
        shutil.rmtree(folder, ignore_errors=True)
        if keep_dir:
            console.print(
                f"\nThe ledger stays in {database_url}: try "
                f"`{cli_command()} jobs --database-url {shlex.quote(database_url)}`."
            )
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return ok


def cli_command() -> str:
    """How to run this jobledger from the user's shell: ``jobledger`` when that name on the
    PATH is this very installation, else the script's full path (a virtualenv's ``bin`` that
    is not on the PATH), else ``python -m jobledger`` with this interpreter."""
    script = Path(sys.executable).with_name("jobledger")
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m jobledger"
    found = shutil.which("jobledger")
    if found is not None and Path(found).resolve() == script.resolve():
        return "jobledger"
    return shlex.quote(str(script))


def _print_jobs(ids: list[str], records: dict[str, JobRecord]) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("#", "JOB ID", "STATE", "RAN ON", "ATTEMPTS", "RECOVERED"):
        table.add_column(column)
    for n, job_id in enumerate(ids):
        job = records[job_id]
        table.add_row(
            str(n),
            job_id,
            job.state.value,
            (job.owner or "-").split(":")[0],
            str(job.attempts),
            "[yellow]yes[/yellow]" if job.recoveries else "",
        )
    console.print()
    console.print(table)
