"""The questions a person asks the ledger, and the restarts and cancels they order.

This is the seed supervisor's ``JobManager`` (``queued_jobs(match)``, ``uncompleted_jobs(match)``,
…) on any Store: listings are lazy iterators that page through the store in constant memory, and
every restart goes through the Integration seam's ``publish`` *before* the record moves
(invariant 1), keeping the job id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from jobledger.config import Settings
from jobledger.errors import IntegrationMissing, JobNotFound, PublishError
from jobledger.integrations.base import Integration, Registry, registry
from jobledger.model import (
    FINAL_STATES,
    RESTARTABLE_STATES,
    UNCOMPLETED_STATES,
    DurationStats,
    Instance,
    JobRecord,
    JobState,
    QueueStats,
    Republish,
    validate_job_id,
)
from jobledger.query import JobQuery, iter_pages
from jobledger.stores.base import ANY, DurationKind, Store, Transition

log = logging.getLogger(__name__)

#: What ``queued_jobs`` lists: jobs waiting in their broker (a retry waits there too).
WAITING_STATES = frozenset({JobState.QUEUED, JobState.RETRYING})
#: What ``failed_jobs`` lists: jobs that need a person.
FAILED_STATES = frozenset({JobState.FAILED, JobState.DEAD})


#: Why a job named by id was skipped: the ledger has no such job.
NOT_FOUND = "not found"


@dataclass
class ActionReport:
    """What a restart, cancel or prune did (or, with ``dry_run``, would do), job by job."""

    action: str
    dry_run: bool = False
    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def not_found(self) -> list[str]:
        """The ids named that the ledger has no job for (a typo, or a pruned job)."""
        return [job_id for job_id, why in self.skipped.items() if why == NOT_FOUND]


def workers(store: Store, ttl: float) -> list[Instance]:
    """The worker instances the ledger knows, alive or not (judged on the database clock),
    without the supervisor's stand-in: what people count and list as workers."""
    return [i for i in store.instances(ttl) if i.is_worker]


