"""The contract suites jobledger's own stores and integrations pass, shipped so that a third
party's pass them too (``pip install 'jobledger[testing]'``: pytest and hypothesis).

- :class:`StoreContract` (:mod:`~jobledger.testing.contract.store`): subclass it and give it a
  ``store`` fixture.
- :class:`IntegrationContract` (:mod:`~jobledger.testing.contract.integration`): subclass it
  and give it a ``harness`` fixture, an :class:`IntegrationHarness` over real worker
  processes of your queue system. Its task bodies write their runs with
  :func:`~jobledger.testing.executions.record_run` (that module needs no pytest).
"""

from __future__ import annotations

from jobledger.testing.contract.integration import IntegrationContract, IntegrationHarness
from jobledger.testing.contract.store import StoreContract
from jobledger.testing.executions import FIRST_FAILURE, ExecutionLog, Run, record_run

__all__ = [
    "FIRST_FAILURE",
    "ExecutionLog",
    "IntegrationContract",
    "IntegrationHarness",
    "Run",
    "StoreContract",
    "record_run",
]
