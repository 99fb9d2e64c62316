"""``celery -A chaosworker worker``: the chaos app, configured from the environment."""

from __future__ import annotations

import os

from chaosapp import make_app

from jobledger.config import Settings

app, integration = make_app(
    os.environ["CHAOS_BROKER"],
    os.environ["CHAOS_QUEUE"],
    os.environ["CHAOS_COUNTS_URL"],
    os.environ["CHAOS_PREFIX"],
    Settings.from_env(),
)
