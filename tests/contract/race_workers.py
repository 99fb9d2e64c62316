"""Code run in child processes by ``test_races`` (a module of its own, so a spawned child
imports only this and jobledger, not the test module).

The children live for the whole test module (spawning one costs about a second on a small
machine) and take one command per test: a database URL, an owner and the jobs to claim.
"""

from __future__ import annotations

from typing import Any

from jobledger.model import CLAIMABLE_STATES, JobState
from jobledger.stores import open_store
from jobledger.stores.base import Transition


def serve_claims(commands: Any, start: Any, results: Any) -> None:
    """For each ``(url, owner, job_ids)`` on ``commands`` (until None): open a store of this
    process's own, wait at the ``start`` barrier with the other children, try to claim every
    job in order, and report ``(owner, ids won)``, or ``(owner, error text)``, on ``results``."""
    while True:
        command = commands.get()
        if command is None:
            return
        url, owner, job_ids = command
        try:
            store = open_store(url)
            store.now()  # connect and check the schema before the gun, so only claims race
            claim = Transition(to=JobState.STARTED, expect=CLAIMABLE_STATES, owner=owner)
            start.wait(60)
            won = [job_id for job_id in job_ids if store.transition(job_id, claim)]
            store.close()
            results.put((owner, won))
        except BaseException as exc:  # the parent must hear of it rather than wait
            results.put((owner, f"{type(exc).__name__}: {exc}"))
