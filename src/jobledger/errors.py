"""The exceptions jobledger raises.

Every error a caller can act on is a subclass of :class:`JobLedgerError`, and its message is one
line a person can act on (what went wrong, and what to do about it). The CLI prints that line and
exits with status 2; nothing already recorded is altered by a call that raised.
"""

from __future__ import annotations


class JobLedgerError(Exception):
    """Base class of every error jobledger raises on purpose."""


class ConfigError(JobLedgerError, ValueError):
    """A setting or argument is malformed (a URL, a duration, a state name, an id)."""


class UnknownStoreScheme(ConfigError):
    """A ledger URL whose scheme names no store jobledger has (the message lists those)."""


class InvalidTransition(JobLedgerError, ValueError):
    """A transition that the state machine does not allow was asked for (a programming error)."""


class StoreError(JobLedgerError):
    """The ledger store could not do what was asked."""


class StoreUnavailable(StoreError):
    """The ledger database cannot be reached (down, wrong host, bad credentials)."""


class SchemaMissing(StoreError):
    """The ledger tables are missing or older than this version of jobledger."""


class UniqueKeyHeld(JobLedgerError):
    """A job was created with a ``unique_key`` that another job, not yet finished, holds:
    nothing was written. ``holder`` is that job's id (what a unique publish returns)."""

    def __init__(self, key: str, holder: str) -> None:
        super().__init__(f"unique key {key!r} is held by job {holder}, which has not finished")
        self.key = key
        self.holder = holder


class JobNotFound(JobLedgerError, LookupError):
    """No job with that id is in the ledger."""


class IntegrationMissing(JobLedgerError):
    """No integration is registered for a job's queue system (``system``), so it cannot be
    published again."""

    def __init__(self, message: str, system: str | None = None) -> None:
        super().__init__(message)
        self.system = system


class PublishError(JobLedgerError):
    """The queue system refused or failed to take a job; the ledger was left unchanged."""


class BrokerUnavailable(JobLedgerError):
    """A queue system's broker could not be read (its processes, its queues); the next look
    tries again."""


class MessageRefused(PublishError):
    """The queue system refused this job's message itself (no such queue, a message it cannot
    encode), not for an outage: trying again later would not help."""


class StagingError(JobLedgerError):
    """A job could not be staged in the caller's transaction (no usable transaction holder, no
    ledger tables in that database, an unknown task); nothing was written."""


class DeliverySkipped(JobLedgerError):
    """The claim guard did not run a delivery's body (a duplicate, a stale or stray copy, a
    cancelled job...): the adapter acknowledges the delivery and stores no result."""

    def __init__(self, message: str, claim: object) -> None:
        super().__init__(message)
        #: The :class:`~jobledger.lifecycle.Claim` that said so.
        self.claim = claim
