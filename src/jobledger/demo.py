"""``jobledger demo``: a short scripted tour of the ledger and its CLI, no server needed.

It plays two worker instances on a throwaway SQLite ledger: one finishes its jobs, one fails a
job for good and then dies holding another. Then it runs the CLI a person would use to find the
stuck jobs and restart them. (A real queue system joins the demo with its integration.)
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass, field

from rich.console import Console
from rich.rule import Rule

from jobledger.integrations.base import registry
from jobledger.lifecycle import Lifecycle
from jobledger.model import Instance, JobRecord
from jobledger.stores.sql import SQLStore

console = Console(highlight=False)


@dataclass
class PrintingIntegration:
    """Stands in for a queue system in the demo: "publishing" prints the job."""

    system: str = "demo"
    published: list[str] = field(default_factory=list)

    def publish(self, record: JobRecord) -> None:
        console.print(f"  [dim]→ published {record.name}{tuple(record.args)} as {record.id}[/dim]")
        self.published.append(record.id)


def run_demo(database_url: str | None = None) -> None:
    """Fill a ledger with a small story, then show it through the CLI."""
    from jobledger.cli import app

    if database_url is None:
        path = os.path.join(tempfile.mkdtemp(prefix="jobledger-demo-"), "ledger.db")
        database_url = f"sqlite:///{path}"
    store = SQLStore(database_url)
    store.migrate()
    registry.register(PrintingIntegration())

    def job(name: str, *args: object, queue: str = "default", **kwargs: object) -> str:
        job_id = str(uuid.uuid4())
        store.create(
            JobRecord(
                id=job_id,
                name=name,
                system="demo",
                queue=queue,
                args=list(args),
                kwargs=dict(kwargs),
                tags={"demo": True},
            )
        )
        return job_id

    alive = Instance(name="worker-a", nonce=uuid.uuid4().hex[:8], hostname="demo", pid=1)
    doomed = Instance(name="worker-b", nonce=uuid.uuid4().hex[:8], hostname="demo", pid=2)
    for instance in (alive, doomed):
        store.heartbeat(instance)
    a = Lifecycle(store, alive.id, ttl=30)
    b = Lifecycle(store, doomed.id, ttl=30)

    console.print(Rule("1. the application enqueues jobs; each gets a ledger row first"))
    emails = [job("send_email", f"user{i}@example.com", template="welcome") for i in range(5)]
    report = job("build_report", 2026, 11, queue="reports", model_id=4242)
    invoice = job("charge_invoice", "inv_100%_off", queue="billing")
    waiting = job("resize_image", "cat.png", queue="media", width=640)
    console.print(f"  {len(emails) + 3} jobs recorded as queued")

    console.print(
        Rule("2. worker-a runs the emails; worker-b fails a charge, then dies mid-report")
    )
    for job_id in emails:
        a.claim(job_id)
        a.succeed(job_id)
    b.claim(invoice)
    b.fail(invoice, "CardDeclined: insufficient funds", will_retry=False)
    b.claim(report)
    store.deregister(doomed.id)  # as good as a worker that stopped beating
    console.print("  worker-b is gone while holding build_report: that job is now an orphan")

    def cli(*args: str) -> None:
        console.print(f"\n[bold]$ jobledger {' '.join(args)}[/bold]")
        app([*args, "--database-url", database_url], standalone_mode=False)

    console.print(Rule("3. what a person sees"))
    cli("stats")
    cli("jobs", "--limit", "10")
    cli("jobs", "--match", "4242")
    cli("jobs", "--match", "100%")
    cli("show", invoice)
    cli("durations")
    cli("instances")

    console.print(Rule("4. restart what is stuck: the failed charge, the orphan, the waiting job"))
    cli("restart", "--state", "failed", "--dry-run")
    cli("restart", invoice, report, waiting)
    cli("jobs", "--state", "queued")
    console.print(f"\nThe ledger is in {database_url} — try `jobledger jobs --database-url ...`.")
