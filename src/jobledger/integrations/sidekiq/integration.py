"""The Sidekiq integration: publishes job records into a Sidekiq app's own Redis, exactly as
Sidekiq's client pushes them, with the same jid, so the Ruby side runs them as any job and the
ledger's row continues. No Ruby here: redis-py writes what ``Sidekiq::Client`` would."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from jobledger.config import Settings
from jobledger.errors import ConfigError, PublishError
from jobledger.integrations.sidekiq.keys import SYSTEM, Keys
from jobledger.integrations.sidekiq.payload import due_at, to_payload
from jobledger.integrations.sidekiq.watcher import ProcessWatcher
from jobledger.model import JobRecord, Republish
from jobledger.runtime.service import Loop

if TYPE_CHECKING:
    from jobledger.recovery import Recovery


class SidekiqIntegration:
    """Publishes to one Sidekiq app's Redis and watches its processes (see :meth:`watch_loop`)."""

    system = SYSTEM

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.sidekiq_namespace)

    @classmethod
    def from_settings(cls, settings: Settings) -> SidekiqIntegration:
        """The integration for ``JOBLEDGER_SIDEKIQ_REDIS_URL`` (connects lazily)."""
        if settings.sidekiq_redis_url is None:
            raise ConfigError("set JOBLEDGER_SIDEKIQ_REDIS_URL to the Redis of your Sidekiq app")
        client = redis.Redis.from_url(
            settings.sidekiq_redis_url,
            decode_responses=True,
            socket_connect_timeout=settings.connect_timeout,
            socket_timeout=settings.statement_timeout,
        )
        return cls(client, settings)

    def publish(self, record: JobRecord, *, reason: Republish | None = None) -> None:
        """LPUSH the job onto ``queue:<name>`` and SADD its queue in one MULTI (a scheduled job
        not yet due: ZADD ``schedule``), as ``Sidekiq::Client#push`` does."""
        at = due_at(record)
        try:
            seconds, micros = self.client.time()  # stamped as a client would, on one clock
            now = seconds + micros / 1e6
            payload = to_payload(record, reason, now)
            with self.client.pipeline(transaction=True) as pipe:
                if at is not None and at > now:
                    pipe.zadd(self.keys.schedule, {json.dumps(payload): at})
                else:
                    payload["enqueued_at"] = now
                    pipe.sadd(self.keys.queues, record.queue)
                    pipe.lpush(self.keys.queue(record.queue), json.dumps(payload))
                pipe.execute()
        except redis.RedisError as exc:
            raise PublishError(
                f"Sidekiq's Redis did not take job {record.id}: {exc} "
                "(check JOBLEDGER_SIDEKIQ_REDIS_URL and that Redis is up)"
            ) from None

    def watch_loop(
        self, recovery: Recovery, *, on_moved: Callable[[int], None], on_error: Callable[[], None]
    ) -> Loop:
        """The supervisor's loop that pushes back the jobs of Sidekiq processes that died: it
        looks four times per TTL, and at most every recovery interval."""
        watcher = ProcessWatcher(
            self.client, self.keys, recovery, ttl=self.settings.sidekiq_process_ttl
        )

        def look() -> None:
            moved = watcher.look()
            if moved:
                on_moved(moved)

        interval = min(self.settings.recovery_interval, self.settings.sidekiq_process_ttl / 4)
        return Loop("sidekiq-processes", interval, look, on_error=on_error)

    def close(self) -> None:
        self.client.close()
