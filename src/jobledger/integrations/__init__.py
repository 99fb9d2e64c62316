"""Queue-system integrations; each lives in its own module and imports its queue lazily."""

from jobledger.integrations.base import Integration, Registry, registry

__all__ = ["Integration", "Registry", "registry"]
