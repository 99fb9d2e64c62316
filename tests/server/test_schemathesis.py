"""Property tests from ``/openapi.json``: no request schemathesis can build makes a 5xx.

Examples per operation are bounded so the whole run stays well under a minute.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from jobledger.config import Settings
from jobledger.integrations.base import Registry
from jobledger.model import JobRecord, JobState
from jobledger.server import create_app
from ledgerdb import database_url, empty_sql_store

from .recording import RecordingIntegration

warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")

_URL = database_url("postgresql", Path("."))
_STORE = empty_sql_store(_URL)
for i, state in enumerate([JobState.FAILED, JobState.QUEUED, JobState.STARTED, JobState.SUCCEEDED]):
    _STORE.create(
        JobRecord(
            id=f"fuzz-{i}",
            name="t",
            system="http",
            state=state,
            owner="x:1" if state is JobState.STARTED else None,
        )
    )
_REGISTRY = Registry()
_REGISTRY.register(RecordingIntegration())
APP = create_app(
    Settings(database_url=_URL), store=_STORE, integrations=_REGISTRY, maintenance=False
)

schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call()
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    )
