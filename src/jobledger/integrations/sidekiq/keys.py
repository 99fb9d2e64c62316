"""Where a Sidekiq app keeps things in its Redis: the key names, behind the redis-namespace
prefix when the app uses one (every key prefixed ``<namespace>:``; set members are not)."""

from __future__ import annotations

from dataclasses import dataclass

#: The queue system name Sidekiq jobs are recorded under.
SYSTEM = "sidekiq"


@dataclass(frozen=True)
class Keys:
    """The Sidekiq keys of one app (``namespace`` None: keys as Sidekiq names them)."""

    namespace: str | None = None

    def key(self, name: str) -> str:
        return f"{self.namespace}:{name}" if self.namespace else name

    @property
    def queues(self) -> str:
        """The set of queue names the Web UI and ``Sidekiq::Queue.all`` list."""
        return self.key("queues")

    def queue(self, name: str) -> str:
        """The list a queue's jobs wait in (LPUSH in, BRPOP out)."""
        return self.key(f"queue:{name}")

    @property
    def schedule(self) -> str:
        """The sorted set of scheduled jobs, scored by the epoch second they are due."""
        return self.key("schedule")

    @property
    def processes(self) -> str:
        """The set of live process identities (``host:pid:nonce``)."""
        return self.key("processes")

    def process(self, identity: str) -> str:
        """A process's heartbeat hash (``beat``, ``info``, ``busy``...; expires 60 s on)."""
        return self.key(identity)

    def work(self, identity: str) -> tuple[str, str]:
        """A process's in-flight jobs by thread: ``:workers`` in Sidekiq 6, ``:work`` in 7."""
        return self.key(f"{identity}:workers"), self.key(f"{identity}:work")
