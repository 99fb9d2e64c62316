"""The state machine and the record's own rules: pure logic, no store."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobledger.errors import ConfigError, InvalidTransition
from jobledger.model import (
    CLAIMABLE_STATES,
    ERROR_MAX_LENGTH,
    FINAL_STATES,
    RESTARTABLE_STATES,
    TRANSITIONS,
    UNCOMPLETED_STATES,
    JobRecord,
    JobState,
    bound_error,
    check_transition,
    nearest_rank,
    validate_job_id,
)
from jobledger.stores.base import Transition

S = JobState


def test_the_transition_table_is_the_drawing() -> None:
    assert dict(TRANSITIONS) == {
        S.STAGED: {S.QUEUED, S.STARTED, S.FAILED, S.CANCELLED},
        S.QUEUED: {S.QUEUED, S.STARTED, S.CANCELLED, S.DEAD},
        S.STARTED: {S.STARTED, S.SUCCEEDED, S.FAILED, S.RETRYING, S.QUEUED, S.DEAD, S.CANCELLED},
        S.RETRYING: {S.QUEUED, S.STARTED, S.FAILED, S.DEAD, S.CANCELLED},
        S.SUCCEEDED: set(),
        S.FAILED: {S.QUEUED, S.STARTED},
        S.DEAD: {S.QUEUED, S.STARTED},
        S.CANCELLED: set(),
    }


def test_state_sets_partition_the_states() -> None:
    assert set(S) == FINAL_STATES | UNCOMPLETED_STATES
    assert not FINAL_STATES & UNCOMPLETED_STATES
    assert all(state.is_final == (state in FINAL_STATES) for state in S)
    # Every non-final state can be cancelled by a person; nothing leaves succeeded/cancelled.
    assert all(S.CANCELLED in TRANSITIONS[s] for s in UNCOMPLETED_STATES)
    assert all(S.STARTED in TRANSITIONS[s] for s in CLAIMABLE_STATES)
    assert all(S.QUEUED in TRANSITIONS[s] for s in RESTARTABLE_STATES)


@pytest.mark.parametrize(("source", "target"), list(itertools.product(S, S)))
def test_check_transition_follows_the_table(source: JobState, target: JobState) -> None:
    if target in TRANSITIONS[source]:
        assert check_transition([source], target) == {source}
        owner = "w:1" if target is S.STARTED else None
        assert Transition(to=target, expect=frozenset({source}), owner=owner).expect == {source}
    else:
        with pytest.raises(InvalidTransition, match=f"{source.value} to {target.value}"):
            check_transition([source], target)
        with pytest.raises(InvalidTransition):
            Transition(to=target, expect=frozenset({source}), owner="w:1")


def test_check_transition_refuses_any_bad_source_and_no_source() -> None:
    with pytest.raises(InvalidTransition, match="succeeded"):
        check_transition([S.FAILED, S.SUCCEEDED], S.QUEUED)
    with pytest.raises(InvalidTransition, match="at least one"):
        check_transition([], S.QUEUED)
    assert check_transition(iter([S.FAILED, S.DEAD]), S.QUEUED) == {S.FAILED, S.DEAD}


def test_a_start_needs_its_owner() -> None:
    with pytest.raises(ValueError, match="owner"):
        Transition(to=S.STARTED, expect=frozenset({S.QUEUED}))


def test_state_parse() -> None:
    assert JobState.parse(" Queued ") is S.QUEUED
    assert JobState.parse(S.DEAD) is S.DEAD
    for garbage in ("nope", "", None, 3):
        with pytest.raises(ConfigError, match="known states"):
            JobState.parse(garbage)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "job_id",
    ["a", "5f0c2b9e-1d2c-4c8a-9f3b-2f9a1c7e6d5b", "rq:job:1", "x" * 255, "a.b_c+d=e~f,g@h-i"],
)
def test_valid_job_ids(job_id: str) -> None:
    assert validate_job_id(job_id) == job_id


@pytest.mark.parametrize(
    "job_id", ["", "x" * 256, "a b", "a/b", "a'b", 'a"b', "a\nb", "zoë", "a\\b", None, 7]
)
def test_malformed_job_ids(job_id: object) -> None:
    with pytest.raises(ConfigError, match="malformed job id"):
        validate_job_id(job_id)  # type: ignore[arg-type]


def test_bound_error_keeps_short_texts() -> None:
    assert bound_error(None) is None
    assert bound_error("") == ""
    exact = "e" * ERROR_MAX_LENGTH
    assert bound_error(exact) == exact


@settings(deadline=None)
@given(st.integers(min_value=ERROR_MAX_LENGTH + 1, max_value=ERROR_MAX_LENGTH * 30))
def test_bound_error_keeps_head_and_tail_and_says_how_much_went(length: int) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    bounded = bound_error(text)
    assert bounded is not None and len(bounded) == ERROR_MAX_LENGTH
    found = re.search(r"\n… \[(\d+) characters cut\] …\n", bounded)
    assert found is not None
    head, tail = bounded[: found.start()], bounded[found.end() :]
    assert text.startswith(head) and text.endswith(tail)
    assert abs(len(head) - len(tail)) <= 1
    assert int(found.group(1)) == length - len(head) - len(tail)


def test_record_bounds_its_error_and_validates() -> None:
    record = JobRecord(id="j", name="t", error="x" * (ERROR_MAX_LENGTH * 2))
    assert record.error is not None and len(record.error) == ERROR_MAX_LENGTH
    assert JobRecord(id="j", name="t", state="failed").state is S.FAILED  # type: ignore[arg-type]
    assert JobRecord(id="j", name="t", args=(1, 2)).args == [1, 2]  # type: ignore[arg-type]
    for bad in ({"name": ""}, {"queue": "q" * 256}, {"system": ""}, {"id": "a b"}):
        with pytest.raises(ConfigError):
            JobRecord(**{"id": "j", "name": "t", **bad})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("p", "count", "index"),
    [(0.5, 1, 0), (0.95, 1, 0), (0.5, 2, 0), (0.5, 3, 1), (0.5, 20, 9), (0.95, 20, 18)],
)
def test_nearest_rank(p: float, count: int, index: int) -> None:
    assert nearest_rank(p, count) == index


@given(st.floats(min_value=0.01, max_value=1.0), st.integers(min_value=1, max_value=10_000))
def test_nearest_rank_is_the_smallest_value_covering_p(p: float, count: int) -> None:
    index = nearest_rank(p, count)
    assert 0 <= index < count
    assert (index + 1) / count >= p - 1e-12  # at least p of the values are at or below it
    assert index == 0 or index / count < p + 1e-12  # and it is the first such
