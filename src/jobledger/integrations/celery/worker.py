# mypy: disable-error-code="import-untyped"
"""A Celery worker's signals, mapped onto the worker runtime.

The main process registers the instance at ``worker_init`` (before the pool forks), starts
the loops at ``worker_ready``, says draining at ``worker_shutting_down`` and drains at
``worker_shutdown``; it records what a pool process could not: a process lost under its job
(``WorkerLostError``), a hard time limit, a revoke. Pool processes start with no runs.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import TimeLimitExceeded, WorkerLostError

from jobledger.errors import ConfigError, SchemaMissing
from jobledger.integrations.celery.consumption import Consumption, held_by_celery, in_flight
from jobledger.integrations.celery.messages import (
    TRACKED_HEADER,
    UNRECORDED_HEADER,
    republish_options,
)

if TYPE_CHECKING:
    from jobledger.integrations.celery.integration import CeleryIntegration


class WorkerHooks:
    """The worker signal receivers of one integration."""

    def __init__(self, integration: CeleryIntegration) -> None:
        self.integration = integration
        self.runtime = integration.runtime
        self.consumption: Consumption | None = None

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        """Before the pool forks: register the instance (see
        :meth:`~jobledger.runtime.worker.WorkerRuntime.register`). An unmigrated ledger or an
        unusable journal directory ends the worker here with one line; an unreachable ledger
        is an outage: the worker starts and consumes nothing until the ledger answers."""
        integration = self.integration
        integration.wrap_tasks()
        queues: list[str] = []
        with contextlib.suppress(Exception):  # varies by version and options; only informative
            queues = sorted(integration.app.amqp.queues.consume_from or integration.app.amqp.queues)
        self.consumption = Consumption(integration.app, self.runtime)
        try:
            self.runtime.register(
                queues=queues,
                in_flight=in_flight,
                held=held_by_celery,
                on_beat=self.consumption.want,
                worker_name=getattr(sender, "hostname", None),  # a@vm
            )
        except (ConfigError, SchemaMissing) as exc:
            _exit_at_start(str(exc))

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        """The consumer runs (``sender``, in its event loop's thread): stop it at once if the
        ledger is out of reach, then start the loops."""
        if self.consumption is not None and sender is not None:
            self.consumption.attach(sender)
        self.runtime.start()

    def on_worker_shutting_down(self, **_: Any) -> None:
        """Warm shutdown begins (in a signal handler): say draining, write nothing here."""
        self.runtime.mark_draining()
        if self.consumption is not None:
            self.consumption.stop(timeout=0)  # leave the consumer to Celery

    def on_worker_shutdown(self, **_: Any) -> None:
        """After Celery's warm shutdown waited for the pool: drain."""
        self.runtime.drain()

    def on_worker_process_init(self, **_: Any) -> None:
        self.runtime.child_started()

    def on_task_received(self, request: Any = None, **_: Any) -> None:
        """Main process: remember a tracked delivery (to put it back if its pool process
        dies before claiming it) and beat soon, so the ledger learns this instance holds it;
        journal its record if the publisher could not write it (:data:`UNRECORDED_HEADER`)."""
        headers = getattr(request, "request_dict", None) or {}
        if not headers.get(TRACKED_HEADER) and not self.integration.is_tracked(str(request.name)):
            return
        delivery = request.delivery_info or {}
        properties = getattr(getattr(request, "message", None), "properties", None) or {}
        self.runtime.received(
            unrecorded=bool(headers.get(UNRECORDED_HEADER)),
            delivered=self.integration.delivered(
                job_id=str(request.id),
                name=str(request.name),
                queue=delivery.get("routing_key"),
                args=request.args,
                kwargs=request.kwargs,
                headers=headers,
                options=republish_options(
                    request._payload,
                    delivery.get("exchange"),
                    delivery.get("routing_key"),
                    headers,
                    properties,
                ),
            ),
        )

    def on_task_failure(
        self,
        sender: Any = None,
        task_id: str | None = None,
        exception: BaseException | None = None,
        **_: Any,
    ) -> None:
        """Failures the pool process could not record, reported in the main process: a pool
        process died under a job (lost), or Celery killed it at the hard time limit (timed
        out; Celery does not retry it). Anything else the pool process recorded itself."""
        if task_id is None:
            return
        why = f"{type(exception).__name__}: {exception}"
        if isinstance(exception, WorkerLostError):
            self.runtime.outcomes.lost(task_id, why)
        elif isinstance(exception, TimeLimitExceeded):
            self.runtime.outcomes.timed_out(task_id, why)

    def on_task_revoked(
        self, request: Any = None, terminated: bool = False, expired: bool = False, **_: Any
    ) -> None:
        job_id = getattr(request, "id", None)
        if job_id is None or not self.integration.is_tracked(
            str(getattr(request, "name", "") or "")
        ):
            return
        reason = "expired" if expired else ("revoked and terminated" if terminated else "revoked")
        self.runtime.outcomes.cancelled(job_id, reason)


def _exit_at_start(line: str) -> NoReturn:
    """End a worker that cannot work at all with one line (a signal receiver's exception
    would only be logged by Celery, and the worker would start anyway)."""
    print(f"jobledger: {line}", file=sys.stderr, flush=True)
    raise SystemExit(2)
