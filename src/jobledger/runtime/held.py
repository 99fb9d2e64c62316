"""What a worker holds: the deliveries its main process handed on, and the audit against them.

Two facts the ledger cannot see by itself. A job a worker *received* and has not started
(prefetched, or handed to a child whose claim has not landed) is written with every beat, so
the sweep puts it back if the worker dies (:meth:`HeldJobs.holding`); and a job the ledger says
the worker *runs* that none of its processes holds (a child that died without the queue
reporting it) is recovered by :meth:`HeldJobs.audit`, instead of staying started by a live
instance, where no sweep looks, for as long as the worker lives.

The adapter says what its processes hold now (``held``: job ids, or None when it cannot tell
at this moment).
"""

from __future__ import annotations

from collections.abc import Callable

from jobledger.model import JobRecord, JobState
from jobledger.query import JobQuery
from jobledger.recovery import Recovery
from jobledger.stores.base import Store

#: Job ids the worker's processes hold now (received, running, waiting for their eta), or
#: None when the adapter cannot tell at this moment.
Held = Callable[[], "set[str] | None"]

_STARTED = frozenset({JobState.STARTED})


class HeldJobs:
    """The main process's received deliveries, and the audit of what it runs."""

    def __init__(self, held: Held) -> None:
        self.held = held
        # tracked jobs received from the broker, as records to put back if the child they
        # were handed to dies before its claim lands
        self._received: dict[str, JobRecord] = {}
        self._missing: set[str] = set()  # of those, the ones not held at the last look
        self._unheld: dict[str, int] = {}  # started here, held by no process at last audit

    def received(self, delivered: JobRecord) -> None:
        """The main process took delivery of this tracked job (as its message describes it)."""
        self._received[delivered.id] = delivered

    def take(self, job_id: str) -> JobRecord | None:
        """Forget a received job, returning what its delivery said (its child died)."""
        return self._received.pop(job_id, None)

    def holding(self) -> list[tuple[str, int]]:
        """The tracked jobs received and not finished, with each delivery's generation
        (written with every beat).

        A received job is forgotten once the worker no longer holds it, judged at two looks
        in a row: a queue may register a delivery as held only after telling us it was
        received, so one look could fall in between and forget a job just received."""
        live = self.held()
        if live is None:
            live = set(self._received)
        received = list(self._received.items())  # one atomic copy: the loop adds meanwhile
        missing = {job_id for job_id, _ in received if job_id not in live}
        for job_id in missing & self._missing:
            self._received.pop(job_id, None)  # finished: nothing to put back
        self._missing = missing
        return [(job_id, r.generation) for job_id, r in received]

    def audit(self, store: Store, instance_id: str, recovery: Recovery) -> None:
        """Recover the jobs the ledger says ``instance_id`` runs that none of its processes
        holds, at two looks in a row (same generation)."""
        live = self.held()
        if live is None:
            return
        query = JobQuery(states=_STARTED, owners=frozenset({instance_id}))
        started = store.query(query, limit=1000).items
        unheld = {r.id: r.generation for r in started if r.id not in live}
        for record in started:
            if record.id in unheld and self._unheld.get(record.id) == record.generation:
                recovery.recover(
                    record, why="no process of its worker holds it (its child process died)"
                )
        self._unheld = unheld
