"""Job records, instances, the job states and the transitions allowed between them.

The state machine (see DESIGN.md)::

     staged ──► queued ──► started ──► succeeded
       │          ▲  │        │  ╲
       │          │  │        │   ╲──► failed      (retries exhausted; kept for a person)
       │          │  │        ▼
       │          │  │     retrying ──► queued     (the queue's own retry)
       │          └──┴──── (owner dead: recovered; recoveries += 1; over the cap ──► dead)
       └──► cancelled (any non-final state, by a person)
     failed / dead ──► queued   (restart by a person; same job id)

Every change of state in a store is a compare-and-set on (id, expected states, expected owner);
:data:`TRANSITIONS` is what a store refuses to do even when the compare would match.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from jobledger.errors import ConfigError, InvalidTransition

#: The longest error text kept on a job; longer ones keep their head and tail.
ERROR_MAX_LENGTH = 8192

#: How many recovery times a job keeps for the windowed poison-pill cap (any cap above this
#: counts at most this many recoveries in its window).
RECENT_RECOVERIES_KEPT = 32

#: How many history entries (attempts that did not succeed, recoveries, restarts) a job keeps;
#: the oldest go first. Bounded so a job retried forever cannot grow its row without end.
HISTORY_KEPT = 20

#: The longest error one history entry keeps (the latest error stays whole in ``error``).
HISTORY_ERROR_MAX_LENGTH = 2048

#: The longest job id, task name, queue name or instance id a store accepts.
NAME_MAX_LENGTH = 255

_JOB_ID = re.compile(r"[A-Za-z0-9_.:@+=~,-]{1,255}")


class JobState(str, enum.Enum):
    """Where a job is in its life. The value is what the store keeps."""

    STAGED = "staged"
    QUEUED = "queued"
    STARTED = "started"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True for states only a person (restart) moves a job out of, or never."""
        return self in FINAL_STATES

    @classmethod
    def parse(cls, value: str | JobState) -> JobState:
        """The state named by ``value``; :class:`ConfigError` listing the known ones if none."""
        if isinstance(value, JobState):
            return value
        try:
            return cls(value.strip().lower())
        except (ValueError, AttributeError):
            known = ", ".join(s.value for s in cls)
            raise ConfigError(f"unknown job state {value!r}; known states: {known}") from None


class Republish(str, enum.Enum):
    """Why a job's message was published again; the message carries it beside its generation.

    A delivery newer than the record it finds (its republish has not moved the record yet)
    runs; whether it may also take over a ``started`` record depends on why it was sent:
    a recovery or a restart supersedes the run it found dead, a requeue of a queued job whose
    message was lost never does (a live run of the older message is the one to keep).
    """

    RECOVERY = "recovery"  # a started job whose owner or process died
    RESTART = "restart"  # a person restarted it
    REQUEUE = "requeue"  # a queued job whose message died with its instance or broker

    @property
    def supersedes_run(self) -> bool:
        return self is not Republish.REQUEUE

    @property
    def counted_as(self) -> Literal["recovery", "restart"] | None:
        """The counter a move on its account raises: ``recoveries`` for a recovery (what the
        poison-pill cap counts), ``restarts`` for a restart; a requeue of a job that never
        started raises none (its body did not run, so it is no sign of a poison pill)."""
        if self is Republish.RECOVERY:
            return "recovery"
        return "restart" if self is Republish.RESTART else None


class OrphanPolicy(str, enum.Enum):
    """What a job whose worker died while it ran becomes (DESIGN.md invariant 10), chosen per
    task because a task that charges a card may not be safe to run twice. Recorded with the
    job at publish (``options["on_orphan"]``), so a recoverer applies it without the task's
    code. A job that never started (prefetched, or its claim never landed) is always put back:
    its body did not run."""

    REQUEUE = "requeue"  # publish it again (the default)
    FAIL = "fail"  # mark it failed with the reason, for a person to decide
    DISCARD = "discard"  # cancel it with the reason

    @classmethod
    def parse(cls, value: str | OrphanPolicy) -> OrphanPolicy:
        """The policy named by ``value``; :class:`ConfigError` naming the known ones if none."""
        if isinstance(value, OrphanPolicy):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            known = ", ".join(p.value for p in cls)
            raise ConfigError(f"unknown orphan policy {value!r}; known: {known}") from None


