"""``--broker`` with ``--queue-system``: each queue system jobledger ships an integration for
installs on a bare client of its broker URL; any other is refused by name."""

from __future__ import annotations

import pytest

from jobledger.config import Settings
from jobledger.errors import ConfigError
from jobledger.integrations.base import KNOWN, install_for_broker, registry


def test_sidekiq_installs_on_the_redis_url_given_as_its_broker() -> None:
    assert {"celery", "sidekiq"} <= set(KNOWN)
    integration = install_for_broker("sidekiq", "redis://127.0.0.1:1/0", Settings())
    try:
        assert registry.get("sidekiq") is integration  # connects lazily: nothing reached yet
    finally:
        registry.unregister("sidekiq", integration)


def test_an_unknown_system_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"'beanstalk'.*known: celery, rq, sidekiq"):
        install_for_broker("beanstalk", "redis://127.0.0.1:1/0", Settings())
