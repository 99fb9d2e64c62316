"""The RQ integration (``pip install 'jobledger[rq]'``, RQ 2.0 or newer).

Publishers enqueue through a tracked queue (:class:`Queue`, or any queue given to
:func:`install`); workers run ``rq worker --worker-class jobledger.integrations.rq.Worker``
(or :class:`SimpleWorker`), which map RQ's hooks onto the shared
:class:`~jobledger.runtime.worker.WorkerRuntime` (:mod:`.worker`). Both read the
``JOBLEDGER_*`` settings. A job's orphan policy is its meta's ``on_orphan``.

RQ settings that pair with it, and why:

- ``--worker-class`` one of these (the claim guard, the heartbeat and the sweep live there;
  a plain ``rq worker`` runs tracked jobs without them, and its jobs are never recovered);
- a job ``timeout`` that bounds your jobs: RQ's own StartedJobRegistry cleanup judges a
  job abandoned only after its execution's TTL (timeout + 60 s); jobledger recovers a dead
  worker's job after its heartbeat TTL + one sweep, and takes it out of that registry, so
  the two never both put it back;
- ``Retry`` for failures as usual (invariant 8: retries belong to RQ; the ledger says
  ``retrying``); a crash is not a failure and needs no ``Retry`` to come back (nor is it
  retried when the job's orphan policy forbids a second run).
"""

from __future__ import annotations

from redis import Redis

from jobledger.config import Settings
from jobledger.integrations.rq.enqueue import Queue, TrackedQueue, install
from jobledger.integrations.rq.integration import RQIntegration, integration_for
from jobledger.integrations.rq.marks import SYSTEM
from jobledger.integrations.rq.worker import SimpleWorker, Worker

__all__ = [
    "SYSTEM",
    "Queue",
    "RQIntegration",
    "SimpleWorker",
    "TrackedQueue",
    "Worker",
    "install",
    "install_for_broker",
    "integration_for",
]


def install_for_broker(url: str, settings: Settings | None = None) -> RQIntegration:
    """The integration on a connection to ``url``: enough to publish RQ jobs by function
    name (recovery, restart, ``jobledger recover --broker URL --queue-system rq``) without
    the task code."""
    return install(Redis.from_url(url), settings)
