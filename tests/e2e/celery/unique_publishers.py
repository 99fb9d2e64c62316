"""Code run in the publishing processes of ``test_unique_race`` (a module of its own, so a
spawned child imports only this, the e2e app and jobledger, not the test module)."""

from __future__ import annotations

import time
from typing import Any

from e2eapp import make_app

from jobledger.config import Settings

KEY = "report:2026"


def publish_one_key(
    broker: str, queue: str, url: str, n: int, times: int, start: Any, results: Any
) -> None:
    """Build the e2e app in this process (its own ledger and broker connections), wait at
    the ``start`` barrier with the other publishers, then ``apply_async(unique_key=KEY)``
    ``times`` times and report ``(n, ids returned, first start, last end)`` on ``results``,
    or ``(n, error text, 0, 0)``."""
    try:
        app, integration = make_app(
            broker, queue, Settings(database_url=url, instance_name=f"p{n}")
        )
        task = app.tasks["e2e.work"]
        integration.store.now()  # connect and check the ledger before the gun
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)
        start.wait(120)
        began = time.time()
        ids = [str(task.apply_async((n, i), unique_key=KEY).id) for i in range(times)]
        results.put((n, ids, began, time.time()))
        integration.close()
    except BaseException as exc:  # the parent must hear of it rather than wait
        results.put((n, f"{type(exc).__name__}: {exc}", 0.0, 0.0))
