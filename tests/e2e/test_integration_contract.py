"""The shipped integration contract (:mod:`jobledger.testing.contract.integration`), run for
every queue system jobledger ships a worker integration for, through the harnesses of the
per-system e2e tests, on a Redis broker each and one ledger kind each: Celery on a Redis ledger,
RQ (its forking ``Worker``) on SQLite, Dramatiq on PostgreSQL."""

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

HARNESSES: dict[str, Callable[[Path], Closable]] = {
    "celery": lambda tmp: celery_harness.Harness(tmp, celery_harness.REDIS, "redis"),
    "rq": lambda tmp: rqharness.RQHarness(tmp, "sqlite", "Worker"),
    "dramatiq": lambda tmp: dramatiq_harness.Harness(tmp, dramatiq_harness.REDIS, "postgresql"),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "system" in metafunc.fixturenames:
        metafunc.parametrize("system", list(HARNESSES))


class TestIntegrationContract(IntegrationContract):
    @pytest.fixture
    def harness(self, system: str, tmp_path: Path) -> Iterator[IntegrationHarness]:
        made = HARNESSES[system](tmp_path)
        yield made
        made.close()
