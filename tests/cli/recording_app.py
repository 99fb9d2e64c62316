"""A stand-in queue system for CLI restart tests, loaded with ``jobledger restart --app``.

Importing it registers, in the process-wide registry, an integration for each system named in
``RECORDING_APP_SYSTEMS`` (default ``celery,demo``). Its ``publish`` appends one JSON line per
job to the file named by ``RECORDING_APP_LOG``: the record as it was handed over, plus the state
the ledger held at that moment (read through ``RECORDING_APP_LEDGER_URL``), which shows whether
the publish came before the record moved. A job whose id is listed in ``RECORDING_APP_FAIL`` is
refused with :class:`~jobledger.errors.PublishError`, as a broker that is down would.
"""

from __future__ import annotations

import json
import os

from jobledger.errors import PublishError
from jobledger.integrations.base import registry
from jobledger.model import JobRecord, Republish
from jobledger.stores import Store, open_store

_ledger: Store | None = None


def _ledger_state(job_id: str) -> str | None:
    global _ledger
    url = os.environ.get("RECORDING_APP_LEDGER_URL")
    if not url:
        return None
    if _ledger is None:
        _ledger = open_store(url)
    current = _ledger.get(job_id)
    return None if current is None else current.state.value


class RecordingIntegration:
    def __init__(self, system: str) -> None:
        self.system = system

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        refused = {i for i in os.environ.get("RECORDING_APP_FAIL", "").split(",") if i}
        if record.id in refused:
            raise PublishError(f"broker refused {record.id}: connection reset")
        line = {
            "id": record.id,
            "system": self.system,
            "name": record.name,
            "queue": record.queue,
            "args": record.args,
            "kwargs": record.kwargs,
            "options": record.options,
            "state": record.state.value,
            "ledger_state": _ledger_state(record.id),
        }
        with open(os.environ["RECORDING_APP_LOG"], "a", encoding="utf-8") as log:
            log.write(json.dumps(line, ensure_ascii=False) + "\n")


for _system in os.environ.get("RECORDING_APP_SYSTEMS", "celery,demo").split(","):
    if _system:
        registry.register(RecordingIntegration(_system))
