"""The contract suites jobledger's own stores and integrations pass, shipped so that a third
party's pass them too (``pip install 'jobledger[testing]'``: pytest and hypothesis).

- :class:`StoreContract` (:mod:`~jobledger.testing.contract.store`): subclass it and give it a
  ``store`` fixture.
- :class:`IntegrationContract` (:mod:`~jobledger.testing.contract.integration`): subclass it
  and give it a ``harness`` fixture, an :class:`IntegrationHarness` over real worker
  processes of your queue system. Its task bodies write their runs with
  :func:`~jobledger.testing.executions.record_run` (that module needs no pytest).
  :class:`ProcessHarness` (:mod:`~jobledger.testing.contract.processes`) gives such a harness
  its process control (kill, terminate, runs, clean-up) over its :class:`WorkerProcess` objects, so
  that it writes only what is its queue system's own.
"""

from __future__ import annotations

from jobledger.testing.contract.integration import IntegrationContract, IntegrationHarness
from jobledger.testing.contract.processes import ProcessHarness, WorkerExited, WorkerProcess
from jobledger.testing.contract.store import StoreContract
from jobledger.testing.executions import FIRST_FAILURE, ExecutionLog, Run, record_run

__all__ = [
    "FIRST_FAILURE",
    "ExecutionLog",
    "IntegrationContract",
    "IntegrationHarness",
    "ProcessHarness",
    "Run",
    "StoreContract",
    "WorkerExited",
    "WorkerProcess",
    "record_run",
]
