"""Where the ledger lives: the Store seam and its implementations, picked by URL."""

from __future__ import annotations

from jobledger.config import Settings
from jobledger.errors import UnknownStoreScheme
from jobledger.stores.base import ANY, KEEP, Store, Transition

__all__ = ["ANY", "KEEP", "Store", "Transition", "open_store", "store_for"]

#: The SQL store's schemes (a ``+driver`` suffix may follow, as in ``postgresql+psycopg``).
SQL_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
#: The Redis store's schemes.
REDIS_SCHEMES = (
    *("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"),
)


def open_store(url: str, **options: object) -> Store:
    """The store a ledger URL names, by its scheme: ``sqlite:///…``, ``postgresql://…`` (or
    ``postgres://``), ``mysql://…``/``mariadb://…`` (the SQL store), ``redis://…``,
    ``rediss://…``, ``redis+sentinel://…``, ``redis+cluster://…`` (the Redis store).
    ``options`` go to the store (``auto_migrate``, ``connect_timeout``,
    ``statement_timeout``). An unknown scheme is an
    :class:`UnknownStoreScheme` naming the known ones."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in REDIS_SCHEMES:
        from jobledger.stores.redis import RedisStore

        # PostgreSQL's per-write durability: a Redis ledger's is the server's appendfsync
        options.pop("synchronous_publish", None)
        return RedisStore(url, **options)  # type: ignore[arg-type]
    if scheme.partition("+")[0] in SQL_SCHEMES:
        from jobledger.stores.sql import SQLStore

        return SQLStore(url, **options)  # type: ignore[arg-type]
    known = ", ".join(f"{s}://" for s in (*SQL_SCHEMES, *REDIS_SCHEMES))
    shown = url.split("@")[-1] if "@" in url else url
    raise UnknownStoreScheme(
        f"unknown ledger URL scheme {scheme or shown!r}: expected one of {known}"
    )


def store_for(settings: Settings) -> Store:
    """The store the settings name, with their migration and timeout choices."""
    return open_store(
        settings.database_url,
        auto_migrate=settings.auto_migrate,
        connect_timeout=settings.connect_timeout,
        statement_timeout=settings.statement_timeout,
        synchronous_publish=settings.synchronous_publish,
    )