#: The record option that carries a job's :class:`OrphanPolicy`.
ORPHAN_OPTION = "on_orphan"


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED})
UNCOMPLETED_STATES = frozenset(JobState) - FINAL_STATES

#: The allowed transitions: ``TRANSITIONS[a]`` holds every state a job in ``a`` may move to.
#:
#: Beyond the drawing: ``queued → queued`` is a re-publish (a restart of a job the broker lost);
#: ``started → queued`` a recovery; ``started → started`` a claim that takes over a job whose
#: owner died (a redelivery that beat the recovery sweep). A claim may also start a job that is
#: still ``staged``, or ``failed``/``dead`` when the delivery is the restart's own message: the
#: relay and a restart publish *first* and move the record after (invariant 1), so a fast worker
#: can see the message before the record moved. ``staged → failed``: the queue system refused
#: the message itself (it would refuse it every time), so it waits for a person, not the relay.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.STAGED: frozenset(
        {JobState.QUEUED, JobState.STARTED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.QUEUED: frozenset(
        {JobState.QUEUED, JobState.STARTED, JobState.CANCELLED, JobState.DEAD}
    ),
    JobState.STARTED: frozenset(
        {
            JobState.STARTED,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.RETRYING,
            JobState.QUEUED,
            JobState.DEAD,
            JobState.CANCELLED,
        }
    ),
    JobState.RETRYING: frozenset(
        {JobState.QUEUED, JobState.STARTED, JobState.FAILED, JobState.DEAD, JobState.CANCELLED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.STARTED}),
    JobState.DEAD: frozenset({JobState.QUEUED, JobState.STARTED}),
    JobState.CANCELLED: frozenset(),
}

#: The states a claim may start a job from without asking who else holds it (failed and dead
#: only for a restart's own delivery: see :meth:`jobledger.lifecycle.Lifecycle.claim`).
CLAIMABLE_STATES = frozenset(
    {JobState.STAGED, JobState.QUEUED, JobState.RETRYING, JobState.FAILED, JobState.DEAD}
)

#: The states a person may restart a job from (publish it again, same id): all but the two a
#: person closed for good. A ``started`` job is restarted only when its owner is dead.
RESTARTABLE_STATES = frozenset(JobState) - {JobState.SUCCEEDED, JobState.CANCELLED}


def check_transition(sources: Iterable[JobState], target: JobState) -> frozenset[JobState]:
    """Return ``sources`` as a set, or raise :class:`InvalidTransition` if any cannot reach
    ``target``: asking a store to make a forbidden move is a bug, not a lost race."""
    sources = frozenset(sources)
    if not sources:
        raise InvalidTransition(f"a transition to {target.value} needs at least one source state")
    bad = sorted(s.value for s in sources if target not in TRANSITIONS[s])
    if bad:
        raise InvalidTransition(f"a job cannot move from {', '.join(bad)} to {target.value}")
    return sources


def validate_unique_key(key: str) -> str:
    """``key`` if it can be a job's unique key (1-255 characters); :class:`ConfigError`
    otherwise (a record and a filter refuse the same keys)."""
    if not isinstance(key, str) or not key or len(key) > NAME_MAX_LENGTH:
        raise ConfigError(f"a unique key must be 1-{NAME_MAX_LENGTH} characters: {key!r}")
    return key


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is a well-formed id, else raise :class:`ConfigError`.

    Ids are the queue's own (a UUID for Celery and Dramatiq, RQ's ids, Sidekiq's jid): 1 to 255
    characters from letters, digits and ``_ . : @ + = ~ , -``. Anything else (spaces, slashes,
    quotes) is refused so an id is always safe in a URL path and a shell.
    """
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ConfigError(
            f"malformed job id {job_id!r}: expected 1-255 characters from letters, digits "
            "and _ . : @ + = ~ , -"
        )
    return job_id


def bound_error(text: str | None, limit: int = ERROR_MAX_LENGTH) -> str | None:
    """Cut an error text to ``limit`` characters, keeping its head and its tail (where a
    traceback says what actually went wrong)."""
    if text is None or len(text) <= limit:
        return text
    # The marker takes room too, so more is cut than the excess; its length depends on the
    # count it states, which settles after at most one more digit.
    cut = len(text) - limit
    while True:
        marker = f"\n… [{cut} characters cut] …\n"
        keep = limit - len(marker)
        if len(text) - keep == cut:
            break
        cut = len(text) - keep
    head = keep // 2
    return text[:head] + marker + text[len(text) - (keep - head) :]


def to_datetime(epoch: float | None) -> datetime | None:
    """A store's epoch seconds as an aware UTC datetime."""
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=timezone.utc)


