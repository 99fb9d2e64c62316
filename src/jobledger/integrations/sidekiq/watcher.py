"""Recovery of dead Sidekiq processes, judged from Sidekiq's own heartbeats.

Sidekiq OSS fetches a job by popping it off its queue: a process killed mid-job (OOM, SIGKILL,
a lost node) takes the job with it. The watcher keeps, for each process in ``processes``, what
its last report held. A process whose ``beat`` has not changed for ``ttl`` seconds, measured on
this process's own monotonic clock (no Ruby host's clock is compared with ours), is dead: each
job it held that the ledger still has unfinished at the generation it held is pushed back
through :meth:`~jobledger.recovery.Recovery.recover` (publish first, then the ledger moves,
with the poison-pill cap), under the recovery lock. A process that left ``processes`` shut
down cleanly and pushed its own unfinished jobs back: nothing is done for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import redis

from jobledger.errors import BrokerUnavailable
from jobledger.integrations.sidekiq.keys import Keys
from jobledger.integrations.sidekiq.payload import PAYLOAD_OPTION, generation_of
from jobledger.integrations.sidekiq.processes import ProcessReport, forget, read_processes
from jobledger.model import JobRecord, JobState, Republish

if TYPE_CHECKING:
    from jobledger.recovery import Outcome, Recovery

log = logging.getLogger(__name__)

_WAITING = frozenset({JobState.QUEUED, JobState.RETRYING})


@dataclass
class _Seen:
    """A process as the watcher last saw it: its beat, since when (monotonic), what it held."""

    beat: str | None
    since: float
    work: dict[str, dict[str, Any]] = field(default_factory=dict)
    handled: bool = False
    expired: bool = False


class ProcessWatcher:
    """Looks at Sidekiq's processes and pushes back the jobs of those that died (one
    :meth:`look` per call; the supervisor's loop calls it)."""

    def __init__(self, client: redis.Redis, keys: Keys, recovery: Recovery, *, ttl: float) -> None:
        self.client = client
        self.keys = keys
        self.recovery = recovery
        self.ttl = ttl
        self._seen: dict[str, _Seen] = {}

    def look(self) -> int:
        """One look; returns how many jobs it moved (pushed back, or dead over the cap)."""
        try:
            reports = read_processes(self.client, self.keys)
        except redis.RedisError as exc:
            raise BrokerUnavailable(
                f"cannot read Sidekiq's processes from its Redis: {exc}"
            ) from None
        now = time.monotonic()
        listed = {r.identity for r in reports}
        for identity in set(self._seen) - listed:
            del self._seen[identity]  # left cleanly (or forgotten): its jobs are not ours
        for report in reports:
            self._update(report, now)
        live = {
            jid for seen in self._seen.values() if not self._dead(seen, now) for jid in seen.work
        }
        moved = 0
        for identity, seen in self._seen.items():
            if self._dead(seen, now) and not seen.handled:
                moved += self._recover(identity, seen, live)
        self._forget_expired()
        return moved

    def _update(self, report: ProcessReport, now: float) -> None:
        seen = self._seen.get(report.identity)
        if seen is None or (report.beat is not None and seen.beat != report.beat):
            seen = self._seen[report.identity] = _Seen(report.beat, now, report.work)
        elif report.work:  # a dead process's work expires with its hash: keep the last one
            seen.work = report.work
        seen.expired = report.beat is None

    def _dead(self, seen: _Seen, now: float) -> bool:
        return now - seen.since > self.ttl

    def _recover(self, identity: str, seen: _Seen, live: set[str]) -> int:
        """Push back what a dead process held, under the recovery lock; leave it for the
        next look if the lock is taken or a publish failed."""
        from jobledger.recovery import LOCK_NAME, MOVED, Outcome

        recovery = self.recovery
        if not recovery.store.acquire_lock(LOCK_NAME, recovery.token, recovery.lock_ttl):
            return 0
        try:
            outcomes = [
                self._push_back(jid, payload, identity)
                for jid, payload in seen.work.items()
                if jid not in live
            ]
        finally:
            recovery.store.release_lock(LOCK_NAME, recovery.token)
        seen.handled = Outcome.PUBLISH_FAILED not in outcomes
        log.warning(
            "Sidekiq process %s stopped beating %.0fs ago holding %d jobs: %d moved",
            identity,
            self.ttl,
            len(seen.work),
            sum(1 for o in outcomes if o in MOVED),
        )
        return sum(1 for o in outcomes if o in MOVED)

    def _push_back(self, jid: str, payload: dict[str, Any], identity: str) -> Outcome | None:
        """One held job: recovered if the ledger still has it unfinished at the generation
        the process held (else it finished, or was pushed back already)."""
        record = self.recovery.store.get(jid)
        if record is None:
            log.warning(
                "Sidekiq job %s held by dead process %s is not in the ledger", jid, identity
            )
            return None
        if record.generation != generation_of(payload):
            return None
        why = f"its Sidekiq process {identity} stopped beating"
        held = _with_payload(record, payload)
        if record.state is JobState.STARTED:
            return self.recovery.recover(held, why=why)
        if record.state in _WAITING:  # its start never reached the ledger
            return self.recovery.requeue(held, why=why, reason=Republish.RECOVERY)
        return None

    def _forget_expired(self) -> None:
        """Drop handled processes whose hash expired from ``processes`` and from memory."""
        for identity, seen in list(self._seen.items()):
            if seen.handled and seen.expired:
                forget(self.client, self.keys, identity)
                del self._seen[identity]


def _with_payload(record: JobRecord, payload: dict[str, Any]) -> JobRecord:
    """The record with the payload the process held, so the push-back keeps its keys."""
    return replace(record, options={**record.options, PAYLOAD_OPTION: payload})
