"""The supervisor's background loops: the recovery sweep, the outbox relay, pruning, and the
heartbeat of the stand-in owner of HTTP jobs started without an instance.

The recovery and relay loops are the worker runtime's own composition
(:func:`jobledger.runtime.maintenance.maintenance_loops`), here for every registered queue
system; each loop is a :class:`~jobledger.runtime.service.Service`, stopped promptly when asked.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from jobledger.config import Settings
from jobledger.heartbeat import Health
from jobledger.integrations.base import Registry
from jobledger.manager import Manager
from jobledger.runtime.maintenance import RecoveryLoop
from jobledger.runtime.maintenance import maintenance_loops as maintenance_loops_for
from jobledger.runtime.service import Loop, Service
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
) -> list[Service]:
    """The loops ``jobledger serve`` runs unless ``--no-maintenance`` (``health``: the one
    :func:`untracked_heartbeat` keeps): the runtime's recovery and relay loops for every
    registered system, the process watch of each integration that has one (Sidekiq's), and
    pruning."""

    def prune() -> None:
        counts = manager.prune()
        metrics.pruned.inc(sum(counts.values()))
        if any(counts.values()):
            log.info("pruned %s", ", ".join(f"{n} {state}" for state, n in counts.items()))

    errors = metrics.ledger_errors.inc
    loops = maintenance_loops_for(
        store,
        replace(settings, relay=settings.relay and bool(integrations.systems())),
        publish=integrations.publish,
        publish_many=integrations.publish_many,
        systems=None,
        # staged jobs of systems without an integration here wait for their own relays
        relay_systems=integrations.systems(),
        ledger_up_for=lambda: health.up_for,
        probe=integrations.probe,
        on_error=errors,
        on_moved=metrics.count_recoveries,
    )
    prune_loop = Loop(
        "prune",
        settings.prune_interval,
        prune,
        first_delay=min(5.0, settings.prune_interval),
        on_error=errors,
    )
    # each integration that watches its own processes (Sidekiq's) pushes their jobs back
    # through the same recovery as the sweep
    recovery = next(loop.recovery for loop in loops if isinstance(loop, RecoveryLoop))
    watchers = [
        watch.watch_loop(recovery, on_moved=metrics.count_recoveries, on_error=errors)
        for watch in integrations.watchers()
    ]
    return [*loops, *watchers, prune_loop]
