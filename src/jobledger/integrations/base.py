"""The Integration seam: the glue between the ledger and one queue system.

An integration observes its queue's hooks and turns them into ledger transitions (that part is
specific to each queue), and it can :meth:`~Integration.publish` a job record back onto its queue
with the original id, name, args, queue and options, which is all that restart and recovery need
(invariant 10: no task code required). The core finds integrations through :class:`Registry`.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

from jobledger.errors import IntegrationMissing
from jobledger.model import JobRecord

#: The extra that brings each known queue system's integration.
EXTRAS = {"celery": "celery", "rq": "rq", "dramatiq": "dramatiq", "sidekiq": "sidekiq"}


@runtime_checkable
class Integration(Protocol):
    """One queue system, as the core sees it."""

    #: The queue system's name as job records carry it (``celery``, ``rq``, ...).
    system: str

    def publish(self, record: JobRecord) -> None:
        """Put the job on its queue again, same id; raise :class:`~jobledger.errors.PublishError`
        if the broker did not take it. Returning means the broker accepted the message."""


class Registry:
    """Integrations by queue system. A process usually has one: :data:`registry`."""

    def __init__(self) -> None:
        self._by_system: dict[str, Integration] = {}
        self._lock = threading.Lock()

    def register(self, integration: Integration) -> None:
        """Make ``integration`` the one for its system (replacing an earlier one)."""
        with self._lock:
            self._by_system[integration.system] = integration

    def unregister(self, system: str) -> None:
        with self._lock:
            self._by_system.pop(system, None)

    def get(self, system: str) -> Integration:
        """The integration for ``system``, or :class:`IntegrationMissing` saying how to get one."""
        with self._lock:
            found = self._by_system.get(system)
        if found is not None:
            return found
        extra = EXTRAS.get(system)
        how = (
            f"install it with pip install 'jobledger[{extra}]' and install the integration on "
            "your app in this process"
            if extra
            else "register an integration for it in this process"
        )
        raise IntegrationMissing(f"no integration for queue system {system!r} is registered: {how}")

    def systems(self) -> list[str]:
        with self._lock:
            return sorted(self._by_system)


#: The process-wide registry integrations add themselves to when installed.
registry = Registry()
