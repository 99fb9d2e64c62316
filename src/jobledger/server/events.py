"""What the seed's job clients report (queued, started, complete, failed, heartbeat), applied
to the ledger with the same compare-and-set rules a worker integration follows.

The seed's clients are a Sidekiq app's middleware, so their jobs are recorded with
``system="sidekiq"``, which the Sidekiq integration publishes back (with
``JOBLEDGER_SIDEKIQ_REDIS_URL`` set); a client of another queue system names it in ``system``
(a restart of its jobs then needs an integration for it, else the API answers with the
IntegrationMissing message). A client that reports ``started`` without naming its instance
gets the supervisor's own stand-in owner, :data:`UNTRACKED`, which the supervisor keeps alive,
so such jobs are never taken for orphans by the ledger (Sidekiq's are watched through its own
heartbeats); a client that names its instance (and beats for it) gets orphan detection.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from jobledger.errors import ConfigError
from jobledger.lifecycle import Claim, Lifecycle
from jobledger.model import (
    CLAIMABLE_STATES,
    NAME_MAX_LENGTH,
    STAND_IN_NONCE,
    Instance,
    InstanceState,
    JobRecord,
    JobState,
    Republish,
)
from jobledger.server.errors import ApiError
from jobledger.server.inputs import job_id, parse_arguments, storable
from jobledger.stores.base import KEEP, Store, Transition

#: The queue system recorded for jobs reported over HTTP that name none: the seed's Sidekiq.
SEED_SYSTEM = "sidekiq"
#: The nonce given to instances that beat over HTTP without one.
HTTP_NONCE = "http"
#: The owner of jobs started by clients that name no instance; the supervisor beats for it.
UNTRACKED = Instance(
    name="http-untracked", nonce=STAND_IN_NONCE, hostname=socket.gethostname(), pid=0
)

EventKind = Literal["queued", "started", "complete", "failed"]

_QUEUED_FROM = frozenset({JobState.STAGED, JobState.RETRYING, JobState.FAILED, JobState.DEAD})

#: The longest queue system name the ledger stores (the API's ``system`` filter takes as long).
SYSTEM_MAX_LENGTH = 64

Name = Field(default=None, min_length=1, max_length=NAME_MAX_LENGTH)


class JobEvent(BaseModel):
    """The fields of a seed event body (form or JSON). ``arguments`` is a JSON string."""

    model_config = ConfigDict(extra="ignore")

    arguments: str | None = Field(default=None, description="The job's arguments, as JSON text.")
    job_class: str | None = Name
    queue: str | None = Name
    system: str = Field(
        default=SEED_SYSTEM,
        min_length=1,
        max_length=SYSTEM_MAX_LENGTH,
        pattern=r"^[a-z0-9_.-]+$",
        description="The client's queue system (recorded when the job is first reported).",
    )
    instance: str | None = Field(
        default=None,
        min_length=1,
        max_length=NAME_MAX_LENGTH,
        description="The reporting instance (name or name:nonce), for orphan detection.",
    )
    error: str | None = Field(default=None, description="Why the job failed (failed only).")
    will_retry: bool = Field(default=False, description="failed only: the client retries it.")
    jobledger_generation: int | None = Field(
        default=None,
        ge=0,
        le=2**31 - 1,
        description="started only: the payload's jobledger_generation, when it has one.",
    )
    jobledger_republish: Republish | None = Field(
        default=None,
        description="started only: the payload's jobledger_republish, when it has one.",
    )

    @field_validator("jobledger_generation", "jobledger_republish", mode="before")
    @classmethod
    def _blank_is_absent(cls, value: object) -> object:
        """A form field sent empty (a payload without the key) means the key is absent."""
        return None if value == "" else value

    @field_validator("arguments", "job_class", "queue", "instance", "error")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        if value is not None:
            if "\x00" in value:
                raise ValueError("text must not contain NUL characters")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode") from None
        return value


class NewJob(JobEvent):
    """``POST /api/v1/jobs``: the seed's enqueue report."""

    job_id: str = Field(min_length=1, max_length=NAME_MAX_LENGTH)


