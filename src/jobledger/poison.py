"""The poison-pill rule (invariant 6): a job whose worker died under it too often within a
window is not run again but moved to ``dead``, with the reason, for a person to restart.

Written once for both places that would rerun a dead owner's job: the recovery sweep (before
it republishes an orphan) and a claim that would take a started job over from a dead owner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from jobledger.model import RECENT_RECOVERIES_KEPT, JobRecord, JobState, to_epoch
from jobledger.stores.base import Store, Transition

log = logging.getLogger(__name__)

_STARTED = frozenset({JobState.STARTED})


def with_recovery(record: JobRecord, now: float) -> tuple[float, ...]:
    """The job's recent recovery times once one more happens at ``now`` (store clock)."""
    return (*record.recent_recoveries, now)[-RECENT_RECOVERIES_KEPT:]


@dataclass(frozen=True)
class RecoveryCap:
    """At most ``max_recoveries`` recoveries of a job within ``window`` seconds."""

    max_recoveries: int
    window: float

    def reached(self, record: JobRecord, now: Callable[[], float]) -> bool:
        """True if recovering ``record`` once more would exceed the cap.

        Counted from the job's recent recovery times. A record whose recoveries predate those
        (ledger schema 0001) counts all of them while its latest is within the window, as
        before. ``now`` (the store's clock) is asked only when needed.
        """
        if record.recoveries < self.max_recoveries:
            return False
        if self.max_recoveries == 0:
            return True
        if record.recent_recoveries:
            since = now() - self.window
            return sum(1 for t in record.recent_recoveries if t >= since) >= self.max_recoveries
        last = to_epoch(record.recovered_at)
        return last is None or now() - last <= self.window

    def bury(self, store: Store, record: JobRecord, why: str) -> bool:
        """started → dead for ``record`` as read (same owner and generation), with the reason;
        False if the job moved meanwhile."""
        error = (
            f"poison pill: recovered {record.recoveries} times within {self.window:.0f}s "
            f"(max {self.max_recoveries}); last owner {record.owner} died under it ({why}). "
            f"Not run again; restart it by hand once fixed."
        )
        dead = Transition(
            to=JobState.DEAD,
            expect=_STARTED,
            expect_owner=record.owner,
            expect_generation=record.generation,
            error=error,
        )
        if not store.transition(record.id, dead):
            return False
        log.error("job %s (%s) is DEAD: %s", record.id, record.name, error)
        return True
