"""Clients and ledger rows for the outbox tests.

- :func:`cut_off_client`: a second client process's view of the test app whose broker is
  unreachable, so its fast path fails at every commit and leaves its jobs to the workers' relay
  (the client's network to the broker is down; the workers' is fine).
- :func:`insert_staged`: committed staged jobs that no fast path will publish (a client that
  crashed right after its commit): the rows staging writes, in one bulk INSERT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from celery import Celery
from sqlalchemy import insert

from jobledger.config import Settings
from jobledger.integrations.celery import CeleryIntegration
from jobledger.integrations.celery_staging import staged_record
from jobledger.model import JobRecord
from jobledger.stores.rows import creation_row
from jobledger.stores.schema import jobs
from jobledger.stores.sql import SQLStore


def cut_off_client(broker: str, queue: str, settings: Settings) -> CeleryIntegration:
    """The test app's ``e2e.work`` (same signature, no body) and a Celery integration for it
    publishing to ``broker`` (a port nobody listens on); stage with its own ``.stage()``. It is
    not installed (no signal receivers, not in the registry, not the app's integration for
    ``task.stage``): this process's own client is, and stays so."""
    app = Celery("outbox-cut-off", broker=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue, task_ignore_result=True)

    @app.task(name="e2e.work", bind=True, tracked=True, shared=False)
    def work(self: Any, n: int, seconds: float = 0.0) -> int:
        raise AssertionError("e2e.work runs in the workers only")

    return CeleryIntegration(app, settings)


def staged_records(app: Celery, count: int, seconds: float = 0.0) -> list[JobRecord]:
    """``count`` staged ``e2e.work`` jobs, as :meth:`CeleryIntegration.stage` builds them."""
    return [staged_record(app, "e2e.work", [i], {"seconds": seconds}, {}) for i in range(count)]


def insert_staged(store: SQLStore, records: Iterable[JobRecord]) -> list[str]:
    """Commit these staged records in one transaction, staged now (the database's clock, read
    once), with no fast path after the commit; their ids."""
    now = datetime.fromtimestamp(store.now(), tz=timezone.utc)
    rows = [
        creation_row(dataclasses.replace(r, created_at=now, staged_at=now, updated_at=now), None)
        for r in records
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(jobs), rows)
    return [row["id"] for row in rows]
