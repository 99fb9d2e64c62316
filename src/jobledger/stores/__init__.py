"""Where the ledger lives: the Store seam and its implementations."""

from jobledger.config import Settings
from jobledger.stores.base import ANY, KEEP, Store, Transition

__all__ = ["ANY", "KEEP", "Store", "Transition", "open_store", "store_for"]


def open_store(url: str, **options: object) -> Store:
    """The store for a database URL (``sqlite:///…``, ``postgresql://…``, ``mysql://…``)."""
    from jobledger.stores.sql import SQLStore

    return SQLStore(url, **options)  # type: ignore[arg-type]


def store_for(settings: Settings) -> Store:
    """The store the settings name, with their migration and timeout choices."""
    return open_store(
        settings.database_url,
        auto_migrate=settings.auto_migrate,
        connect_timeout=settings.connect_timeout,
        statement_timeout=settings.statement_timeout,
        synchronous_publish=settings.synchronous_publish,
    )