class BatchEvent(JobEvent):
    """One event of ``POST /api/v1/events``."""

    event: EventKind
    job_id: str = Field(min_length=1, max_length=NAME_MAX_LENGTH)


class Heartbeat(BaseModel):
    """``POST /api/v1/instances/{name}/heartbeat``: an HTTP client's "alive"."""

    model_config = ConfigDict(extra="ignore")

    nonce: str = Field(default=HTTP_NONCE, pattern=r"^[A-Za-z0-9_.@+=~,-]{1,50}$")
    hostname: str = Field(default="", max_length=NAME_MAX_LENGTH, pattern=r"^[^\x00]*$")
    pid: int = Field(default=0, ge=0, le=2**31 - 1)
    queues: list[str] | str = Field(default_factory=list)
    state: InstanceState = InstanceState.RUNNING

    @field_validator("nonce")
    @classmethod
    def _not_a_stand_in(cls, value: str) -> str:
        """A client beating as the stand-in would be left out of the workers counted."""
        if value == STAND_IN_NONCE:
            raise ValueError(f"the nonce {STAND_IN_NONCE!r} is reserved for the supervisor")
        return value


@dataclass(frozen=True)
class Outcome:
    """What an event did: ``applied`` False means it changed nothing (a duplicate or late)."""

    job_id: str
    state: JobState
    applied: bool
    outcome: str
    created: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.job_id,
            "state": self.state.value,
            "applied": self.applied,
            "outcome": self.outcome,
            "created": self.created,
        }


def owner_of(instance: str | None) -> str | None:
    """An instance id from a client's ``instance`` (``name`` or ``name:nonce``)."""
    if instance is None:
        return None
    name, _, nonce = instance.partition(":")
    job_id(name, "instance")
    if nonce:
        job_id(nonce, "instance")
    if len(name) > 200:
        raise ApiError(422, "instance name must be at most 200 characters", "instance")
    return f"{name}:{nonce or HTTP_NONCE}"


def _record(jid: str, event: JobEvent, state: JobState, owner: str | None = None) -> JobRecord:
    if event.job_class is None:
        raise ApiError(
            404,
            f"job {jid} is not in the ledger; send job_class (and arguments, queue) to record it",
            "job_class",
        )
    args, kwargs = parse_arguments(event.arguments)
    try:
        return JobRecord(
            id=jid,
            name=event.job_class,
            system=event.system,
            queue=event.queue or "default",
            args=args,
            kwargs=kwargs,
            state=state,
            owner=owner,
            attempts=1 if state is not JobState.QUEUED else 0,
        )
    except ConfigError as exc:
        raise ApiError(422, str(exc), "job_class") from None


def queued(store: Store, jid: str, event: JobEvent) -> Outcome:
    """The client enqueued the job: record it (or move a retried/restarted one to queued)."""
    jid = job_id(jid)
    if store.create(_record(jid, event, JobState.QUEUED)):
        return Outcome(jid, JobState.QUEUED, True, "created", created=True)
    current = store.get(jid)
    if current is None:  # deleted between the two calls: record it once more
        return queued(store, jid, event)
    if current.state in _QUEUED_FROM and store.transition(
        jid, Transition(to=JobState.QUEUED, expect=frozenset({current.state}))
    ):
        return Outcome(jid, JobState.QUEUED, True, "requeued")
    return Outcome(jid, current.state, False, "duplicate")


