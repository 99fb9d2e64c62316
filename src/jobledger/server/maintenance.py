"""The supervisor's background loops: the recovery sweep, the outbox relay, pruning, and the
heartbeat of the stand-in owner of HTTP jobs started without an instance.

Each loop is a daemon thread that runs its task after ``first_delay`` and then every
``interval`` seconds, logs (and counts) a failure and carries on, and stops promptly when asked:
the wait is an :class:`threading.Event`, so shutdown never waits out an interval. Adding a loop
is one :class:`Loop` in :func:`maintenance_loops`.
"""

from __future__ import annotations

import logging

from jobledger.config import Settings
from jobledger.heartbeat import Health
from jobledger.integrations.base import Registry
from jobledger.loop import Loop
from jobledger.manager import Manager
from jobledger.model import JobRecord, Republish
from jobledger.recovery import MOVED, Recovery
from jobledger.relay import Relay, RelayLoop
from jobledger.server.events import UNTRACKED
from jobledger.server.metrics import Metrics
from jobledger.stores.base import Store

log = logging.getLogger(__name__)


def untracked_heartbeat(store: Store, settings: Settings, metrics: Metrics, health: Health) -> Loop:
    """Keeps :data:`~jobledger.server.events.UNTRACKED` alive while the supervisor runs; its
    beats also tell ``health`` how long the ledger has answered without a break, which the
    supervisor's recovery waits to reach a TTL before it declares anybody dead."""

    def beat() -> None:
        store.heartbeat(UNTRACKED)
        health.mark_ok()

    def failed() -> None:
        health.mark_failed()
        metrics.ledger_errors.inc()

    return Loop("http-untracked-heartbeat", settings.heartbeat_interval, beat, on_error=failed)


def maintenance_loops(
    store: Store,
    settings: Settings,
    manager: Manager,
    integrations: Registry,
    metrics: Metrics,
    health: Health,
) -> list[Loop]:
    """The loops ``jobledger serve`` runs unless ``--no-maintenance`` (``health``: the one
    :func:`untracked_heartbeat` keeps)."""

    def publish(record: JobRecord, *, reason: Republish) -> None:
        integrations.get(record.system).publish(record, reason=reason)

    recovery = Recovery.from_settings(
        store,
        settings,
        publish=publish,
        ledger_up_for=lambda: health.up_for,
        probe=integrations.probe,
    )

    def sweep() -> None:
        report = recovery.sweep_once()
        moved = sum(len(report.ids(o)) for o in MOVED)
        if moved:
            metrics.count_recoveries(moved)

    def prune() -> None:
        counts = manager.prune()
        metrics.pruned.inc(sum(counts.values()))
        if any(counts.values()):
            log.info("pruned %s", ", ".join(f"{n} {state}" for state, n in counts.items()))

    errors = metrics.ledger_errors.inc
    relays: list[Loop] = []
    systems = integrations.systems()
    if settings.relay and systems:  # staged jobs of other systems wait for their own relays
        relay = Relay.from_settings(
            store, settings, publish=integrations.publish_many, systems=systems
        )
        relays.append(
            RelayLoop(
                relay,
                interval=settings.relay_interval,
                max_backoff=settings.relay_max_backoff,
                on_error=errors,
            )
        )
    watchers = [
        watch.watch_loop(recovery, on_moved=metrics.count_recoveries, on_error=errors)
        for watch in integrations.watchers()
    ]
    return [
        *relays,
        *watchers,
        Loop(
            "recovery",
            settings.recovery_interval,
            sweep,
            first_delay=min(1.0, settings.recovery_interval),
            on_error=errors,
        ),
        Loop(
            "prune",
            settings.prune_interval,
            prune,
            first_delay=min(5.0, settings.prune_interval),
            on_error=errors,
        ),
    ]
