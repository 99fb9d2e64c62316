"""A Dramatiq message as a record and back: nothing the way back needs is lost, nothing one
enqueue set leaks into the next."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

from dramatiq import Message

from jobledger.integrations.dramatiq.messages import (
    ETA_OPTION,
    GENERATION_OPTION,
    REPUBLISH_OPTION,
    TRACKED_OPTION,
    UNRECORDED_OPTION,
    generation_of,
    message_of,
    record_of,
    republish_of,
)
from jobledger.model import JobState, Republish


def message(**options: object) -> Message[object]:
    return Message(
        queue_name="mail.DQ",
        actor_name="send_mail",
        args=(1, "a"),
        kwargs={"to": "x@example.com"},
        options=dict(options),
        message_id="m-1",
        message_timestamp=1_800_000_000_123,
    )


def test_a_record_keeps_what_publishes_the_message_again() -> None:
    record = record_of(
        message(
            max_retries=3,
            redis_message_id="r",
            traceback="tb",
            **{GENERATION_OPTION: 2, UNRECORDED_OPTION: True},
        ),
        {"on_orphan": "fail"},
    )
    assert (record.id, record.name, record.system, record.queue) == (
        "m-1", "send_mail", "dramatiq", "mail",
    )  # fmt: skip
    assert record.args == [1, "a"] and record.kwargs == {"to": "x@example.com"}
    assert record.options == {"max_retries": 3, "on_orphan": "fail"}
    assert record.generation == 2
    assert record.queued_at == datetime(2027, 1, 15, 8, 0, 0, 123000, tzinfo=timezone.utc)


def test_a_record_stamped_by_the_ledger_carries_no_time_of_its_own() -> None:
    record = record_of(message(), stamped=False)
    assert record.queued_at is None and record.first_queued_at is None


def test_a_first_delay_is_kept_as_its_eta_a_retry_delay_is_not() -> None:
    assert record_of(message(eta=5)).options == {ETA_OPTION: 5}
    assert record_of(message(eta=5, retries=1)).options == {"retries": 1}


def test_the_message_again_has_the_same_id_and_the_markers() -> None:
    record = replace(record_of(message(max_retries=3)), generation=4)
    again, delay = message_of(record, Republish.RECOVERY, now_ms=0)
    assert (again.message_id, again.actor_name, again.queue_name) == ("m-1", "send_mail", "mail")
    assert again.args == (1, "a") and again.kwargs == {"to": "x@example.com"}
    assert again.message_timestamp == 1_800_000_000_123  # its age is the job's, not the publish's
    assert again.options == {
        "max_retries": 3,
        TRACKED_OPTION: True,
        GENERATION_OPTION: 4,
        REPUBLISH_OPTION: "recovery",
    }
    assert delay is None


def test_what_is_left_of_a_delay_is_kept() -> None:
    record = record_of(message(eta=10_000))
    assert message_of(record, None, now_ms=4_000)[1] == 6_000
    assert message_of(record, None, now_ms=20_000)[1] is None
    assert ETA_OPTION not in message_of(record, None, now_ms=0)[0].options


def test_a_restart_starts_the_retries_afresh() -> None:
    record = replace(record_of(message(retries=3)), state=JobState.FAILED)
    assert "retries" not in message_of(record, Republish.RESTART)[0].options


def test_malformed_markers_are_ignored() -> None:
    assert generation_of({GENERATION_OPTION: "x"}) is None
    assert generation_of({GENERATION_OPTION: True}) is None
    assert generation_of({GENERATION_OPTION: "3"}) == 3
    assert republish_of({REPUBLISH_OPTION: "nonsense"}) is None
    assert republish_of({REPUBLISH_OPTION: "restart"}) is Republish.RESTART
