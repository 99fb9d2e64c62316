"""Sidekiq's job format both ways: what a record is pushed back as, and what a process's work
hash holds in Sidekiq 6.0-6.3 (the payload as an object), 6.4 and 7 (as JSON text)."""

from __future__ import annotations

import json

from jobledger.integrations.sidekiq.keys import Keys
from jobledger.integrations.sidekiq.payload import (
    PAYLOAD_OPTION,
    generation_of,
    read_work,
    to_payload,
)
from jobledger.model import JobRecord, Republish


def test_a_record_becomes_sidekiqs_payload_with_its_jid() -> None:
    record = JobRecord(
        id="a1b2c3", name="Reports::Build", system="sidekiq", queue="reports",
        args=[42, "x"], kwargs={"lang": "en"}, generation=2,
    )  # fmt: skip
    payload = to_payload(record, Republish.RESTART, now=1000.5)
    assert payload == {
        "class": "Reports::Build",
        "args": [42, "x", {"lang": "en"}],
        "queue": "reports",
        "jid": "a1b2c3",
        "retry": True,
        "created_at": 1000.5,
        "jobledger_generation": 2,
        "jobledger_republish": "restart",
    }


def test_a_held_payload_keeps_its_keys_and_drops_what_a_run_wrote() -> None:
    held = {
        "class": "Old", "args": [1], "jid": "j", "queue": "q", "retry": 5, "retry_count": 2,
        "created_at": 10.0, "enqueued_at": 11.0, "error_message": "boom", "tags": ["a"],
        "wrapped": "SomeJob",
    }  # fmt: skip
    record = JobRecord(id="j", name="Old", system="sidekiq", queue="q", args=[1],
                       options={PAYLOAD_OPTION: held})  # fmt: skip
    payload = to_payload(record, Republish.RECOVERY, now=99.0)
    assert payload["retry"] == 5 and payload["retry_count"] == 2 and payload["tags"] == ["a"]
    assert payload["created_at"] == 10.0 and payload["wrapped"] == "SomeJob"
    assert "enqueued_at" not in payload and "error_message" not in payload
    assert payload["jobledger_republish"] == "recovery"


def test_work_entries_of_sidekiq_6_and_7_read_alike() -> None:
    job = {"class": "K", "args": [], "jid": "abc", "queue": "default", "jobledger_generation": 1}
    entries = {
        "tid-6": json.dumps({"queue": "default", "payload": job, "run_at": 1}),
        "tid-7": json.dumps({"queue": "default", "payload": json.dumps({**job, "jid": "def"})}),
        "garbled": "{not json",
        "no-jid": json.dumps({"payload": {"class": "K"}}),
    }
    found = read_work(entries)
    assert sorted(found) == ["abc", "def"]
    assert generation_of(found["abc"]) == 1 and generation_of({"jid": "x"}) == 0


def test_namespaced_keys() -> None:
    plain, spaced = Keys(), Keys("myapp")
    assert (plain.queue("mail"), spaced.queue("mail")) == ("queue:mail", "myapp:queue:mail")
    assert spaced.work("host:1:abc") == ("myapp:host:1:abc:workers", "myapp:host:1:abc:work")
    assert (spaced.processes, spaced.schedule, spaced.queues) == (
        "myapp:processes", "myapp:schedule", "myapp:queues",
    )  # fmt: skip