class Manager:
    """Queries, restarts and cancels over one store.

    ``ttl`` is the heartbeat TTL used to tell a running job (owner alive: never restarted) from
    an orphan (owner silent: may be restarted at once instead of waiting for recovery).
    ``explain_missing`` words why a job whose queue system has no integration here was not
    restarted (the CLI names its options; default: the registry's message).
    """

    def __init__(
        self,
        store: Store,
        *,
        integrations: Registry | None = None,
        settings: Settings | None = None,
        explain_missing: Callable[[IntegrationMissing], str] = str,
    ) -> None:
        self.store = store
        self.integrations = integrations if integrations is not None else registry
        self.settings = settings if settings is not None else Settings.from_env()
        self.explain_missing = explain_missing

    def can_publish(self, system: str) -> bool:
        """True if a job of ``system`` can be restarted here (an integration is registered)."""
        return system in self.integrations.systems()

    # -- listings (the seed JobManager's names) --------------------------------------------
    def jobs(self, match: str | None = None, query: JobQuery | None = None) -> Iterator[JobRecord]:
        """Every job (newest first) whose arguments contain ``match``, narrowed by ``query``."""
        return self.store.iter_jobs(_with(query, match))

    def queued_jobs(self, match: str | None = None) -> Iterator[JobRecord]:
        """Jobs waiting in their broker: queued, or waiting for the queue's own retry."""
        return self.store.iter_jobs(_with(None, match, WAITING_STATES))

    def uncompleted_jobs(self, match: str | None = None) -> Iterator[JobRecord]:
        """Jobs not finished yet: staged, queued, started or retrying."""
        return self.store.iter_jobs(_with(None, match, UNCOMPLETED_STATES))

    def completed_jobs(self, match: str | None = None) -> Iterator[JobRecord]:
        """Jobs that succeeded."""
        return self.store.iter_jobs(_with(None, match, frozenset({JobState.SUCCEEDED})))

    def failed_jobs(self, match: str | None = None) -> Iterator[JobRecord]:
        """Jobs that failed for good or were declared dead: the ones waiting for a person."""
        return self.store.iter_jobs(_with(None, match, FAILED_STATES))

    def queued_to_completion_durations(
        self, match: str | None = None
    ) -> Iterator[tuple[JobRecord, float]]:
        """Succeeded jobs with their seconds from the latest enqueue to completion."""
        return self.durations(_with(None, match), "queued")

    def started_to_completion_durations(
        self, match: str | None = None
    ) -> Iterator[tuple[JobRecord, float]]:
        """Succeeded jobs with their seconds from the latest start to completion."""
        return self.durations(_with(None, match), "started")

    def durations(
        self, query: JobQuery, kind: DurationKind, page_size: int = 500
    ) -> Iterator[tuple[JobRecord, float]]:
        """Finished jobs of ``query`` (succeeded unless it names other final states) with their
        queued→finished or started→finished seconds, paging in constant memory."""
        return iter_pages(
            lambda cursor: self.store.durations(query, kind, limit=page_size, cursor=cursor)
        )

    def duration_stats(self, query: JobQuery, kind: DurationKind) -> list[DurationStats]:
        """p50/p95/max per task name."""
        return self.store.duration_stats(query, kind)

    def get(self, job_id: str) -> JobRecord:
        """The job, or :class:`JobNotFound`."""
        record = self.store.get(validate_job_id(job_id))
        if record is None:
            raise JobNotFound(f"no job with id {job_id!r} in the ledger")
        return record

    def stats(self) -> list[QueueStats]:
        """Counts per state and lag per queue."""
        return self.store.queue_stats()

    def instances(self) -> list[Instance]:
        """Registered worker instances, alive or not (see :func:`workers`)."""
        return workers(self.store, self.settings.ttl)

    # -- actions ---------------------------------------------------------------------------
    def restart(
        self,
        ids: Iterable[str] = (),
        query: JobQuery | None = None,
        *,
        dry_run: bool = False,
        force: bool = False,
    ) -> ActionReport:
        """Publish the selected jobs again with their own ids and the next generation, then
        move them to ``queued`` (invariant 1: publish first).

        Selects the jobs named by ``ids`` plus those matching ``query``. A job running on a
        live instance is skipped with the reason unless ``force``; every other unfinished,
        failed or dead job is restarted (a queued one whose message the broker lost is
        stuck). The new generation makes the job's older message stale and, with ``force``,
        fences off the run still going, so a restart runs the job once more, never twice.
        Jobs that succeeded or were cancelled are never restarted.
        Two restarts racing on one job publish two copies of one generation: it runs once.
        A job whose queue system has no integration in this process is reported failed, with
        why, and the others go on (also in a dry run, which says what would fail); only when no
        selected job has one is the whole call refused, with
        :class:`~jobledger.errors.IntegrationMissing` (this process cannot restart anything).
        """
        report = ActionReport("restart", dry_run)
        targets = self._select(ids, query, report, frozenset(JobState) - RESTARTABLE_STATES)
        integrations = self._integrations({r.system for r in targets})
        missing = [i for i in integrations.values() if isinstance(i, IntegrationMissing)]
        if missing and len(missing) == len(integrations):
            raise missing[0]
        for record in targets:
            integration = integrations[record.system]
            if isinstance(integration, IntegrationMissing):
                report.failed[record.id] = self.explain_missing(integration)
                continue
            refusal = None if force else self._not_restartable(record)
            if refusal is not None:
                report.skipped[record.id] = f"{refusal}; restart it with --force"
                continue
            if dry_run:
                report.done.append(record.id)
                continue
            after = replace(record, generation=record.generation + 1)
            self.integrations.republishing(after, Republish.RESTART)
            try:
                integration.publish(after, reason=Republish.RESTART)
            except PublishError as exc:
                report.failed[record.id] = str(exc)
                continue
            change = Transition(
                to=JobState.QUEUED,
                expect=frozenset({record.state}),
                expect_owner=record.owner if record.state is JobState.STARTED else ANY,
                expect_generation=record.generation,
                generation=after.generation,
                reason="restart",
            )
            if not self.store.transition(record.id, change):
                log.warning(
                    "job %s was published again but moved on meanwhile (its new message was "
                    "delivered, or another restart won); generations keep it from running twice",
                    record.id,
                )
            report.done.append(record.id)
        return report

    def _integrations(self, systems: set[str]) -> dict[str, Integration | IntegrationMissing]:
        """Each system's integration, or why there is none."""
        found: dict[str, Integration | IntegrationMissing] = {}
        for system in systems:
            try:
                found[system] = self.integrations.get(system)
            except IntegrationMissing as exc:
                found[system] = exc
        return found

    def _not_restartable(self, record: JobRecord) -> str | None:
        """Why a restart without ``force`` leaves ``record`` alone, or None."""
        if record.state is JobState.STARTED and self._running(record):
            return f"running on live instance {record.owner}"
        return None

    def cancel(
        self,
        ids: Iterable[str] = (),
        query: JobQuery | None = None,
        *,
        dry_run: bool = False,
    ) -> ActionReport:
        """Move the selected unfinished jobs to ``cancelled``: a later delivery is acknowledged
        and not run. A job already running finishes its body; its result is not applied."""
        report = ActionReport("cancel", dry_run)
        for record in self._select(ids, query, report, FINAL_STATES):
            if dry_run:
                report.done.append(record.id)
                continue
            change = Transition(to=JobState.CANCELLED, expect=frozenset({record.state}))
            if self.store.transition(record.id, change):
                report.done.append(record.id)
            else:
                report.skipped[record.id] = "moved on meanwhile; not cancelled"
        return report

    def prune(self, *, dry_run: bool = False) -> dict[str, int]:
        """Delete finished jobs past the settings' keep times: succeeded and cancelled after
        ``keep_succeeded``; failed and dead after ``keep_failed`` if set (else kept until a
        person acts). Returns how many went (or, with ``dry_run``, would go) per state."""
        rules = [(JobState.SUCCEEDED, self.settings.keep_succeeded)]
        rules.append((JobState.CANCELLED, self.settings.keep_succeeded))
        if self.settings.keep_failed is not None:
            rules += [(state, self.settings.keep_failed) for state in sorted(FAILED_STATES)]
        counts: dict[str, int] = {}
        for state, keep in rules:
            query = JobQuery(states=frozenset({state}), older_than=keep)
            counts[state.value] = self.store.count(query) if dry_run else self.store.prune(query)
        return counts

    def _select(
        self,
        ids: Iterable[str],
        query: JobQuery | None,
        report: ActionReport,
        excluded: frozenset[JobState],
    ) -> list[JobRecord]:
        """The jobs named or matched, minus those in ``excluded`` states (noted as skipped)."""
        wanted = [validate_job_id(i) for i in ids]
        found: dict[str, JobRecord] = {}
        if wanted:
            for record in self.store.iter_jobs(JobQuery(ids=frozenset(wanted))):
                found[record.id] = record
            for job_id in wanted:
                if job_id not in found:
                    report.skipped[job_id] = NOT_FOUND
        if query is not None:
            for record in self.store.iter_jobs(query):
                found.setdefault(record.id, record)
        selected = []
        for record in found.values():
            if record.state in excluded:
                report.skipped[record.id] = f"is {record.state.value}"
            else:
                selected.append(record)
        return selected

    def _running(self, record: JobRecord) -> bool:
        return record.owner is not None and self.store.is_alive(record.owner, self.settings.ttl)


def _with(
    query: JobQuery | None, match: str | None, states: frozenset[JobState] | None = None
) -> JobQuery:
    query = query if query is not None else JobQuery()
    changes: dict[str, object] = {}
    if match is not None:
        changes["match"] = match
    if states is not None:
        changes["states"] = states
    return query.narrowed(**changes) if changes else query
