"""The user-facing test toolkit works as its docstrings say."""

from __future__ import annotations

import pytest

from jobledger.errors import PublishError
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
