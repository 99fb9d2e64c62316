"""Sidekiq, from Python: restart and recover the jobs of a Sidekiq app through its own Redis
(``pip install 'jobledger[sidekiq]'``, redis-py only). The Ruby app reports its jobs to the
supervisor's seed endpoints; nothing else changes there."""

from __future__ import annotations

from jobledger.config import Settings
from jobledger.integrations.base import Registry, registry
from jobledger.integrations.sidekiq.integration import SidekiqIntegration
from jobledger.integrations.sidekiq.keys import SYSTEM

__all__ = ["SYSTEM", "SidekiqIntegration", "install"]


def install(settings: Settings, into: Registry = registry) -> SidekiqIntegration:
    """Register the integration for ``JOBLEDGER_SIDEKIQ_REDIS_URL`` in ``into``."""
    integration = SidekiqIntegration.from_settings(settings)
    into.register(integration)
    return integration
