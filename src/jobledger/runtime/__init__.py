"""The worker runtime: everything a queue adapter gets for free, written once for every queue.

An adapter (:mod:`jobledger.integrations.celery`, RQ's, Dramatiq's...) maps its queue's hooks
onto these calls (the contract is in :mod:`jobledger.integrations.base`):

- :mod:`.service`: the start/stop thread under every background loop;
- :mod:`.resources`: the store, pending writes and outbox, one per process;
- :mod:`.forksafe`: the main process's store, never in use while the process forks;
- :mod:`.guard`: the claim guard around a task body, and the finishes of its outcomes;
- :mod:`.outcomes`: what a worker's main process records for a job its child could not
  (lost, timed out, cancelled, a publish that failed);
- :mod:`.worker`: registration and heartbeat, journal replay, the held-jobs audit, drain;
- :mod:`.maintenance`: the recovery and relay loops, composed once for workers and the
  supervisor.

Nothing here imports a queue system or a database driver.
"""
