# mypy: disable-error-code="import-untyped,untyped-decorator"
"""The Celery app of ``jobledger demo``; the demo's workers run ``celery -A
jobledger.demo_worker worker`` and read their broker and queue from ``JLDEMO_*`` variables.

The default broker is kombu's filesystem transport (messages are files in a directory), so the
demo needs no server. ``acks_late`` with a prefetch of one keeps every message a worker holds a
*running* job: a filesystem message is gone once read, and the demo wants every job the killed
worker held to be one the ledger knows as started.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from jobledger.config import Settings
from jobledger.integrations.celery import CeleryIntegration, install

TASK = "demo.render_thumbnail"


def make_app(
    broker: str, folder: str, queue: str, settings: Settings
) -> tuple[Celery, CeleryIntegration]:
    """The demo app on ``broker`` (``filesystem://`` keeps its messages in ``folder``)."""
    app = Celery("jobledger-demo", broker=broker, set_as_current=False)
    options: dict[str, Any] = {}
    if broker.startswith("filesystem"):
        options = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "control_folder": os.path.join(folder, "control"),  # not the working directory
            "store_processed": False,
            "polling_interval": 0.1,
        }
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_lost_wait=1.0,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name=TASK, tracked=True, shared=False)
    def render_thumbnail(n: int, seconds: float) -> str:
        time.sleep(seconds)
        return f"thumb-{n}.png"

    return app, install(app, settings=settings)


if "JLDEMO_QUEUE" in os.environ:  # imported by a demo worker process
    app, integration = make_app(
        os.environ["JLDEMO_BROKER"],
        os.environ.get("JLDEMO_FOLDER", ""),
        os.environ["JLDEMO_QUEUE"],
        Settings.from_env(),
    )
