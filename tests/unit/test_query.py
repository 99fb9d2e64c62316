"""Cursors and the query filter: pure logic, no store."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobledger.errors import ConfigError
from jobledger.model import FINAL_STATES, JobState
from jobledger.query import (
    Cursor,
    JobQuery,
    check_page_size,
    finished_query,
    match_needles,
    prunable_states,
)

job_ids = st.from_regex(r"[A-Za-z0-9_.:@+=~,-]{1,40}", fullmatch=True)


@given(st.floats(allow_nan=False, allow_infinity=False), job_ids)
def test_cursor_round_trip(created_at: float, job_id: str) -> None:
    cursor = Cursor(created_at, job_id)
    token = cursor.encode()
    assert Cursor.decode(token) == cursor
    assert "=" not in token and "/" not in token and "+" not in token  # safe in a URL


def _token(payload: object) -> str:
    raw = json.dumps(payload).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage!",
        "é",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        _token([1.0]),
        _token([1.0, "id", "extra"]),
        _token(["soon", "id"]),
        _token([1.0, "not an id"]),
        _token([1.0, 7]),
        _token(None),
        _token(12),
    ],
)
def test_a_malformed_cursor_is_a_config_error(token: str) -> None:
    with pytest.raises(ConfigError, match="malformed page cursor"):
        Cursor.decode(token)


def test_an_empty_query_selects_everything() -> None:
    query = JobQuery()
    assert (query.states, query.queues, query.ids, query.match, query.older_than) == (
        frozenset(),
        frozenset(),
        frozenset(),
        None,
        None,
    )


def test_query_normalizes_its_fields() -> None:
    query = JobQuery(
        states=["Queued", JobState.FAILED],  # type: ignore[arg-type]
        queues="mail",  # type: ignore[arg-type]
        names=None,  # type: ignore[arg-type]
        ids=["a", "b", "a"],  # type: ignore[arg-type]
        match="",
    )
    assert query.states == {JobState.QUEUED, JobState.FAILED}
    assert query.queues == {"mail"}
    assert query.names == frozenset()
    assert query.ids == {"a", "b"}
    assert query.match is None
    narrowed = query.narrowed(states=frozenset({JobState.DEAD}))
    assert narrowed.states == {JobState.DEAD} and narrowed.queues == {"mail"}


@pytest.mark.parametrize(
    "fields",
    [
        {"states": {"bogus"}},
        {"ids": {"a b"}},
        {"regex": True},
        {"regex": True, "match": "("},
        {"regex": True, "match": ""},
        {"older_than": -1},
        {"older_than": float("nan")},
    ],
)
def test_query_validation(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        JobQuery(**fields)  # type: ignore[arg-type]


def test_match_needles() -> None:
    assert match_needles("plain") == ["plain"]
    assert match_needles('say "hi"') == ['say "hi"', 'say \\"hi\\"']
    assert match_needles("C:\\x") == ["C:\\x", "C:\\\\x"]
    assert match_needles("Zoë 東京") == ["Zoë 東京"]  # stored as is, not \u-escaped
    assert match_needles("a\tb") == ["a\\tb"]  # stored JSON never holds a raw control char
    assert match_needles("\x00") == ["\\u0000"]


@pytest.mark.parametrize("size", [0, -1, 1.5, True, None, "10"])
def test_page_size_must_be_a_positive_int(size: object) -> None:
    with pytest.raises(ConfigError, match="page size"):
        check_page_size(size)  # type: ignore[arg-type]


def test_durations_and_prune_states() -> None:
    assert finished_query(JobQuery()).states == {JobState.SUCCEEDED}
    both = JobQuery(states={JobState.FAILED, JobState.QUEUED})
    assert finished_query(both).states == {JobState.FAILED}
    assert prunable_states(JobQuery()) == FINAL_STATES
    assert prunable_states(both) == {JobState.FAILED}
    assert prunable_states(JobQuery(states={JobState.QUEUED, JobState.STARTED})) == set()
