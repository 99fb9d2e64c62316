"""A recording integration for the ``http`` system, for tests of restarts through the server.

In-process tests build a :class:`RecordingIntegration` and hand a registry holding it to
``create_app``. A server subprocess imports this module with ``jobledger serve --app
server.recording``: with ``JOBLEDGER_TEST_PUBLISH_LOG`` set, it registers itself in the
process-wide registry and appends each published job id to that file.
"""

from __future__ import annotations

import os
import threading

from jobledger.integrations.base import registry
from jobledger.model import JobRecord, Republish


class RecordingIntegration:
    """Takes every publish (the broker "accepts" it) and remembers the job ids."""

    def __init__(self, system: str = "http", log_path: str | None = None) -> None:
        self.system = system
        self.log_path = log_path
        self.published: list[str] = []
        self._lock = threading.Lock()

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        with self._lock:
            self.published.append(record.id)
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as log:
                    log.write(record.id + "\n")


_log = os.environ.get("JOBLEDGER_TEST_PUBLISH_LOG")
if _log:
    registry.register(RecordingIntegration(log_path=_log))
