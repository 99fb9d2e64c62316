"""The Celery integration: every tracked task gets a ledger record, a claim guard and recovery.

``install(app)`` connects it. A task is tracked when declared ``@app.task(tracked=True)``, or
with ``track_all=True`` unless declared ``tracked=False`` (Celery's own ``celery.*`` tasks never
are). From then on:

- **publish** (client side, :mod:`.recording`): a ``queued`` record and the headers the claim
  reads; the way back, by task name without task code, is :mod:`.publish`'s.
- **run** (pool process, :mod:`.tasks`): the claim guard around each body. A failed or dead job
  runs again only from a restart's message (:data:`RESTART_HEADER`, or a newer generation);
  success, failure, retry, ``Task.replace``, revoke, a lost pool process (``WorkerLostError``)
  and a hard time limit (``TimeLimitExceeded``) are recorded.
- **worker** (main process, :mod:`.worker`): registration before the pool forks, the heartbeat,
  the recovery, relay and audit loops, drain at shutdown (the runtime's), and the consumption
  switch while the ledger is unreachable (:mod:`.consumption`).
- **staging** (:mod:`.staging`): ``task.stage()``/``apply_staged()`` commit a job with the
  caller's transaction.

Celery settings that pair with it: ``task_acks_late=True``: with early acks Celery acks a
message when a pool process accepts it, a moment *before* the claim, so a kill in between loses
the message while the ledger still says ``queued`` (visible as lag, but not an orphan the sweep
would recover); late acks keep the message until the job's outcome is recorded, and the claim
guard skips the redelivered copy of a job that ran. Leave ``task_reject_on_worker_lost`` off
(the ledger puts a lost job back itself, with the poison-pill cap the broker's requeue lacks).
A long Redis ``visibility_timeout`` is safe for running jobs (a redelivered running job is
skipped by the claim guard), but it is also how long Redis keeps the messages a killed worker
had *prefetched* and not started; keep ``worker_prefetch_multiplier`` low.
"""

from jobledger.integrations.celery.integration import (
    CeleryIntegration,
    install,
    install_for_broker,
)
from jobledger.integrations.celery.messages import (
    ENQUEUED_HEADER,
    GENERATION_HEADER,
    REPUBLISH_HEADER,
    RESTART_HEADER,
    TRACKED_HEADER,
    UNRECORDED_HEADER,
)

__all__ = [
    "ENQUEUED_HEADER",
    "GENERATION_HEADER",
    "REPUBLISH_HEADER",
    "RESTART_HEADER",
    "TRACKED_HEADER",
    "UNRECORDED_HEADER",
    "CeleryIntegration",
    "install",
    "install_for_broker",
]
