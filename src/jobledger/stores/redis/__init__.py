"""The ledger in Redis (redis-py; Redis 6.2+ or Valkey): see :class:`RedisStore`."""

from jobledger.stores.redis.store import RedisStore

__all__ = ["RedisStore"]
