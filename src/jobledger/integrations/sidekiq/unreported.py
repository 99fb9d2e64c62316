"""The jobs a dead Sidekiq process started after its last report: not in any snapshot, since
Sidekiq writes a process's work only at each beat, yet in the ledger, ``started`` by the
anonymous seed middleware. They are found by facts on the ledger's clock: a job started before
a live process last reported and absent from that report is not that process's; one that no
live process holds that way, started while the dead one still reported, was the dead one's.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from jobledger.model import STAND_IN_NONCE, JobRecord, JobState, to_epoch
from jobledger.query import JobQuery
from jobledger.stores.base import Store

#: Sidekiq copies a process's work a moment before it writes the beat that tells us of it:
#: a start this close to a report is not judged by it.
REPORT_MARGIN = 1.0
_STARTED = frozenset({JobState.STARTED})


@dataclass(frozen=True)
class Report:
    """A process's latest report: written after ``after`` (ledger epoch seconds; ``-inf``
    when unknown, as for a process first seen already reporting) and holding ``work``."""

    after: float
    work: Collection[str]


def unreported(
    store: Store, system: str, dead: Report, live: Iterable[Report], *, limit: int
) -> list[JobRecord] | None:
    """Started jobs of ``system`` the dead process may have held unreported; None while a
    live process has not reported since one of them started (judge again at the next look)."""
    since = dead.after - REPORT_MARGIN
    reports = list(live)
    found = []
    query = JobQuery(states=_STARTED, systems=frozenset({system}))
    for record in store.query(query, limit=limit).items:
        started = to_epoch(record.started_at)
        if started is None or started <= since or record.id in dead.work:
            continue  # reported by the dead process if it was its job, or not a job it had
        if not _anonymous(record.owner) or any(record.id in r.work for r in reports):
            continue
        if any(r.after - REPORT_MARGIN <= started for r in reports):
            return None
        found.append(record)
    return found


def _anonymous(owner: str | None) -> bool:
    """Started by a client that named no instance (a named one's own heartbeat speaks)."""
    return owner is not None and owner.endswith(f":{STAND_IN_NONCE}")
