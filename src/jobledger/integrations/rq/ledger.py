"""The RQ worker's ledger side: everything here is queue-agnostic glue to the core.

Per-process stores (a work horse forked per job must not share its parent's connections),
fork safety on SQLite, the instance's registration and heartbeat, the recovery and relay
loops, the claim and finish writes, and the drain at shutdown. It is kept in this one module,
built only from the core's classes, so that moving RQ onto the shared worker runtime (issue 9,
item 1) replaces this module and nothing else.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence

from jobledger.config import Settings
from jobledger.errors import JobLedgerError, SchemaMissing
from jobledger.heartbeat import Health, Heartbeat, new_instance
from jobledger.integrations.base import PublishBatch
from jobledger.lifecycle import Claim, Lifecycle
from jobledger.model import JobRecord, JobState, Republish
from jobledger.recovery import ProbeLookup, Publisher, Recovery
from jobledger.relay import Relay, RelayLoop
from jobledger.runtime.forksafe import guarded, install_fork_hooks
from jobledger.runtime.maintenance import RecoveryLoop
from jobledger.stores import Store, store_for

log = logging.getLogger(__name__)

_PENDING = frozenset({JobState.QUEUED, JobState.RETRYING})


class WorkerLedger:
    """One worker's instance in the ledger, shared with the work horses it forks."""

    def __init__(
        self,
        settings: Settings,
        *,
        system: str,
        publish: Publisher,
        publish_many: PublishBatch,
        probe: ProbeLookup | None = None,
        store_factory: Callable[[], Store] | None = None,
    ) -> None:
        self.settings = settings
        self.system = system
        self._publish = publish
        self._publish_many = publish_many
        self._probe = probe
        self._factory = store_factory or (lambda: store_for(settings))
        self._stores: dict[int, Store] = {}
        self._lock = threading.Lock()
        self.health = Health(settings.ttl)  # shared memory: horses read what the beat wrote
        self.instance_id: str | None = None
        self.heartbeat: Heartbeat | None = None
        self._loops: list[RecoveryLoop | RelayLoop] = []

    @property
    def store(self) -> Store:
        """This process's store (opened on first use in each process)."""
        pid = os.getpid()
        with self._lock:
            found = self._stores.get(pid)
            if found is None:
                found = self._stores[pid] = self._factory()
            return found

    def lifecycle(self) -> Lifecycle:
        assert self.instance_id is not None
        return Lifecycle(
            self.store,
            self.instance_id,
            self.settings.ttl,
            delete_on_success=self.settings.keep_succeeded == 0,
            max_recoveries=self.settings.max_recoveries,
            recovery_window=self.settings.recovery_window,
        )

    def recovery(self) -> Recovery:
        """Recovery of this system's jobs only (another system's job published here is lost)."""
        return Recovery.from_settings(
            self.store,
            self.settings,
            publish=self._publish,
            systems={self.system},
            ledger_up_for=lambda: self.health.up_for,
            probe=self._probe,
        )

    # -- the worker's main process -------------------------------------------------------
    def start(
        self, queues: Sequence[str], holding: Callable[[], Sequence[tuple[str, int]]]
    ) -> None:
        """Register the instance and start beating, sweeping and relaying. A ledger without
        its schema ends the worker with one line; an unreachable one is an outage the
        heartbeat waits out."""
        install_fork_hooks()
        with self._lock:
            pid = os.getpid()
            store = self._stores.get(pid) or self._factory()
            self._stores[pid] = guarded(store)  # SQLite only: no lock on other stores' calls
        instance = new_instance(self.settings, queues)
        self.instance_id = instance.id
        self.heartbeat = Heartbeat(
            self.store,
            instance,
            interval=self.settings.heartbeat_interval,
            ttl=self.settings.ttl,
            in_flight=lambda: len(holding()),
            health=self.health,
            holding=holding,
        )
        self.heartbeat.start()
        if isinstance(self.heartbeat.last_error, SchemaMissing):
            self.heartbeat.stop()
            print(f"jobledger: {self.heartbeat.last_error}", file=sys.stderr, flush=True)
            raise SystemExit(1)
        self._loops = [
            RecoveryLoop(
                self.recovery(),
                interval=self.settings.recovery_interval,
                enabled=lambda: self.health.can_claim,
            )
        ]
        if self.settings.relay:
            self._loops.append(self._relay_loop())
        for loop in self._loops:
            loop.start()
        log.info("jobledger instance %s registered", instance.id)

    def _relay_loop(self) -> RelayLoop:
        store = self._factory()  # its own: a batch's publishes must not hold up the heartbeat
        store = guarded(store)
        relay = Relay.from_settings(
            store, self.settings, publish=self._publish_many, systems={self.system}
        )
        return RelayLoop(
            relay,
            interval=self.settings.relay_interval,
            max_backoff=self.settings.relay_max_backoff,
            enabled=lambda: self.health.can_claim,
        )

    def wake(self) -> None:
        """Beat soon: the instance holds a new job the ledger should know of."""
        if self.heartbeat is not None:
            self.heartbeat.wake()

    def stop(self) -> None:
        """Stop the loops, keep beating until nothing is held (invariant 4), deregister."""
        for loop in self._loops:
            loop.stop()
            if isinstance(loop, RelayLoop):
                loop.relay.store.close()
        if self.heartbeat is not None:
            self.heartbeat.mark_draining()
            self.heartbeat.drain(timeout=self.settings.ttl)

    # -- around a job --------------------------------------------------------------------
    def claim(
        self, job_id: str, record: JobRecord, generation: int | None, reason: Republish | None
    ) -> Claim | None:
        """The claim guard (invariant 2); None if the ledger could not be asked (the body
        runs unclaimed then: at least once beats not at all)."""
        try:
            return self.lifecycle().claim(job_id, record, generation=generation, republish=reason)
        except JobLedgerError as exc:
            log.warning("job %s runs unclaimed, the ledger is unavailable: %s", job_id, exc)
            return None

    def finish(self, job_id: str, write: Callable[[Lifecycle], bool]) -> None:
        """A finish write; a ledger error is logged (the sweep settles the job)."""
        try:
            if not write(self.lifecycle()):
                log.warning("job %s: its end was not recorded, another actor moved it", job_id)
        except JobLedgerError as exc:
            log.warning("job %s: its end could not be recorded: %s", job_id, exc)

    def lost(self, job_id: str, generation: int, why: str) -> None:
        """Put back the job of a child process that died under it: started here at the
        delivered generation (recovered, as its orphan policy says), or still queued there
        (its claim never landed; requeued, superseding any run it may have started)."""
        try:
            record = self.store.get(job_id)
            if record is None or record.generation != generation:
                return  # republished meanwhile: that newer message is the job's
            if record.state is JobState.STARTED and record.owner == self.instance_id:
                self.recovery().recover(record, why=why)
            elif record.state in _PENDING:
                self.recovery().requeue(record, why=why, reason=Republish.RECOVERY)
        except JobLedgerError as exc:
            log.warning("job %s lost its process; the sweep will recover it: %s", job_id, exc)
