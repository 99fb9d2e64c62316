"""Sidekiq's job format, both ways: the JSON payload a job record is pushed back as, and the
payloads read from a process's in-flight work (Sidekiq 6.0-6.3 store the payload as an object
there, 6.4+ and 7 as the JSON text itself)."""

from __future__ import annotations

import json
from typing import Any

from jobledger.model import JobRecord, Republish

#: The record option holding a job's last known Sidekiq payload (kept keys such as ``retry``,
#: ``retry_count``, ``wrapped``, ``tags`` travel with the job when it is pushed back).
PAYLOAD_OPTION = "sidekiq_payload"
#: The record option holding the epoch second a scheduled job is due.
AT_OPTION = "at"
#: The payload keys a pushed-back job carries for the claim: its fencing generation and why.
GENERATION_KEY = "jobledger_generation"
REPUBLISH_KEY = "jobledger_republish"

# What Sidekiq writes when it runs or retries a job: a pushed-back job starts without them.
_RUN_KEYS = ("enqueued_at", "at", "error_message", "error_class", "failed_at", "retried_at")


def to_payload(record: JobRecord, reason: Republish | None, now: float) -> dict[str, Any]:
    """The payload Sidekiq's ``Client#push`` would write for ``record``, with the same jid."""
    known = record.options.get(PAYLOAD_OPTION)
    payload = {k: v for k, v in (known or {}).items() if k not in _RUN_KEYS}
    args = list(record.args)
    if record.kwargs:
        args.append(record.kwargs)  # Sidekiq has positional arguments only: a hash is one
    payload.update(
        {
            "class": record.name,
            "args": args,
            "queue": record.queue,
            "jid": record.id,
            GENERATION_KEY: record.generation,
        }
    )
    payload.setdefault("retry", True)
    payload.setdefault("created_at", now)
    if reason is not None:
        payload[REPUBLISH_KEY] = reason.value
    return payload


def due_at(record: JobRecord) -> float | None:
    """The epoch second a scheduled job is due, or None (run now)."""
    at = record.options.get(AT_OPTION)
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None


def generation_of(payload: dict[str, Any]) -> int:
    """The generation a payload was pushed with (0: pushed by the app itself)."""
    value = payload.get(GENERATION_KEY, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def read_work(entries: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Job payloads by jid from a process's work hash (thread id → ``{"queue", "payload",
    "run_at"}`` as JSON); an entry that does not read is left out."""
    found: dict[str, dict[str, Any]] = {}
    for raw in entries.values():
        try:
            entry = json.loads(raw)
            payload = entry["payload"]
            if isinstance(payload, str):
                payload = json.loads(payload)
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get("jid"), str):
            found[payload["jid"]] = payload
    return found
