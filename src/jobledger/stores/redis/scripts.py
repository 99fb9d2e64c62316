"""The Lua scripts of the Redis store, kept as package data (``lua/*.lua``).

Each script is ``common.lua`` followed by its own file, registered with redis-py, which runs
it by ``EVALSHA`` and loads it again when the server answers ``NOSCRIPT`` (a restarted server,
``SCRIPT FLUSH``, a failover to a replica that never saw it).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from redis.commands.core import Script

NAMES = (
    "create",
    "transition",
    "delete",
    "scan",
    "lease",
    "release",
    "beat",
    "instances",
    "alive",
    "orphans",
    "lock",
    "unlock",
    "queue_stats",
)


def source(name: str) -> str:
    """The full text of script ``name``: the shared functions, then its own."""
    folder = resources.files(__package__) / "lua"
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


class Scripts:
    """Every script, registered on ``client`` once: ``scripts.run("create", keys, args)``."""

    def __init__(self, client: Any) -> None:
        self._scripts: dict[str, Script] = {
            name: client.register_script(source(name)) for name in NAMES
        }

    def run(self, name: str, keys: list[str], args: list[Any], client: Any = None) -> Any:
        """Run script ``name``; ``client`` may be a pipeline (the script is queued there)."""
        return self._scripts[name](keys=keys, args=args, client=client)
