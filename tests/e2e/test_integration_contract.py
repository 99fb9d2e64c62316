"""The shipped integration contract (:mod:`jobledger.testing.contract.integration`), run for
every queue system jobledger ships a worker integration for, through the harnesses of the
per-system e2e tests, over the combinations the integrations promise (issues 9 and 10):

- Celery (Redis broker) on a PostgreSQL, a SQLite and a Redis ledger;
- RQ (its forking ``Worker``) on a PostgreSQL and a SQLite ledger;
- Dramatiq on its two brokers: Redis with a PostgreSQL ledger, RabbitMQ with a SQLite ledger,
  so each ledger kind meets each Dramatiq broker's delivery path once without doubling the
  (slowest) Dramatiq runs; the ledgers themselves are covered on every system above.

A test's id names its combination: ``[celery-postgresql]``, ``[dramatiq-rabbitmq]``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for _system in ("celery", "rq", "dramatiq"):
    sys.path.insert(0, str(HERE / _system))

import dramatiq_harness  # noqa: E402
import harness as celery_harness  # noqa: E402
import rqharness  # noqa: E402

from jobledger.testing.contract import IntegrationContract, IntegrationHarness  # noqa: E402

Closable = celery_harness.Harness | rqharness.RQHarness | dramatiq_harness.Harness

#: Each combination by its test id: how to build its harness in the test's directory.
HARNESSES: dict[str, Callable[[Path], Closable]] = {
    "celery-postgresql": lambda tmp: celery_harness.Harness(
        tmp, celery_harness.REDIS, "postgresql"
    ),
    "celery-sqlite": lambda tmp: celery_harness.Harness(tmp, celery_harness.REDIS, "sqlite"),
    "celery-redis": lambda tmp: celery_harness.Harness(tmp, celery_harness.REDIS, "redis"),
    "rq-postgresql": lambda tmp: rqharness.RQHarness(tmp, "postgresql", "Worker"),
    "rq-sqlite": lambda tmp: rqharness.RQHarness(tmp, "sqlite", "Worker"),
    "dramatiq-redis": lambda tmp: dramatiq_harness.Harness(
        tmp, dramatiq_harness.REDIS, "postgresql"
    ),
    "dramatiq-rabbitmq": lambda tmp: dramatiq_harness.Harness(
        tmp, dramatiq_harness.RABBITMQ, "sqlite"
    ),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "combination" in metafunc.fixturenames:
        metafunc.parametrize("combination", list(HARNESSES))


class TestIntegrationContract(IntegrationContract):
    @pytest.fixture
    def harness(self, combination: str, tmp_path: Path) -> Iterator[IntegrationHarness]:
        made = HARNESSES[combination](tmp_path)
        yield made
        made.close()
