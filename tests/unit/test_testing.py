"""The user-facing test toolkit works as its docstrings say."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobledger.errors import ConfigError, PublishError
from jobledger.integrations.base import Integration, Registry
from jobledger.model import JobRecord
from jobledger.testing import (  # the plugin's fixtures, as a user's conftest would get them
    ManualClock,
    MemoryStore,
    RecordingIntegration,
    ledger_clock,
    ledger_integration,
    ledger_store,
)
from jobledger.testing.executions import ENV, ExecutionLog, record_run

__all__ = ["ledger_clock", "ledger_integration", "ledger_store"]


def test_recording_integration_records_in_order() -> None:
    integration = RecordingIntegration(system="celery")
    assert isinstance(integration, Integration)
    registry = Registry()
    registry.register(integration)
    first, second = JobRecord(id="a", name="t"), JobRecord(id="b", name="t")
    registry.get("celery").publish(first)
    registry.get("celery").publish(second)
    registry.get("celery").publish(first)
    assert integration.published == [first, second, first]
    assert integration.ids == ["a", "b", "a"]


def test_recording_integration_can_refuse_like_a_broker_that_is_down() -> None:
    integration = RecordingIntegration(fail_with=PublishError("broker down"))
    with pytest.raises(PublishError, match="broker down"):
        integration.publish(JobRecord(id="a", name="t"))
    assert integration.published == []
    integration.fail_with = None
    integration.publish(JobRecord(id="a", name="t"))
    assert integration.ids == ["a"]


def test_the_fixtures(
    ledger_store: MemoryStore,
    ledger_clock: ManualClock,
    ledger_integration: RecordingIntegration,
) -> None:
    assert ledger_store.now() == ledger_clock()
    assert ledger_store.create(JobRecord(id="a", name="t"))
    ledger_clock.advance(60)
    assert ledger_store.now() == ledger_clock()
    assert ledger_integration.system == "python" and ledger_integration.published == []


def test_wait_for_returns_the_first_truthy_value_and_names_what_timed_out() -> None:
    from jobledger.testing import wait_for

    answers = iter([None, 0, "ready"])
    assert wait_for("the third answer", lambda: next(answers), timeout=5) == "ready"
    with pytest.raises(TimeoutError, match="waiting for never"):
        wait_for("never", lambda: False, timeout=0.05)


def test_the_execution_log_counts_runs_across_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task bodies in forked processes write the log the test named; the test reads each
    job's executions, in order, with the process that ran it."""
    log = ExecutionLog.create(tmp_path / "runs.db")
    monkeypatch.setenv(ENV, log.path)
    monkeypatch.setenv("JOBLEDGER_INSTANCE_NAME", "w1")
    record_run("a", "start")
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's exit status is the assertion
        record_run("a", "start")
        record_run("a", "done")
        os._exit(0)
    assert os.waitpid(child, 0)[1] == 0
    record_run("b", "published")
    runs = log.executions("a")
    assert [(r.job_id, r.phase, r.worker) for r in runs] == [("a", "start", "w1")] * 2
    assert [r.pid for r in runs] == [os.getpid(), child]
    assert [r.phase for r in log.runs()] == ["start", "start", "done", "published"]
    assert log.executions("b") == []


def test_an_execution_log_nobody_named_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{ENV} is not set"):
        record_run("a", "start")
