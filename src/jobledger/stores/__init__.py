"""Where the ledger lives: the Store seam and its implementations."""

from jobledger.stores.base import ANY, KEEP, Store, Transition

__all__ = ["ANY", "KEEP", "Store", "Transition", "open_store"]


def open_store(url: str, **options: object) -> Store:
    """The store for a database URL (``sqlite:///…``, ``postgresql://…``, ``mysql://…``)."""
    from jobledger.stores.sql import SQLStore

    return SQLStore(url, **options)  # type: ignore[arg-type]