def to_epoch(moment: datetime | float | None) -> float | None:
    """An aware datetime (naive ones are taken as UTC) or epoch seconds as epoch seconds."""
    if moment is None or isinstance(moment, (int, float)):
        return moment
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


class HistoryEvent(str, enum.Enum):
    """What a :class:`HistoryEntry` records. A success records nothing: the row's own fields
    tell the last attempt, so the hot path writes no more than it did."""

    RETRYING = "retrying"  # an attempt failed and the queue retries it
    FAILED = "failed"  # an attempt failed for good (or the queue system refused the message)
    DEAD = "dead"  # a poison pill: recovered too often
    RECOVERED = "recovered"  # its owner died: put back on its queue, or taken over
    RESTARTED = "restarted"  # a person published it again


@dataclass(frozen=True)
class HistoryEntry:
    """One move in a job's story, appended by the store in the move's own compare-and-set.

    ``owner`` and ``started_at`` are the attempt the move closed (None when the job was not
    running), ``attempt`` its number, ``came_from``/``to`` the states it moved between.
    """

    event: HistoryEvent
    at: datetime
    came_from: JobState
    to: JobState
    attempt: int
    owner: str | None = None
    started_at: datetime | None = None
    error: str | None = None

    @property
    def ran_for(self) -> float | None:
        """Seconds the closed attempt ran, or None if the move closed no attempt."""
        return seconds_between(self.started_at, self.at)


@dataclass(frozen=True)
class JobRecord:
    """One tracked job as the ledger holds it.

    ``args``/``kwargs``/``queue``/``options`` are everything an integration needs to publish the
    job again without importing its code (invariant 10). Timestamps are the latest of each phase
    (``first_queued_at`` excepted), aware UTC datetimes taken from the database's clock;
    ``finished_at`` is cleared when a job leaves a final state (a restart), so it is never
    older than the run it ends.
    """

    id: str
    name: str
    system: str = "python"
    queue: str = "default"
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    state: JobState = JobState.QUEUED
    owner: str | None = None
    attempts: int = 0
    recoveries: int = 0
    restarts: int = 0
    #: The fencing generation (invariant 2): 0 at the first publish, raised by every republish
    #: (recovery, restart, requeue) in the same compare-and-set that moves the record; each
    #: message carries the generation it was published with, so a claim tells the current
    #: delivery from a stray older one by a fact, not by timing.
    generation: int = 0
    #: Epoch seconds of the latest recoveries (newest last, at most
    #: :data:`RECENT_RECOVERIES_KEPT`): the poison-pill cap counts those within its window.
    recent_recoveries: tuple[float, ...] = ()
    #: The job's story beyond its latest attempt, oldest first (at most :data:`HISTORY_KEPT`).
    history: tuple[HistoryEntry, ...] = ()
    error: str | None = None
    created_at: datetime | None = None
    staged_at: datetime | None = None
    first_queued_at: datetime | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    recovered_at: datetime | None = None
    updated_at: datetime | None = None
    #: What makes the job unique (issue 11): while it is unfinished, no other job with this key
    #: can be created (a second publish returns this job's id). Held from its creation until
    #: the move that ends it; a restart runs it again without taking the key back.
    unique_key: str | None = None

    def __post_init__(self) -> None:
        validate_job_id(self.id)
        if self.unique_key is not None:
            validate_unique_key(self.unique_key)
        object.__setattr__(self, "state", JobState.parse(self.state))
        for label in ("name", "system", "queue"):
            value = getattr(self, label)
            if not isinstance(value, str) or not value or len(value) > NAME_MAX_LENGTH:
                raise ConfigError(f"job {label} must be 1-{NAME_MAX_LENGTH} characters: {value!r}")
        if not isinstance(self.args, list):
            object.__setattr__(self, "args", list(self.args))
        object.__setattr__(self, "error", bound_error(self.error))

    @property
    def queued_to_finished(self) -> float | None:
        """Seconds from the latest enqueue to the finish, or None while unfinished."""
        return seconds_between(self.queued_at, self.finished_at) if self.state.is_final else None

    @property
    def started_to_finished(self) -> float | None:
        """Seconds from the latest start to the finish, or None while unfinished."""
        return seconds_between(self.started_at, self.finished_at) if self.state.is_final else None


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    """Seconds from ``start`` to ``end``; None if either is missing or ``end`` came first (a
    phase time of an earlier run: never a negative duration)."""
    if start is None or end is None or end < start:
        return None
    return (end - start).total_seconds()


