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
from jobledger.integrations.sidekiq.keys import SYSTEM, Keys
from jobledger.integrations.sidekiq.payload import PAYLOAD_OPTION, generation_of
from jobledger.integrations.sidekiq.processes import ProcessReport, forget, read_processes
from jobledger.integrations.sidekiq.unreported import Report, unreported
from jobledger.model import JobRecord, JobState

if TYPE_CHECKING:
    from jobledger.recovery import Outcome, Recovery

log = logging.getLogger(__name__)

_WAITING = frozenset({JobState.QUEUED, JobState.RETRYING})


@dataclass
class _Seen:
    """A process as the watcher last saw it: its beat, since when (monotonic), what it held,
    and the ledger time of the look before that beat was seen (its report came after)."""

    beat: str | None
    since: float
    work: dict[str, dict[str, Any]] = field(default_factory=dict)
    reported_after: float = float("-inf")
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
        self._last_look = float("-inf")  # the ledger's time at the previous look

    def look(self) -> int:
        """One look; returns how many jobs it moved (pushed back, or dead over the cap)."""
        try:
            reports = read_processes(self.client, self.keys)
        except redis.RedisError as exc:
            raise BrokerUnavailable(
                f"cannot read Sidekiq's processes from its Redis: {exc}"
            ) from None
        now = time.monotonic()
        ledger_now = self.recovery.store.now()
        listed = {r.identity for r in reports}
        for identity in set(self._seen) - listed:
            del self._seen[identity]  # left cleanly (or forgotten): its jobs are not ours
        for report in reports:
            self._update(report, now)
        self._last_look = ledger_now
        live = [seen for seen in self._seen.values() if not self._dead(seen, now)]
        moved = 0
        for identity, seen in self._seen.items():
            if self._dead(seen, now) and not seen.handled:
                moved += self._recover(identity, seen, live)
        self._forget_expired()
        return moved

    def _update(self, report: ProcessReport, now: float) -> None:
        seen = self._seen.get(report.identity)
        if seen is None or (report.beat is not None and seen.beat != report.beat):
            seen = self._seen[report.identity] = _Seen(
                report.beat, now, report.work, self._last_look if seen else float("-inf")
            )
        elif report.work:  # a dead process's work expires with its hash: keep the last one
            seen.work = report.work
        seen.expired = report.beat is None

    def _dead(self, seen: _Seen, now: float) -> bool:
        return now - seen.since > self.ttl

    def _recover(self, identity: str, seen: _Seen, live: list[_Seen]) -> int:
        """Push back what a dead process held, reported or not, under the recovery lock;
        leave it for the next look if the lock is taken, a publish failed, or a live process
        has yet to report past one of its unreported jobs' start."""
        from jobledger.recovery import LOCK_NAME, MOVED, Outcome

        recovery = self.recovery
        if not recovery.store.acquire_lock(LOCK_NAME, recovery.token, recovery.lock_ttl):
            return 0
        held = {jid for other in live for jid in other.work}
        try:
            outcomes = [
                self._push_back(jid, payload, identity)
                for jid, payload in seen.work.items()
                if jid not in held
            ]
            late = unreported(
                recovery.store,
                SYSTEM,
                Report(seen.reported_after, seen.work),
                (Report(other.reported_after, other.work) for other in live),
                limit=recovery.batch,
            )
            why = f"started on no live Sidekiq process after {identity} stopped beating"
            outcomes += [recovery.recover(record, why=why) for record in late or ()]
        finally:
            recovery.store.release_lock(LOCK_NAME, recovery.token)
        seen.handled = late is not None and Outcome.PUBLISH_FAILED not in outcomes
        moved = sum(1 for o in outcomes if o in MOVED)
        if moved or seen.handled:
            log.warning(
                "Sidekiq process %s silent for over %.0fs: %d of its jobs moved%s",
                identity,
                self.ttl,
                moved,
                "" if seen.handled else "; the rest at a later look",
            )
        return moved

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
        if record.state in _WAITING:  # the middleware reports the start before the body runs:
            return self.recovery.requeue(held, why=why)  # it never ran, no poison-pill count
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
