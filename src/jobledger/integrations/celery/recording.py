# mypy: disable-error-code="import-untyped"
"""Record at publish (client side, ``before_task_publish``): a ``queued`` record with name,
args, kwargs, queue and the options needed to publish it again, and the headers the worker's
claim reads (tracked, enqueue time, generation).

A ledger that is down costs a warning and a counter, never the publish (invariant 7): the
message says so (:data:`UNRECORDED_HEADER`), so the worker that receives it journals the
record, and this process retries the record in the background. A publish from inside a running
job is its retry or ``Task.replace``: the job moves to retrying *before* the message exists,
and the message continues the run's generation.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from jobledger.errors import JobLedgerError
from jobledger.integrations.celery.messages import (
    ENQUEUED_HEADER,
    GENERATION_HEADER,
    TRACKED_HEADER,
    UNRECORDED_HEADER,
    queue_name,
    republish_options,
)
from jobledger.integrations.celery.staging import SYSTEM
from jobledger.model import JobRecord
from jobledger.pending import CreateWrite
from jobledger.runtime.guard import Run

if TYPE_CHECKING:
    from jobledger.integrations.celery.integration import CeleryIntegration

log = logging.getLogger(__name__)


class PublishRecorder:
    """The ``before_task_publish`` receiver of one integration."""

    def __init__(self, integration: CeleryIntegration) -> None:
        self.integration = integration
        self._recorded = threading.local()  # ids recorded by the apply_async under way

    def on_before_publish(
        self,
        sender: str | None = None,
        body: Any = None,
        exchange: Any = None,
        routing_key: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: Mapping[str, Any] | None = None,
        declare: list[Any] | None = None,
        **_: Any,
    ) -> None:
        integration = self.integration
        if headers is None or "id" not in headers:
            return  # protocol 1 or not a task message: nothing we can track
        name = str(headers.get("task") or sender)
        if not integration.is_tracked(name, headers):
            return
        job_id = str(headers["id"])
        headers[TRACKED_HEADER] = True
        headers.setdefault(ENQUEUED_HEADER, time.time())
        if integration.publisher.in_batch:
            return  # a staged job the relay or fast path publishes: the ledger has it
        guard = integration.runtime.guard
        run = guard.running(job_id)
        if run is not None:
            headers[GENERATION_HEADER] = run.generation  # a retry continues the run's generation
            if not run.retrying:  # a retry or Task.replace: retrying *before* the message exists
                guard.retrying(job_id, _why_retrying(run, name, headers))
        else:
            headers.setdefault(GENERATION_HEADER, 0)  # a first publish (or one we made)
        args, kwargs = (
            (body[0], body[1]) if isinstance(body, (tuple, list)) and len(body) >= 2 else ([], {})
        )
        try:
            options = integration.with_policy(
                name, republish_options(body, exchange, routing_key, headers, properties or {})
            )
            record = JobRecord(
                id=job_id,
                name=name,
                system=SYSTEM,
                queue=queue_name(declare, routing_key),
                args=list(args),
                kwargs=dict(kwargs),
                options=options,
            )
        except JobLedgerError as exc:
            self._unrecorded(job_id, name, headers, exc, None)
            return
        try:
            if integration.runtime.store.create(record):  # False: it exists (a retry...)
                recorded = getattr(self._recorded, "ids", None)
                if recorded is not None:
                    recorded.append(job_id)
        except JobLedgerError as exc:
            self._unrecorded(job_id, name, headers, exc, record)

    def _unrecorded(
        self,
        job_id: str,
        name: str,
        headers: dict[str, Any],
        exc: JobLedgerError,
        record: JobRecord | None,
    ) -> None:
        """The ledger could not take the record at publish: the message says so, so the
        worker that receives it writes the record, and this process writes it too once the
        ledger is back. Either keeps a job the broker then loses recoverable, where before it
        existed only as its message."""
        headers[UNRECORDED_HEADER] = True
        runtime = self.integration.runtime
        runtime.count("publish_unrecorded")
        log.warning("job %s (%s) published but not recorded yet: %s", job_id, name, exc)
        if record is not None:
            runtime.pending.add(CreateWrite(record))

    @contextlib.contextmanager
    def publishing(self) -> Iterator[None]:
        """Around ``apply_async``: if the publish raises after the record was written, the
        caller was told the job was not queued, so the record says so too
        (:meth:`~jobledger.runtime.outcomes.Outcomes.unpublished`)."""
        outer = getattr(self._recorded, "ids", None)
        ids: list[str] = []
        self._recorded.ids = ids
        try:
            yield
        except Exception as exc:
            for job_id in ids:
                self.integration.runtime.outcomes.unpublished(job_id, exc)
            raise
        finally:
            self._recorded.ids = outer


def _why_retrying(run: Run, name: str, headers: Mapping[str, Any]) -> str:
    """Why a running job is published again: ``Task.replace`` (another task, or a deeper
    replacement nesting, under the same id), else a retry (with the error being retried)."""
    nesting = run.delivery.context if isinstance(run.delivery.context, int) else 0
    if name != run.delivery.record.name or int(headers.get("replaced_task_nesting") or 0) > nesting:
        return f"replaced by task {name} (Task.replace), which runs under the same job id"
    error = sys.exc_info()[1]
    return f"retry: {error!r}" if error is not None else "retry requested"
