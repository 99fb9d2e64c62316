"""A job's story from its record: attempts and timeline after retries, a recovery, a restart."""

from __future__ import annotations

from jobledger.history import attempts, timeline
from jobledger.model import CLAIMABLE_STATES, JobRecord, JobState
from jobledger.serialize import job_to_dict
from jobledger.stores.base import Transition
from jobledger.stores.memory import MemoryStore
from jobledger.testing import ManualClock

S = JobState


def test_the_story_of_a_retried_recovered_restarted_job() -> None:
    clock = ManualClock(1000.0)
    store = MemoryStore(clock=clock)
    store.create(JobRecord(id="j1", name="reports.build"))

    def move(change: Transition, later: float = 1.0) -> None:
        clock.advance(later)
        assert store.transition("j1", change), change

    move(Transition(to=S.STARTED, expect=CLAIMABLE_STATES, owner="a@vm:1"))
    move(Transition(to=S.RETRYING, expect={S.STARTED}, error="Traceback …\nValueError: one"), 2)
    move(Transition(to=S.STARTED, expect=CLAIMABLE_STATES, owner="b@vm:2"))
    move(Transition(to=S.QUEUED, expect={S.STARTED}, reason="recovery"), 30)
    move(Transition(to=S.STARTED, expect=CLAIMABLE_STATES, owner="a@vm:3"))
    move(Transition(to=S.FAILED, expect={S.STARTED}, error="ValueError: two"), 3)
    move(Transition(to=S.QUEUED, expect={S.FAILED}, reason="restart"), 100)
    record = store.get("j1")
    assert record is not None

    runs = attempts(record)
    assert [(r.number, r.owner, r.outcome, r.ran_for) for r in runs] == [
        (1, "a@vm:1", "retrying", 2.0),
        (2, "b@vm:2", "recovered", 30.0),
        (3, "a@vm:3", "failed", 3.0),
    ]
    assert runs[0].error and runs[0].error.endswith("ValueError: one")
    steps = [(s.what, s.detail) for s in timeline(record)]
    assert steps == [
        ("created", ""),
        ("queued", ""),
        ("started", "attempt 1 on a@vm:1"),
        ("retrying", "ValueError: one"),
        ("started", "attempt 2 on b@vm:2"),
        ("recovered", "its instance b@vm:2 died; now queued"),
        ("started", "attempt 3 on a@vm:3"),
        ("failed", "ValueError: two"),
        ("restarted", "published again by a person"),
    ]
    data = job_to_dict(record)  # a queued job: not finished, no duration
    assert data["finished_at"] is None and data["queued_to_finished"] is None
    assert [r["outcome"] for r in data["runs"]] == ["retrying", "recovered", "failed"]

    move(Transition(to=S.STARTED, expect=CLAIMABLE_STATES, owner="a@vm:4"))
    move(Transition(to=S.SUCCEEDED, expect={S.STARTED}), 4)
    record = store.get("j1")
    assert record is not None and len(record.history) == 4  # the success wrote none
    last = attempts(record)[-1]
    assert (last.number, last.outcome, last.ran_for, last.error) == (4, "succeeded", 4.0, None)
    assert timeline(record)[-1].what == "succeeded"
    assert record.queued_to_finished == 5.0 and record.started_to_finished == 4.0
