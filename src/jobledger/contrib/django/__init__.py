"""Django support: the ledger's tables through ``manage.py migrate``, and staging jobs inside
``transaction.atomic``.

Add ``"jobledger.contrib.django"`` to ``INSTALLED_APPS`` and run ``manage.py migrate``; then
``Outbox.stage(record)`` inside ``transaction.atomic()`` commits or rolls back the job with the
block (``using="alias"`` names another database). Importing this module registers the staging
adapter with :data:`jobledger.staging.holders` and needs no Django settings yet.
"""

from jobledger.contrib.django.staging import (
    DjangoHolder,
    adapt,
    current,
    database_url,
    in_atomic_block,
)

__all__ = ["DjangoHolder", "adapt", "current", "database_url", "in_atomic_block"]
