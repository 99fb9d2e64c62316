"""The Integration seam: the glue between the ledger and one queue system, and the contract an
adapter keeps.

**The way back.** An integration can :meth:`~Integration.publish` a job record back onto its
queue with the original id, name, args, queue and options, which is all that restart and
recovery need (invariant 10: no task code required); :class:`BatchPublisher` and
:class:`QueueProbe` are optional. The core finds integrations through :data:`registry`, and
:data:`KNOWN` says which extra brings each queue system and how the CLI reaches its broker.

**The way in: the adapter contract.** An adapter builds one
:class:`~jobledger.runtime.worker.WorkerRuntime` (``runtime``) and maps its queue's hooks onto
it. It must:

1. *At publish* (client side), for every tracked job: create the ``queued`` record
   (``runtime.store.create``) with name, args, kwargs, queue and every option needed to publish
   it again, without letting a ledger error stop the publish (count ``publish_unrecorded``);
   and put in the message the job's fencing generation (0 for a first publish; a retry's
   message continues the run's, ``runtime.guard.running(job_id).generation``) and, for its own
   :meth:`~Integration.publish`, the :class:`~jobledger.model.Republish` reason. A publish
   that raises after its record was written calls ``runtime.outcomes.unpublished``.
   A publish from inside a running job (its retry) calls ``runtime.guard.retrying`` first.
2. *In the main process, before any child forks*: ``runtime.register(queues=..., in_flight=...,
   held=..., on_beat=...)`` (it raises :class:`~jobledger.errors.ConfigError` or
   :class:`~jobledger.errors.SchemaMissing` when the worker cannot work at all: end the worker
   with one line); once it consumes, ``runtime.start()``; for each tracked delivery it hands to
   a child, ``runtime.received(record)``; in a new child, ``runtime.child_started()``.
3. *Around every body*: ``runtime.guard.run(Delivery(record, generation, republish, restart),
   body, judge)``, where ``judge`` maps the queue's own exceptions to an
   :class:`~jobledger.runtime.guard.End` (a retry, a requeue...). It raises
   :class:`~jobledger.errors.DeliverySkipped` when the body must not run: acknowledge the
   delivery and store no result. Where the queue's hooks surround the body instead of
   wrapping it (RQ's, Dramatiq's): ``guard.begin(delivery)`` before it and
   ``guard.end(run, end, error)`` after it; a retry whose publish the queue reports apart
   from the body's end sets ``run.retry_sent``, and a retrying run whose retry did not go
   ends ``FAILED``.
4. *For each end a child cannot record*: a child lost under its job
   (``runtime.outcomes.lost``), killed at a hard time limit (``outcomes.timed_out``), a revoke
   or expiry (``outcomes.cancelled``).
5. *At shutdown*: ``runtime.mark_draining()`` when it begins (safe in a signal handler), and
   ``runtime.drain()`` once the children finished; if the ledger is unreachable
   (``on_beat(False)``), stop taking jobs until it answers (invariant 9).

What it gets for free: per-process stores, pending writes and the durable journal (a ledger
outage never loses a claim or an outcome), fork safety, the heartbeat with what the worker
holds, the claim's generation fencing and poison-pill cap, the recovery sweep, the outbox relay
and the held-jobs audit, each paused while the ledger is out of reach, and the drain.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from jobledger.errors import ConfigError, IntegrationMissing, MessageRefused, PublishError
from jobledger.model import JobRecord, Republish

if TYPE_CHECKING:
    from jobledger.config import Settings
    from jobledger.recovery import Recovery
    from jobledger.runtime.service import Loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Known:
    """A queue system jobledger ships an integration for, and what the CLI says about it."""

    #: The pip extra that brings the queue system (``pip install 'jobledger[<extra>]'``).
    extra: str
    #: The integration's module. Its ``install_for_broker(url, settings)`` returns an
    #: integration that publishes by job name alone, for ``--broker``.
    module: str
    #: What ``--app`` names for it, for the hint when no integration is registered.
    app: str
    #: The module the extra brings, that tells whether the queue system is installed here
    #: (default: the system's name).
    requires: str | None = None
    #: What to do instead of ``--app``/``--broker`` for a command to reach it, where the
    #: settings do (default: pass one of those).
    reach: str | None = None


#: The queue systems jobledger ships integrations for (an adapter adds its entry with its
#: extra in ``pyproject.toml``).
KNOWN: dict[str, Known] = {
    "celery": Known(
        extra="celery",
        module="jobledger.integrations.celery",
        app="your Celery app's module (as for celery -A)",
    ),
    "rq": Known(
        extra="rq",
        module="jobledger.integrations.rq",
        app="a module that installs jobledger's RQ integration",
    ),
    "sidekiq": Known(
        extra="sidekiq",
        module="jobledger.integrations.sidekiq",
        app="a module that installs the Sidekiq integration",
        requires="redis",
        reach="set JOBLEDGER_SIDEKIQ_REDIS_URL to your Sidekiq app's Redis",
    ),
}


def install_for_broker(system: str, url: str, settings: Settings) -> Integration:
    """Install ``system``'s integration on a bare client of the broker at ``url``: enough to
    publish jobs by name (recovery, restart, the relay) without the task code (invariant 10).
    :class:`~jobledger.errors.ConfigError` for a system jobledger has no integration for, or
    whose queue system is not installed."""
    known = KNOWN.get(system)
    if known is None:
        raise ConfigError(
            f"no integration of jobledger's for queue system {system!r} (known: "
            f"{', '.join(sorted(KNOWN))})"
        )
    try:
        module = importlib.import_module(known.module)
    except ImportError as exc:
        raise ConfigError(
            f"--broker for {system} needs it installed ({exc}): pip install "
            f"'jobledger[{known.extra}]'"
        ) from None
    integration: Integration = module.install_for_broker(url, settings)
    return integration


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


@runtime_checkable
class ProcessWatch(Protocol):
    """An integration that tells a dead worker process from its queue system's own heartbeats
    (Sidekiq's), for workers that report to the ledger without beating into it. Optional: the
    supervisor runs its loop beside the recovery sweep."""

    def watch_loop(
        self, recovery: Recovery, *, on_moved: Callable[[int], None], on_error: Callable[[], None]
    ) -> Loop:
        """A loop that pushes back, through ``recovery``, the jobs of processes that died;
        ``on_moved`` gets how many jobs a look moved, ``on_error`` is called when one fails."""


#: Publishes a batch of jobs; what the relay and the outbox's fast path call.
PublishBatch = Callable[[Sequence[JobRecord]], Published]

#: Called with a job record (its new generation) and why, just before recovery, a requeue or
#: a restart publishes the job again: see :meth:`Registry.on_republish`.
RepublishHook = Callable[[JobRecord, Republish], None]


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
        self._hooks: list[RepublishHook] = []
        self._lock = threading.Lock()

    def on_republish(self, hook: RepublishHook) -> RepublishHook:
        """Call ``hook(record, reason)`` before every republish of a job by this process's
        recovery sweep, requeue or restart: where an external lock library (celery-once,
        celery-singleton) holds a lock for the job that the dead run will never release, the
        hook clears it (see :mod:`jobledger.contrib.celery_once`). A hook that raises is
        logged and the republish goes on: a lock must not keep a job from being recovered.
        Returns ``hook`` (usable as a decorator)."""
        with self._lock:
            if hook not in self._hooks:
                self._hooks.append(hook)
        return hook

    def remove_republish_hook(self, hook: RepublishHook) -> None:
        with self._lock:
            if hook in self._hooks:
                self._hooks.remove(hook)

    def republishing(self, record: JobRecord, reason: Republish) -> None:
        """Run the :meth:`on_republish` hooks for ``record``, before it is published again."""
        with self._lock:
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                hook(record, reason)
            except Exception:
                log.exception("the republish hook %r failed for job %s", hook, record.id)

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
        known = KNOWN.get(system)
        how = (
            f"install it with pip install 'jobledger[{known.extra}]' and install the "
            "integration on your app in this process"
            if known
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

    def watchers(self) -> list[ProcessWatch]:
        """The integrations that watch their own processes' heartbeats."""
        with self._lock:
            found = list(self._by_system.values())
        return [i for i in found if isinstance(i, ProcessWatch)]

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
