"""Code run in child processes by ``test_races`` (a module of its own, so a spawned child
imports only this and jobledger, not the test module).

The children live for the whole test module (spawning one costs about a second on a small
machine) and take one command per test: a database URL, an owner, the jobs to claim (or to
create with one unique key).
"""

from __future__ import annotations

from typing import Any

from jobledger.errors import UniqueKeyHeld
from jobledger.model import CLAIMABLE_STATES, JobRecord, JobState
from jobledger.stores import Store, open_store
from jobledger.stores.base import Transition


def serve_claims(commands: Any, start: Any, results: Any) -> None:
    """For each ``(url, owner, job_ids, unique_key)`` on ``commands`` (until None): open a
    store of this process's own, wait at the ``start`` barrier with the other children, then
    try to claim every job in order (``unique_key`` None) or to create each as a new job
    holding ``unique_key``, and report ``(owner, ids won)``, or ``(owner, error text)``, on
    ``results``."""
    while True:
        command = commands.get()
        if command is None:
            return
        url, owner, job_ids, unique_key = command
        try:
            store = open_store(url)
            store.now()  # connect and check the schema before the gun, so only writes race
            start.wait(60)
            if unique_key is None:
                claim = Transition(to=JobState.STARTED, expect=CLAIMABLE_STATES, owner=owner)
                won = [job_id for job_id in job_ids if store.transition(job_id, claim)]
            else:
                won = [job_id for job_id in job_ids if _created(store, job_id, unique_key)]
            store.close()
            results.put((owner, won))
        except BaseException as exc:  # the parent must hear of it rather than wait
            results.put((owner, f"{type(exc).__name__}: {exc}"))


def _created(store: Store, job_id: str, unique_key: str) -> bool:
    try:
        return store.create(JobRecord(id=job_id, name="tasks.unique", unique_key=unique_key))
    except UniqueKeyHeld:
        return False
