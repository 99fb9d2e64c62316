"""A process without any actor's code: only a broker with jobledger installed, as a supervisor
or an operator's shell has (``jobledger restart --app bare``)."""

from __future__ import annotations

import os

from dramatiq_app import make_broker

from jobledger.config import Settings
from jobledger.integrations.dramatiq import install

BROKER = make_broker(os.environ["E2E_BROKER"], os.environ["E2E_QUEUE"])
install(BROKER, Settings.from_env())
