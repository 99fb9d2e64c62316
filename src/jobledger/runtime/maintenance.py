"""The maintenance loops, composed once: the recovery sweep and the outbox relay (and, in the
supervisor, pruning). A worker runs them limited to its own queue system and paused while it
cannot reach the ledger; ``jobledger serve`` runs them for every registered system.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from jobledger.config import Settings
from jobledger.integrations.base import PublishBatch
from jobledger.recovery import MOVED, ProbeLookup, Publisher, Recovery, SweepReport
from jobledger.relay import Relay, RelayLoop
from jobledger.runtime.service import Loop, Service
from jobledger.stores.base import Store


def _always() -> bool:
    return True


def _nothing() -> None:
    return None


class RecoveryLoop(Loop):
    """:meth:`Recovery.sweep_once` shortly after start, then every ``interval`` seconds.

    ``enabled`` (e.g. the heartbeat's ``can_claim``) is asked before each sweep: an instance
    that cannot reach the ledger does not sweep. ``on_moved`` hears how many jobs a sweep moved.
    """

    def __init__(
        self,
        recovery: Recovery,
        *,
        interval: float,
        first_delay: float | None = None,
        enabled: Callable[[], bool] = _always,
        on_error: Callable[[], None] = _nothing,
        on_moved: Callable[[int], object] = lambda moved: None,
    ) -> None:
        super().__init__(
            "recovery",
            interval,
            self._sweep,
            first_delay=min(interval, 1.0) if first_delay is None else first_delay,
            on_error=on_error,
        )
        self.recovery = recovery
        self.enabled = enabled
        self.on_moved = on_moved
        self.sweeps = 0

    def _sweep(self) -> SweepReport | None:
        if not self.enabled():
            return None
        report = self.recovery.sweep_once()
        self.sweeps += 1
        moved = sum(len(report.ids(o)) for o in MOVED)
        if moved:
            self.on_moved(moved)
        return report


def maintenance_loops(
    store: Store,
    settings: Settings,
    *,
    publish: Publisher,
    publish_many: PublishBatch,
    systems: Collection[str] | None,
    relay_systems: Collection[str] | None,
    ledger_up_for: Callable[[], float],
    probe: ProbeLookup | None,
    journaled: Callable[[Collection[str]], set[str]] | None = None,
    relay_store: Callable[[], Store] | None = None,
    enabled: Callable[[], bool] = _always,
    on_error: Callable[[], None] = _nothing,
    on_moved: Callable[[int], object] = lambda moved: None,
) -> list[Service]:
    """The relay of ``relay_systems``' staged jobs (if ``settings.relay``; on
    ``relay_store()``'s store, default ``store``) and the recovery sweep of ``systems``' orphans
    (None: all), each run while ``enabled()``."""
    recovery = Recovery.from_settings(
        store,
        settings,
        publish=publish,
        systems=systems,
        ledger_up_for=ledger_up_for,
        probe=probe,
        journaled=journaled,
    )
    loops: list[Service] = []
    if settings.relay:
        relay = Relay.from_settings(
            relay_store() if relay_store is not None else store,
            settings,
            publish=publish_many,
            systems=relay_systems,
        )
        loops.append(
            RelayLoop(
                relay,
                interval=settings.relay_interval,
                max_backoff=settings.relay_max_backoff,
                enabled=enabled,
                on_error=on_error,
            )
        )
    loops.append(
        RecoveryLoop(
            recovery,
            interval=settings.recovery_interval,
            enabled=enabled,
            on_error=on_error,
            on_moved=on_moved,
        )
    )
    return loops
