"""``celery -A e2eworker worker``: the test app, configured from the environment."""

from __future__ import annotations

import os

from e2eapp import make_app

from jobledger.config import Settings

_visibility = os.environ.get("E2E_VISIBILITY_TIMEOUT")
app, integration = make_app(
    os.environ["E2E_BROKER"],
    os.environ["E2E_QUEUE"],
    Settings.from_env(),
    float(_visibility) if _visibility else None,
)
