"""A staged Dramatiq message as a job record: what ``send_with_options`` would enqueue, kept
in the caller's transaction and published after the commit (or by the relay, much later).

A delay becomes an absolute eta at the call, so a job staged with ``delay=60_000`` runs a
minute after it was staged, not a minute after the relay sent it. Arguments that the message
encoder could not send later are refused now, with nothing written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

from dramatiq import Actor, Broker, Message
from dramatiq.errors import ActorNotFound

from jobledger.errors import StagingError
from jobledger.integrations.dramatiq.messages import ETA_OPTION, record_of
from jobledger.model import JobRecord, JobState


def staged_message(
    broker: Broker,
    actor: Actor[Any, Any] | str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
) -> Message[Any]:
    """The message ``actor.send_with_options(args=..., kwargs=..., **options)`` would build;
    an actor known only by name needs ``queue_name``. :class:`StagingError` otherwise."""
    options = dict(options)
    if isinstance(actor, str):
        name = actor
        try:
            actor = broker.get_actor(name)
        except ActorNotFound:
            queue = options.pop("queue_name", None)
            if not queue:
                raise StagingError(
                    f"actor {name} is not declared in this process: import its module, or "
                    "stage it by name with queue_name=..."
                ) from None
            return Message(
                queue_name=str(queue),
                actor_name=name,
                args=tuple(args),
                kwargs=dict(kwargs or {}),
                options=options,
            )
    try:
        return actor.message_with_options(args=tuple(args), kwargs=dict(kwargs or {}), **options)
    except TypeError as exc:
        raise StagingError(f"actor {actor.actor_name}: {exc}") from None


def staged_record(message: Message[Any], delay: int | None, extra: Mapping[str, Any]) -> JobRecord:
    """The ``staged`` record of ``message`` (``delay`` in milliseconds, made absolute now)."""
    try:
        message.encode()
    except Exception as exc:
        raise StagingError(
            f"actor {message.actor_name}: its arguments cannot be encoded: {exc}"
        ) from None
    record = record_of(message, extra, stamped=False)
    options = dict(record.options)
    if delay:
        options[ETA_OPTION] = int(time.time() * 1000) + int(delay)
    return replace(record, options=options, state=JobState.STAGED)


_added = False


def add_unique_option() -> None:
    """Give every actor's ``send_with_options`` a ``unique_key`` option (once per process):
    its message goes through the ledger of the actor's broker
    (:meth:`~jobledger.integrations.dramatiq.middleware.LedgerMiddleware.send_unique`).
    Without the option, or on a broker without jobledger, it sends as before."""
    global _added
    if _added:
        return
    _added = True
    original = Actor.send_with_options

    def send_with_options(
        self: Actor[Any, Any],
        *,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        delay: timedelta | int | None = None,
        unique_key: str | None = None,
        **options: Any,
    ) -> Message[Any]:
        if unique_key is None:
            return original(self, args=args, kwargs=kwargs, delay=delay, **options)
        from jobledger.integrations.dramatiq.middleware import LedgerMiddleware

        ledger = next((m for m in self.broker.middleware if isinstance(m, LedgerMiddleware)), None)
        if ledger is None:
            raise StagingError(
                f"actor {self.actor_name}: unique_key needs jobledger on its broker; call "
                "jobledger.integrations.dramatiq.install(broker) before declaring actors"
            )
        if isinstance(delay, timedelta):
            delay = int(delay.total_seconds() * 1000)
        return ledger.send_unique(self, args, kwargs, delay, unique_key, options)

    Actor.send_with_options = send_with_options  # type: ignore[method-assign]
