"""jobledger: a durable ledger for background jobs. No accepted job is silently lost.

The public API is small: settings, the record and state types, a store, the outbox and the
errors. Integrations live in :mod:`jobledger.integrations`, the test toolkit in
:mod:`jobledger.testing`.
"""

from jobledger.config import Settings
from jobledger.errors import (
    ConfigError,
    IntegrationMissing,
    InvalidTransition,
    JobLedgerError,
    JobNotFound,
    PublishError,
    SchemaMissing,
    StagingError,
    StoreError,
    StoreUnavailable,
    UniqueKeyHeld,
)
from jobledger.lifecycle import Claim, Lifecycle
from jobledger.model import Instance, JobRecord, JobState
from jobledger.outbox import Outbox
from jobledger.query import JobQuery, Page
from jobledger.staging import staging_in
from jobledger.stores import Store, Transition, open_store

__version__ = "0.1.0"

__all__ = [
    "Claim",
    "ConfigError",
    "Instance",
    "IntegrationMissing",
    "InvalidTransition",
    "JobLedgerError",
    "JobNotFound",
    "JobQuery",
    "JobRecord",
    "JobState",
    "Lifecycle",
    "Outbox",
    "Page",
    "PublishError",
    "SchemaMissing",
    "Settings",
    "StagingError",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "Transition",
    "UniqueKeyHeld",
    "__version__",
    "open_store",
    "staging_in",
]
