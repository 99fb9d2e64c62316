"""A Django process staging Dramatiq messages inside ``transaction.atomic`` on the ledger's
database (run by the staging e2e test: Django is set up once per process). Prints the ids
of the committed block's jobs and of the rolled-back block's job, as JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import django_project  # noqa: E402

django_project.setup({"default": os.environ["JOBLEDGER_DATABASE_URL"]})

from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from dramatiq_app import make_app  # noqa: E402

from jobledger.config import Settings  # noqa: E402

call_command("migrate", verbosity=0)
broker, middleware = make_app(
    os.environ["E2E_BROKER"], os.environ["E2E_QUEUE"], Settings.from_env()
)
with transaction.atomic():  # the open block is where stage() writes, with no using=
    committed = [middleware.stage("e2e.work", (i, 0.0)).message_id for i in range(5)]
rolled_back = None
try:
    with transaction.atomic():
        rolled_back = middleware.stage("e2e.work", (99, 0.0)).message_id
        raise RuntimeError("the block fails")
except RuntimeError:
    pass
middleware.close()
broker.close()
print(json.dumps({"committed": committed, "rolled_back": rolled_back}))
