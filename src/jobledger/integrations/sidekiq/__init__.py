"""Sidekiq, from Python: restart and recover the jobs of a Sidekiq app through its own Redis
(``pip install 'jobledger[sidekiq]'``, redis-py only). The Ruby app reports its jobs to the
supervisor's seed endpoints; nothing else changes there."""

from __future__ import annotations

from dataclasses import replace

from jobledger.config import Settings
from jobledger.integrations.base import Registry, registry
from jobledger.integrations.sidekiq.integration import SidekiqIntegration
from jobledger.integrations.sidekiq.keys import SYSTEM

__all__ = ["SYSTEM", "SidekiqIntegration", "install", "install_for_broker"]


def install(settings: Settings, into: Registry = registry) -> SidekiqIntegration:
    """Register the integration for ``JOBLEDGER_SIDEKIQ_REDIS_URL`` in ``into``."""
    integration = SidekiqIntegration.from_settings(settings)
    into.register(integration)
    return integration


def install_for_broker(url: str, settings: Settings) -> SidekiqIntegration:
    """The integration on the Sidekiq app's Redis at ``url`` (``--broker``, ``--queue-system
    sidekiq``): :func:`install` with that URL for ``JOBLEDGER_SIDEKIQ_REDIS_URL``."""
    return install(replace(settings, sidekiq_redis_url=url))
