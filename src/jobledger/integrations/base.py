"""The Integration seam: the glue between the ledger and one queue system.

An integration observes its queue's hooks and turns them into ledger transitions (that part is
specific to each queue), and it can :meth:`~Integration.publish` a job record back onto its queue
with the original id, name, args, queue and options, which is all that restart and recovery need
(invariant 10: no task code required). The core finds integrations through :class:`Registry`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from jobledger.errors import IntegrationMissing, MessageRefused, PublishError
from jobledger.model import JobRecord, Republish

#: The extra that brings each known queue system's integration.
EXTRAS = {"celery": "celery", "rq": "rq", "dramatiq": "dramatiq", "sidekiq": "sidekiq"}


@runtime_checkable
class Integration(Protocol):
    """One queue system, as the core sees it."""

    #: The queue system's name as job records carry it (``celery``, ``rq``, ...).
    system: str

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        """Put the job on its queue again, same id; raise :class:`~jobledger.errors.PublishError`
        if the broker did not take it. Returning means the broker accepted the message.

        The message must carry ``record.generation`` and ``reason`` (why it is republished;
        None for a first publish, as the relay's) for the worker's claim to read back: that
        is how a claim tells the current delivery from a stray older one (invariant 2)."""


@dataclass
class Published:
    """What a batch publish did: the ids the broker took, in order; the jobs whose message the
    queue system refused itself (:class:`~jobledger.errors.MessageRefused`: id → why), which do
    not stop the batch; and the error that did stop it (None: the rest went)."""

    ids: list[str] = field(default_factory=list)
    error: PublishError | None = None
    refused: dict[str, str] = field(default_factory=dict)

    def add(self, part: Published) -> bool:
        """Take in what a later part of the same batch did; True if it stopped the batch."""
        self.ids.extend(part.ids)
        self.refused.update(part.refused)
        if part.error is not None:
            self.error = part.error
        return part.error is not None


@runtime_checkable
class BatchPublisher(Protocol):
    """An integration that publishes many jobs at once cheaper than one by one (one broker
    connection for the batch, pipelined where the broker allows). Optional: the relay and the
    fast path fall back to :meth:`Integration.publish` per job."""

    def publish_many(self, records: Sequence[JobRecord]) -> Published:
        """Publish in order; stop at the first job the broker does not take."""


@runtime_checkable
class QueueProbe(Protocol):
    """An integration that can say how many messages its broker holds ready for a queue.
    Optional: with it, the recovery sweep finds queued jobs whose message the broker lost (a
    broker restarted without persistence) by a fact, the queue being empty while the ledger
    waits on them, instead of leaving them to a person."""

    def broker_queue(self, record: JobRecord) -> str | None:
        """The broker queue this job's message waits in, or None where its route does not
        say (a message routed through an exchange to queues it names nowhere): such a job is
        never judged lost."""

    def ready_messages(self, queue: str) -> int | None:
        """Messages waiting in ``queue`` (not those delivered and unacknowledged); None when
        the broker cannot tell or cannot be reached."""


#: Publishes a batch of jobs; what the relay and the outbox's fast path call.
PublishBatch = Callable[[Sequence[JobRecord]], Published]


def publish_one_by_one(
    publish: Callable[[JobRecord], None], records: Sequence[JobRecord]
) -> Published:
    """:meth:`BatchPublisher.publish_many` for a publisher of single jobs."""
    done = Published()
    for record in records:
        try:
            publish(record)
        except MessageRefused as exc:
            done.refused[record.id] = str(exc)
            continue
        except PublishError as exc:
            done.error = exc
            break
        done.ids.append(record.id)
    return done


class Registry:
    """Integrations by queue system. A process usually has one: :data:`registry`."""

    def __init__(self) -> None:
        self._by_system: dict[str, Integration] = {}
        self._lock = threading.Lock()

    def register(self, integration: Integration) -> None:
        """Make ``integration`` the one for its system (replacing an earlier one)."""
        with self._lock:
            self._by_system[integration.system] = integration

    def unregister(self, system: str, integration: Integration | None = None) -> None:
        """Forget the integration for ``system`` (only if it is ``integration``, when given:
        closing one that another replaced must not remove the other)."""
        with self._lock:
            if integration is None or self._by_system.get(system) is integration:
                self._by_system.pop(system, None)

    def get(self, system: str) -> Integration:
        """The integration for ``system``, or :class:`IntegrationMissing` saying how to get one."""
        with self._lock:
            found = self._by_system.get(system)
        if found is not None:
            return found
        extra = EXTRAS.get(system)
        how = (
            f"install it with pip install 'jobledger[{extra}]' and install the integration on "
            "your app in this process"
            if extra
            else "register an integration for it in this process"
        )
        raise IntegrationMissing(
            f"no integration for queue system {system!r} is registered: {how}", system
        )

    def probe(self, system: str) -> QueueProbe | None:
        """The integration of ``system`` if it can count its broker's queues, else None."""
        with self._lock:
            found = self._by_system.get(system)
        return found if isinstance(found, QueueProbe) else None

    def systems(self) -> list[str]:
        with self._lock:
            return sorted(self._by_system)

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        """Publish ``record`` with the integration of its queue system (the one way every
        recoverer and restart goes through the registry)."""
        self.get(record.system).publish(record, reason=reason)

    def publish_many(self, records: Sequence[JobRecord]) -> Published:
        """Publish ``records`` in order, each run of one queue system through its integration
        (batched where it is a :class:`BatchPublisher`); stop at the first refusal."""
        done = Published()
        for system, group in itertools.groupby(records, key=lambda r: r.system):
            try:
                integration = self.get(system)
            except IntegrationMissing as exc:
                done.error = PublishError(str(exc))
                return done
            batch = list(group)
            if isinstance(integration, BatchPublisher):
                part = integration.publish_many(batch)
            else:
                part = publish_one_by_one(integration.publish, batch)
            if done.add(part):
                return done
        return done


#: The process-wide registry integrations add themselves to when installed.
registry = Registry()
