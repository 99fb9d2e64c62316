"""The filter a person (or a script) uses to pick jobs, and keyset paging over the result.

One :class:`JobQuery` serves every place jobs are selected: the manager, the CLI, the API and
bulk restart/cancel, so a filter means the same thing everywhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from jobledger.errors import ConfigError
from jobledger.model import JobState, validate_job_id

T = TypeVar("T")


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: jobs are listed newest first by (``created_at``, ``id``)."""

    created_at: float
    id: str

    def encode(self) -> str:
        raw = json.dumps([self.created_at, self.id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """Parse a token made by :meth:`encode`; :class:`ConfigError` for anything else."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            created_at, job_id = json.loads(raw)
            return cls(float(created_at), validate_job_id(job_id))
        except (ValueError, TypeError, binascii.Error, ConfigError):
            raise ConfigError(f"malformed page cursor {token!r}") from None


@dataclass(frozen=True)
class JobQuery:
    """Which jobs. Every field narrows; an empty query selects every job.

    - ``match``: a literal substring of the arguments (args, kwargs or tags). ``%``, ``_``,
      quotes and backslashes match themselves, both as the text of a string argument and as the
      JSON the arguments are stored as. Case-sensitive on every database.
    - ``regex``: read ``match`` as a regular expression instead (the database's own dialect:
      POSIX on PostgreSQL, PCRE on MariaDB/MySQL, Python's ``re`` on SQLite).
    - ``older_than``: seconds since the job entered its current state (its last transition),
      on the database's clock: "queued for more than an hour" is ``older_than=3600``.
    """

    states: frozenset[JobState] = frozenset()
    queues: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()
    systems: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()
    owners: frozenset[str] = frozenset()
    match: str | None = None
    regex: bool = False
    older_than: float | None = None

    def __post_init__(self) -> None:
        states = frozenset(JobState.parse(s) for s in _as_set(self.states))
        object.__setattr__(self, "states", states)
        for label in ("queues", "names", "systems", "owners"):
            object.__setattr__(self, label, _as_set(getattr(self, label)))
        object.__setattr__(self, "ids", frozenset(validate_job_id(i) for i in _as_set(self.ids)))
        if self.match == "":
            object.__setattr__(self, "match", None)
        if self.regex:
            if self.match is None:
                raise ConfigError("a regular expression match needs a pattern")
            try:
                re.compile(self.match)
            except re.error as exc:
                raise ConfigError(
                    f"regular expression {self.match!r} does not compile: {exc}"
                ) from None
        if self.older_than is not None and not self.older_than >= 0:
            raise ConfigError(f"age must be zero or more seconds, not {self.older_than!r}")

    def narrowed(self, **changes: object) -> JobQuery:
        """A copy with some fields replaced (``states`` given here replace, not intersect)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def _as_set(value: Iterable[str] | str | None) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset({value})
    return frozenset(value)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of results; ``next_cursor`` is None on the last page."""

    items: list[T] = field(default_factory=list)
    next_cursor: str | None = None
