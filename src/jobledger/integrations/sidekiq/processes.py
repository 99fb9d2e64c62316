"""What Sidekiq's own heartbeats say: each process adds its identity to ``processes``, writes
``beat`` (and ``info``, ``busy``...) into its identity hash every few seconds, and rewrites its
in-flight jobs, full payloads included, into ``<identity>:workers`` (Sidekiq 7: ``:work``) just
before each beat. A clean shutdown (TERM: Sidekiq pushes its unfinished jobs back itself)
removes the identity from ``processes``; a killed process stays there, silent, until Sidekiq
forgets it 60 s after its last beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from jobledger.integrations.sidekiq.keys import Keys
from jobledger.integrations.sidekiq.payload import read_work


@dataclass(frozen=True)
class ProcessReport:
    """One process as its heartbeat reads now: ``beat`` None once its hash expired."""

    identity: str
    beat: str | None
    work: dict[str, dict[str, Any]]


def read_processes(client: redis.Redis, keys: Keys) -> list[ProcessReport]:
    """Every process in ``processes`` with its beat and in-flight payloads (two round trips)."""
    identities = sorted(str(i) for i in client.smembers(keys.processes))
    if not identities:
        return []
    with client.pipeline(transaction=False) as pipe:
        for identity in identities:
            pipe.hget(keys.process(identity), "beat")
            for key in keys.work(identity):
                pipe.hgetall(key)
        answers = pipe.execute()
    reports = []
    for n, identity in enumerate(identities):
        beat, six, seven = answers[3 * n : 3 * n + 3]
        reports.append(ProcessReport(identity, beat, read_work({**six, **seven})))
    return reports


def forget(client: redis.Redis, keys: Keys, identity: str) -> None:
    """Drop a process whose hash expired from ``processes``, as Sidekiq's own clean-up does."""
    client.srem(keys.processes, identity)
