"""The Store seam: everything the core asks of the place the ledger lives.

Lifecycle, recovery, the manager, the CLI and the server are written once against
:class:`Store`; the SQL store (SQLite, PostgreSQL, MariaDB/MySQL) and the in-memory store of
:mod:`jobledger.testing` implement it, and every implementation passes the same suite,
:class:`jobledger.testing.contract.StoreContract` (``tests/contract`` runs it for each).
What every implementation promises:

- **Compare-and-set.** :meth:`Store.transition` changes a job only if it is in one of the
  expected states (and, if asked, held by the expected owner), and says whether it did. Of any
  number of concurrent callers whose expectations match the same row, exactly one wins.
- **The database's clock.** Timestamps, heartbeats, ages and orphan judgements use the store's
  own clock (:meth:`Store.now`), never the caller's, so a skewed host creates no false orphans.
- **Unique keys.** A job created with a ``unique_key`` holds it while it is unfinished; a
  second create with the key writes nothing and names the holder, and the move that ends the
  job (or its deletion) frees the key in the same compare-and-set.
- **Token-checked locks.** A lock is held by a token until it expires; only the holder renews or
  releases it.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Collection, Iterator, Mapping
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

#: Seconds a relay batch (or fast path) holds the staged jobs it leased; a holder that crashed
#: frees them after this long, and another relay publishes them again.
DEFAULT_LEASE = 60.0
#: How the ``owner`` of a leased staged job starts (a worker instance id never does).
LEASE_PREFIX = "relay:"


@dataclass(frozen=True)
class Transition:
    """One compare-and-set move of a job.

    The store stamps the phase time of ``to`` (``queued_at`` for queued, ``finished_at`` for a
    final state, ...) with ``at`` or, when ``at`` is None, its own clock, and keeps the counters:
    ``attempts`` + 1 on every start, ``recoveries`` + 1 (and ``recovered_at``) for a recovery,
    ``restarts`` + 1 for a restart. Moving to ``queued`` or ``staged`` clears the owner; moving to
    ``started`` sets it to ``owner``; other moves keep it (so a finished job shows who ran it).
    (A staged job's owner is the lease of the relay publishing it: see ``staged_batch``.)

    ``expect_generation`` adds the job's fencing generation to the compare (None: any);
    ``generation`` sets it (a republish raises it in the move that accounts for the message).
    ``recent_recoveries`` replaces the job's recovery times (the caller read them with the
    generation it compares, so no concurrent recovery is lost).
    """

    to: JobState
    expect: frozenset[JobState]
    expect_owner: str | _Sentinel | None = ANY
    owner: str | None = None
    error: str | _Sentinel | None = KEEP
    reason: Literal["recovery", "restart"] | None = None
    at: float | None = None
    expect_generation: int | None = None
    generation: int | None = None
    recent_recoveries: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "expect", check_transition(self.expect, self.to))
        if self.to is JobState.STARTED and not self.owner:
            raise InvalidTransition("a transition to started needs the owner instance id")
        if isinstance(self.error, str):
            object.__setattr__(self, "error", bound_error(self.error))

    def landed(self, current: JobRecord | None) -> bool:
        """Whether ``current`` is what this move leaves behind: the lost-answer check of a
        write retried after its connection dropped (the first try may have committed)."""
        if current is None or current.state is not self.to:
            return False
        generation = self.expect_generation if self.generation is None else self.generation
        if generation is not None and current.generation != generation:
            return False
        if self.to is JobState.STARTED:
            return current.owner == self.owner
        if self.to in (JobState.QUEUED, JobState.STAGED):
            return current.owner is None
        return self.expect_owner is ANY or current.owner == self.expect_owner


class StagedBatch(Protocol):
    """Staged jobs held by one relay pass or fast-path publish (see :meth:`Store.staged_batch`)."""

    #: The held jobs: oldest staging first in a relay's batch, in no order in an ``ids`` one.
    records: list[JobRecord]

    def mark_queued(self, job_ids: Collection[str]) -> int:
        """Say these held jobs were published: they move staged → queued when the batch ends
        without an exception (unless a worker claimed one meanwhile). How many of them it
        holds."""

    def mark_refused(self, refused: Mapping[str, str]) -> int:
        """Say the queue system refused these held jobs' messages (id → why): they move
        staged → failed with the reason, for a person to look at, instead of blocking every
        batch after them. How many of them it holds."""


class LeasedBatch:
    """The :class:`StagedBatch` both stores hand out: the leased records, and the marks that
    their ``staged_batch`` applies at the end."""

    def __init__(self, records: list[JobRecord]) -> None:
        self.records = records
        self.marked: list[str] = []
        self.refused: dict[str, str] = {}

    def mark_queued(self, job_ids: Collection[str]) -> int:
        found = self._held(job_ids)
        self.marked.extend(found)
        return len(found)

    def mark_refused(self, refused: Mapping[str, str]) -> int:
        found = self._held(refused)
        self.refused.update({job_id: refused[job_id] for job_id in found})
        return len(found)

    def _held(self, job_ids: Collection[str]) -> list[str]:
        held = {r.id for r in self.records}
        taken = set(self.marked) | set(self.refused)
        return [i for i in dict.fromkeys(job_ids) if i in held and i not in taken]

    def refusal(self, job_id: str, token: str) -> Transition:
        """staged → failed for a refused job, still leased by ``token``."""
        return Transition(
            to=JobState.FAILED,
            expect=frozenset({JobState.STAGED}),
            expect_owner=token,
            error=f"the queue system refused the message: {self.refused[job_id]}",
        )

    def moves(self, token: str) -> Iterator[tuple[str, Transition]]:
        """The compare-and-set moves the end of the lease makes: each marked job staged →
        queued, each refused one staged → failed, while ``token`` still holds it."""
        queued = Transition(
            to=JobState.QUEUED, expect=frozenset({JobState.STAGED}), expect_owner=token
        )
        yield from ((job_id, queued) for job_id in self.marked)
        yield from ((job_id, self.refusal(job_id, token)) for job_id in self.refused)


@contextlib.contextmanager
def holding(records: list[JobRecord], end: Callable[[LeasedBatch], None]) -> Iterator[StagedBatch]:
    """The context of a store's :meth:`Store.staged_batch` once it leased ``records``:
    ``end(batch)`` when it ends well, ``end`` of an unmarked batch (everything freed) when it
    raises."""
    batch = LeasedBatch(records)
    try:
        yield batch
    except BaseException:
        end(LeasedBatch(records))
        raise
    end(batch)


@runtime_checkable
class Store(Protocol):
    """Where the ledger lives. See the module docstring for what every implementation promises."""

    # -- schema and connection -------------------------------------------------------------
    @property
    def serialize_across_fork(self) -> bool:
        """True if a process must not fork while one of its threads is inside a call of this
        store (SQLite: a child inherits the parent's file-lock bookkeeping, not the thread
        that would release it). A worker runtime then holds one process-wide lock around every
        call and every fork; other stores need no such lock."""
        return False

    def migrate(self) -> None:
        """Create or upgrade the ledger's tables; idempotent."""

    def migrate_report(self) -> str:
        """Migrate, and say how argument search is served (what ``jobledger migrate`` prints)."""
        self.migrate()
        return "a scan of every job"

    @property
    def safe_url(self) -> str:
        """Where the ledger is, any password hidden: for messages and logs."""
        return repr(self)

    def close(self) -> None:
        """Release connections; the store is not used afterwards."""

    def now(self) -> float:
        """The store's clock, in epoch seconds."""

    # -- jobs ------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> bool:
        """Insert ``record``; False (and nothing changed) if a job with its id exists.

        A record with a ``unique_key`` holds the key until a move takes it to a final state (or
        it is deleted); while another unfinished job holds the key, nothing is written and
        :class:`~jobledger.errors.UniqueKeyHeld` names that job. Of concurrent creates with one
        key, exactly one wins.

        Timestamps the record carries are kept; ``created_at`` and the phase time of its state
        default to the store's clock, and ``updated_at`` (what ``older_than`` measures) to that
        phase time: the job entered its state then.
        """

    def get(self, job_id: str) -> JobRecord | None:
        """The job with this id, or None."""

    def transition(self, job_id: str, change: Transition) -> bool:
        """Apply ``change`` if the job matches its expectations; True if this call won."""

    def delete(
        self,
        job_id: str,
        expect: frozenset[JobState],
        expect_owner: str | _Sentinel | None = ANY,
        expect_generation: int | None = None,
    ) -> bool:
        """Delete the job if it is in one of ``expect`` (and held by ``expect_owner``, at
        ``expect_generation``): the same compare as :meth:`transition`."""

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
        lease: float = DEFAULT_LEASE,
    ) -> AbstractContextManager[StagedBatch]:
        """Lease up to ``limit`` staged jobs (oldest staging first, unless ``ids`` picks them)
        for as long as the context lasts: jobs staged at least ``older_than`` seconds ago
        (store clock), limited to ``ids`` and ``systems`` when given. No other batch leases
        the same job meanwhile, so relays side by side never publish one job twice; a job the
        caller's transaction has not committed is not seen.

        The lease is written (``owner`` = ``relay:…``, ``updated_at`` = now, put back to the
        staging time when the lease ends unpublished) in a short transaction of its own, so no
        row lock is held while the caller publishes: a worker claims a published job at once,
        and a broker that hangs holds up nothing but this batch. A holder that died frees its
        jobs after ``lease`` seconds.

        The caller publishes the held jobs, then :meth:`StagedBatch.mark_queued` those the
        broker took; at the end those move staged → queued and the rest are freed. An
        exception out of the context frees them all (published ones go out again with the next
        batch: a duplicate the claim guard absorbs, never a loss: invariant 1).
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
