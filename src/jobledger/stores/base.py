"""The Store seam: everything the core asks of the place the ledger lives.

Lifecycle, recovery, the manager, the CLI and the server are written once against
:class:`Store`; the SQL store (SQLite, PostgreSQL, MariaDB/MySQL) and the in-memory store of
:mod:`jobledger.testing` implement it, and ``tests/contract`` runs every implementation through
the same suite. What every implementation promises:

- **Compare-and-set.** :meth:`Store.transition` changes a job only if it is in one of the
  expected states (and, if asked, held by the expected owner), and says whether it did. Of any
  number of concurrent callers whose expectations match the same row, exactly one wins.
- **The database's clock.** Timestamps, heartbeats, ages and orphan judgements use the store's
  own clock (:meth:`Store.now`), never the caller's, so a skewed host creates no false orphans.
- **Token-checked locks.** A lock is held by a token until it expires; only the holder renews or
  releases it.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from jobledger.errors import InvalidTransition
from jobledger.model import (
    DurationStats,
    Instance,
    JobRecord,
    JobState,
    QueueStats,
    bound_error,
    check_transition,
)
from jobledger.query import JobQuery, Page, iter_pages


class _Sentinel(enum.Enum):
    ANY = "any"
    KEEP = "keep"


#: ``expect_owner=ANY``: the transition does not look at the owner.
ANY = _Sentinel.ANY
#: ``error=KEEP``: the transition leaves the job's last error as it is.
KEEP = _Sentinel.KEEP

DurationKind = Literal["queued", "started"]


@dataclass(frozen=True)
class Transition:
    """One compare-and-set move of a job.

    The store stamps the phase time of ``to`` (``queued_at`` for queued, ``finished_at`` for a
    final state, ...) with ``at`` or, when ``at`` is None, its own clock, and keeps the counters:
    ``attempts`` + 1 on every start, ``recoveries`` + 1 (and ``recovered_at``) for a recovery,
    ``restarts`` + 1 for a restart. Moving to ``queued`` or ``staged`` clears the owner; moving to
    ``started`` sets it to ``owner``; other moves keep it (so a finished job shows who ran it).
    """

    to: JobState
    expect: frozenset[JobState]
    expect_owner: str | _Sentinel | None = ANY
    owner: str | None = None
    error: str | _Sentinel | None = KEEP
    reason: Literal["recovery", "restart"] | None = None
    at: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "expect", check_transition(self.expect, self.to))
        if self.to is JobState.STARTED and not self.owner:
            raise InvalidTransition("a transition to started needs the owner instance id")
        if isinstance(self.error, str):
            object.__setattr__(self, "error", bound_error(self.error))


class StagedBatch(Protocol):
    """Staged jobs held by one relay pass or fast-path publish (see :meth:`Store.staged_batch`)."""

    #: The held jobs: oldest staging first in a relay's batch, in no order in an ``ids`` one.
    records: list[JobRecord]

    def mark_queued(self, job_ids: Collection[str]) -> int:
        """Move these held jobs staged → queued (they were published); how many moved. The
        moves take effect when the batch ends without an exception."""


@runtime_checkable
class Store(Protocol):
    """Where the ledger lives. See the module docstring for what every implementation promises."""

    # -- schema and connection -------------------------------------------------------------
    def migrate(self) -> None:
        """Create or upgrade the ledger's tables; idempotent."""

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""

    def now(self) -> float:
        """The store's clock, in epoch seconds."""

    # -- jobs ------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> bool:
        """Insert ``record``; False (and nothing changed) if a job with its id exists.

        Timestamps the record carries are kept; ``created_at`` and the phase time of its state
        default to the store's clock, and ``updated_at`` (what ``older_than`` measures) to that
        phase time: the job entered its state then.
        """

    def get(self, job_id: str) -> JobRecord | None:
        """The job with this id, or None."""

    def transition(self, job_id: str, change: Transition) -> bool:
        """Apply ``change`` if the job matches its expectations; True if this call won."""

    def delete(
        self, job_id: str, expect: frozenset[JobState], expect_owner: str | _Sentinel | None = ANY
    ) -> bool:
        """Delete the job if it is in one of ``expect`` (and held by ``expect_owner``)."""

    def query(self, query: JobQuery, *, limit: int, cursor: str | None = None) -> Page[JobRecord]:
        """One page of matching jobs, newest first, and the cursor of the next page."""

    def iter_jobs(self, query: JobQuery, *, page_size: int = 500) -> Iterator[JobRecord]:
        """Every matching job, newest first, fetched page by page in constant memory."""
        return iter_pages(lambda cursor: self.query(query, limit=page_size, cursor=cursor))

    def count(self, query: JobQuery) -> int:
        """How many jobs match."""

    def queue_stats(self) -> list[QueueStats]:
        """Counts per state and the lag of every queue that has jobs."""

    def durations(
        self, query: JobQuery, kind: DurationKind, *, limit: int, cursor: str | None = None
    ) -> Page[tuple[JobRecord, float]]:
        """Finished matching jobs with their queued→finished or started→finished seconds."""

    def duration_stats(self, query: JobQuery, kind: DurationKind) -> list[DurationStats]:
        """p50/p95/max of those durations per task name, by name."""

    def prune(self, query: JobQuery, *, batch_size: int = 1000) -> int:
        """Delete the final-state jobs that match, in batches; how many went."""

    def staged_batch(
        self,
        *,
        limit: int,
        older_than: float = 0.0,
        ids: Collection[str] | None = None,
        systems: Collection[str] | None = None,
    ) -> AbstractContextManager[StagedBatch]:
        """Hold up to ``limit`` staged jobs (oldest staging first, unless ``ids`` picks them)
        for as long as the context lasts: jobs staged at least ``older_than`` seconds ago
        (store clock), limited to ``ids`` and ``systems`` when given. No other batch holds
        the same job at the same time, so relays running side by side never publish one job
        twice. A job the caller's transaction has not committed yet is not seen.

        The caller publishes the held jobs, then :meth:`StagedBatch.mark_queued` those the
        broker took. An exception out of the context undoes the moves: the jobs stay staged,
        and the next batch publishes them again (a duplicate the claim guard absorbs, never a
        loss: invariant 1). Row locks that skip held rows do this on PostgreSQL and
        MariaDB/MySQL; SQLite, which has one writer anyway, lets one relay batch run at a time
        (``ids`` batches, the fast path's, skip that lock).
        """

    # -- instances -------------------------------------------------------------------------
    def heartbeat(self, instance: Instance) -> None:
        """Register ``instance`` or refresh its heartbeat (and state) on the store's clock."""

    def deregister(self, instance_id: str) -> bool:
        """Forget an instance (it shut down holding nothing); False if it was not there."""

    def instances(self, ttl: float) -> list[Instance]:
        """Every registered instance; ``alive`` means a heartbeat within ``ttl`` seconds."""

    def is_alive(self, instance_id: str, ttl: float) -> bool:
        """True if the instance is registered and has beaten within ``ttl`` seconds."""

    def orphans(self, ttl: float, *, limit: int = 1000) -> list[JobRecord]:
        """Started jobs whose owner is gone or has not beaten within ``ttl`` seconds."""

    # -- locks -----------------------------------------------------------------------------
    def acquire_lock(self, name: str, token: str, ttl: float) -> bool:
        """Take the lock ``name`` for ``ttl`` seconds if it is free or expired, or renew it if
        ``token`` holds it. True if ``token`` holds it now."""

    def release_lock(self, name: str, token: str) -> bool:
        """Free the lock if ``token`` holds it; False (nothing changed) otherwise."""