def started(store: Store, jid: str, event: JobEvent, ttl: float) -> Outcome:
    """The client began running the job: claim it for its instance (invariant 2).

    A client that forwards the ``jobledger_generation`` and ``jobledger_republish`` keys of a
    payload jobledger pushed claims as a worker integration does: a restart's or recovery's
    message that runs before the republisher's own move landed is accounted in the claim
    (``restarts`` or ``recoveries`` + 1, the new generation), so the ledger counts it however
    fast the Ruby side is. Without them a restarted job still runs and is recorded, but its
    restart is counted only if the restart's move lands before the job's first report.
    """
    jid = job_id(jid)
    owner = owner_of(event.instance) or UNTRACKED.id
    record = _record(jid, event, JobState.STARTED, owner) if event.job_class else None
    try:
        claim = Lifecycle(store, owner=owner, ttl=ttl).claim(
            jid,
            record,
            generation=event.jobledger_generation,
            republish=event.jobledger_republish,
        )
    except LookupError:
        _record(jid, event, JobState.STARTED)  # raises the 404 naming job_class
        raise
    state = JobState.STARTED
    if claim is Claim.ALREADY_SUCCEEDED:
        state = JobState.SUCCEEDED
    elif claim is Claim.CANCELLED:
        state = JobState.CANCELLED
    return Outcome(jid, state, claim.should_run, claim.value, claim is Claim.CREATED)


def finished(store: Store, jid: str, event: JobEvent, to: JobState) -> Outcome:
    """The client finished the job (``to`` succeeded, failed or retrying).

    Only the owner finishes (invariant 3): a client naming an instance that no longer owns the
    job is refused with a 409. A job reported finished without having been reported started is
    claimed first, so its record still reads queued → started → finished.
    """
    jid = job_id(jid)
    error = None
    if to is not JobState.SUCCEEDED:
        if not event.error:
            raise ApiError(422, "a failed event needs the error", "error")
        error = event.error
    owner = owner_of(event.instance)
    current = store.get(jid)
    if current is None:
        record = _record(jid, event, to, owner or UNTRACKED.id)
        if error is not None:
            record = replace(record, error=error)
        if store.create(record):
            return Outcome(jid, to, True, "created", created=True)
        current = store.get(jid)
        if current is None:
            raise ApiError(409, f"job {jid} changed meanwhile; send the event again", "job_id")
    if current.state is to:
        return Outcome(jid, to, False, "duplicate")
    if current.state in CLAIMABLE_STATES:
        claim = Transition(
            to=JobState.STARTED,
            expect=frozenset({current.state}),
            owner=owner or UNTRACKED.id,
        )
        if not store.transition(jid, claim):
            raise ApiError(409, f"job {jid} changed meanwhile; send the event again", "job_id")
    elif current.state is not JobState.STARTED:
        raise ApiError(
            409, f"job {jid} is {current.state.value}: cannot record it as {to.value}", "job_id"
        )
    change = Transition(
        to=to,
        expect=frozenset({JobState.STARTED}),
        expect_owner=owner or UNTRACKED.id,  # an anonymous event never finishes a worker's job
        error=KEEP if error is None else error,
    )
    if store.transition(jid, change):
        return Outcome(jid, to, True, "finished")
    latest = store.get(jid)
    now = f"{latest.state.value} (owner {latest.owner or 'none'})" if latest else "gone"
    by = owner or "an event that names no instance"
    raise ApiError(
        409, f"job {jid} is {now}: not finished by {by}; the result is not applied", "instance"
    )


#: The most queues an instance may list: what the ledger's instances table holds comfortably.
MAX_QUEUES = 100


def heartbeat(store: Store, name: str, beat: Heartbeat) -> Instance:
    """Register or refresh an HTTP client's instance on the ledger's clock."""
    name = job_id(name, "name")
    if ":" in name or len(name) > 200:
        raise ApiError(422, "instance name must be 1-200 characters without ':'", "name")
    queues = beat.queues.split(",") if isinstance(beat.queues, str) else beat.queues
    queues = [storable(q.strip(), "queues") for q in queues if q.strip()]
    if len(queues) > MAX_QUEUES or any(len(q) > NAME_MAX_LENGTH for q in queues):
        raise ApiError(
            422, f"at most {MAX_QUEUES} queues of 1-{NAME_MAX_LENGTH} characters each", "queues"
        )
    instance = Instance(
        name=name,
        nonce=beat.nonce,
        hostname=storable(beat.hostname, "hostname"),
        pid=beat.pid,
        queues=tuple(queues),
        state=beat.state,
    )
    store.heartbeat(instance)
    return instance
