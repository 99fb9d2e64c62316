"""One relay process for the parallel-relay test: ``python outbox_relay.py --broker URL --ready F
--go F --out F``, the ledger from ``JOBLEDGER_DATABASE_URL``.

It publishes with the real Celery integration of a bare app on ``--broker`` (what ``jobledger
relay --broker`` runs), but waits at a start line (``--go`` appears) after connecting, so that
every relay of the test starts at the same moment, and keeps taking batches until nothing is
staged (``run_once`` ends its pass at a short batch, which other relays holding the rest make
likely). A ledger error ends a pass and the next one starts, as in a
:class:`~jobledger.runtime.service.Loop`
(the relay thread of workers and ``jobledger relay``). It writes what each of its publishes did,
with the time window the batch was held across, and the ledger errors, to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobledger.config import Settings
from jobledger.errors import JobLedgerError
from jobledger.integrations.base import Published
from jobledger.integrations.celery import install_for_broker
from jobledger.model import JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.relay import Relay
from jobledger.stores import store_for

STAGED = JobQuery(states=frozenset({JobState.STAGED}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--ready", required=True, type=Path)
    parser.add_argument("--go", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args()

    settings = Settings.from_env()
    integration = install_for_broker(args.broker, settings)
    store = store_for(settings)
    batches: list[dict[str, Any]] = []

    def publish(records: Sequence[JobRecord]) -> Published:
        started = time.time()  # the batch is held from before this until after the return
        done = integration.publish_many(records)
        batches.append(
            {
                "start": started,
                "end": time.time(),
                "records": len(records),
                "published": len(done.ids),
                "error": None if done.error is None else str(done.error),
            }
        )
        return done

    relay = Relay(
        store, publish=publish, grace=0.0, batch_size=settings.relay_batch_size, systems={"celery"}
    )
    store.count(STAGED)  # the ledger connection is open before the start line
    with integration.app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=3)
    args.ready.touch()
    deadline = time.monotonic() + args.deadline
    while not args.go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("no start signal")
        time.sleep(0.005)

    passes = errors = 0
    ledger_errors: list[str] = []
    while store.count(STAGED) and time.monotonic() < deadline:
        passes += 1
        try:
            report = relay.run_once()
        except JobLedgerError as exc:  # what the relay loop does: log it, try again
            ledger_errors.append(str(exc))
            continue
        if report.error is not None:
            errors += 1
        if not report.batches:
            time.sleep(0.01)  # the rest is held by other relays (or, on SQLite, the lock)
    result = {
        "pid": os.getpid(),
        "passes": passes,
        "errors": errors,
        "ledger_errors": ledger_errors,
        "published": sum(b["published"] for b in batches),
        "batches": batches,
    }
    args.out.write_text(json.dumps(result))
    store.close()


if __name__ == "__main__":
    main()