class InstanceState(str, enum.Enum):
    """What an instance said of itself at its last heartbeat."""

    RUNNING = "running"
    DRAINING = "draining"  # warm shutdown: takes no new jobs, beats until its jobs are done


#: The nonce of a stand-in instance: an owner the supervisor beats for, of jobs that no worker
#: holds (an HTTP client's, started without naming its instance). A stand-in is not a worker:
#: counting it as one would keep "no worker alive" from ever being true.
STAND_IN_NONCE = "supervisor"


@dataclass(frozen=True)
class Instance:
    """One worker process incarnation: a stable ``name`` plus a ``nonce`` drawn at each boot.

    ``id`` (``name:nonce``) is what a job's ``owner`` holds. ``alive`` and ``heartbeat_age`` are
    judged by the store on the database's clock, so a skewed host cannot fake either.
    """

    name: str
    nonce: str
    hostname: str = ""
    pid: int = 0
    queues: tuple[str, ...] = ()
    state: InstanceState = InstanceState.RUNNING
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    heartbeat_age: float | None = None
    alive: bool = True
    #: The tracked jobs the instance had received at its last beat and not finished, with the
    #: generation of each delivery: what the sweep puts back if the instance dies, including
    #: jobs it had prefetched but not started (they are still ``queued`` in the ledger).
    holding: tuple[tuple[str, int], ...] = ()
    #: The instance's own counters at its last beat (duplicates skipped, unrecorded writes...),
    #: cumulative since it started: the supervisor exports them.
    stats: Mapping[str, int] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name}:{self.nonce}"

    @property
    def is_worker(self) -> bool:
        """False for the supervisor's stand-in (:data:`STAND_IN_NONCE`)."""
        return self.nonce != STAND_IN_NONCE


def nearest_rank(p: float, count: int) -> int:
    """The 0-based index of the ``p`` percentile (0 < p <= 1) in ``count`` sorted values, by
    the nearest-rank method: the smallest value with at least ``p`` of the values at or below
    it (so every percentile is a value that occurred)."""
    return min(count, max(1, math.ceil(p * count))) - 1


@dataclass(frozen=True)
class DurationStats:
    """Durations of finished jobs of one task name, in seconds (nearest-rank percentiles)."""

    name: str
    count: int
    p50: float
    p95: float
    max: float


@dataclass(frozen=True)
class QueueStats:
    """Counts per state for one queue, and its lag: the age of its oldest pending job, as of
    ``measured_at`` (the store's clock, epoch seconds: when the lag began is that minus it)."""

    queue: str
    counts: dict[JobState, int]
    oldest_queued_age: float | None
    oldest_staged_age: float | None
    measured_at: float | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class OutboxStats:
    """The outbox backlog: jobs staged and committed but not yet published, and the age of the
    oldest (a growing one means the broker is down or no relay runs)."""

    backlog: int
    oldest_staged_age: float | None

    @classmethod
    def of(cls, queues: list[QueueStats]) -> OutboxStats:
        ages = [q.oldest_staged_age for q in queues if q.oldest_staged_age is not None]
        return cls(
            backlog=sum(q.counts.get(JobState.STAGED, 0) for q in queues),
            oldest_staged_age=max(ages) if ages else None,
        )
