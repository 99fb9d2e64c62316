"""The filter a person (or a script) uses to pick jobs, and keyset paging over the result.

One :class:`JobQuery` serves every place jobs are selected: the manager, the CLI, the API and
bulk restart/cancel, so a filter means the same thing everywhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from jobledger.errors import ConfigError
from jobledger.model import FINAL_STATES, JobState, validate_job_id, validate_unique_key

T = TypeVar("T")
R = TypeVar("R")


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
    - ``newer_than``: the opposite bound: "finished within the last hour" is
      ``states={succeeded}, newer_than=3600`` (an index range, however big the ledger).
    - ``recovered``: only jobs recovered at least once (their worker died under them).
    - ``unique_keys``: jobs published with one of these unique keys, finished or not (the
      unfinished one among them holds its key).
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
    newer_than: float | None = None
    recovered: bool = False
    unique_keys: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        states = frozenset(JobState.parse(s) for s in _as_set(self.states))
        object.__setattr__(self, "states", states)
        for label in ("queues", "names", "systems", "owners"):
            object.__setattr__(self, label, _as_set(getattr(self, label)))
        object.__setattr__(self, "ids", frozenset(validate_job_id(i) for i in _as_set(self.ids)))
        keys = frozenset(validate_unique_key(k) for k in _as_set(self.unique_keys))
        object.__setattr__(self, "unique_keys", keys)
        if self.match == "":
            object.__setattr__(self, "match", None)
        if self.regex:
            if self.match is None:
                raise ConfigError("a regular expression match needs a pattern")
            _check_regex(self.match)
        for age in (self.older_than, self.newer_than):
            if age is not None and not age >= 0:
                raise ConfigError(f"age must be zero or more seconds, not {age!r}")

    def narrowed(self, **changes: object) -> JobQuery:
        """A copy with some fields replaced (``states`` given here replace, not intersect)."""
        return replace(self, **changes)  # type: ignore[arg-type]


def _check_regex(pattern: str) -> None:
    """:class:`ConfigError` for a pattern that does not compile, or that Python reads other
    than a database would (``[[:alpha:]]``, a POSIX class to PostgreSQL, is a set of
    characters to SQLite's and the memory store's ``re``: Python warns of it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"regular expression {pattern!r} does not compile: {exc}") from None
        except FutureWarning as exc:
            raise ConfigError(
                f"regular expression {pattern!r} is ambiguous ({exc}): POSIX classes such as "
                "[[:alpha:]] are not supported everywhere; write e.g. [A-Za-z] or \\w, and "
                "escape a literal '[' as \\["
            ) from None


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


def match_needles(needle: str) -> list[str]:
    """The literal texts a ``match`` looks for in the stored JSON: ``needle`` as typed (a JSON
    fragment such as ``"user": 7`` matches), and as the same text reads inside a JSON string
    (quotes, backslashes and control characters escaped), so the raw value of a string
    argument matches too. One entry when the two are the same, or when ``needle`` holds a
    control character: stored JSON always escapes those, so only the escaped form can match
    (and PostgreSQL refuses a NUL in a parameter)."""
    escaped = json.dumps(needle, ensure_ascii=False)[1:-1]
    if any(ord(c) < 0x20 for c in needle):
        return [escaped]
    return list(dict.fromkeys([needle, escaped]))


def check_page_size(limit: int) -> int:
    """``limit`` if it is a usable page (or batch) size; :class:`ConfigError` otherwise."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"page size must be at least 1, not {limit!r}")
    return limit


def page_of(
    rows: Sequence[R], limit: int, convert: Callable[[R], T], position: Callable[[R], Cursor]
) -> Page[T]:
    """A page from up to ``limit`` + 1 rows fetched newest first: the first ``limit`` converted
    and, if a further row came, the cursor after them. ``position`` reads the raw stored
    (``created_at``, ``id``) of a row, so no rounding can skip or repeat a row."""
    if len(rows) <= limit:
        return Page(items=[convert(r) for r in rows])
    rows = rows[:limit]
    return Page(items=[convert(r) for r in rows], next_cursor=position(rows[-1]).encode())


def finished_query(query: JobQuery) -> JobQuery:
    """What durations are measured over: completed jobs, unless ``query`` names other final
    states (its non-final states are ignored)."""
    states = (query.states & FINAL_STATES) or frozenset({JobState.SUCCEEDED})
    return query.narrowed(states=states)


def prunable_states(query: JobQuery) -> frozenset[JobState]:
    """The states a prune of ``query`` may delete: its final states (all of them if it names
    none). Empty when it names only unfinished states: pending jobs are never pruned."""
    return (query.states or FINAL_STATES) & FINAL_STATES


def iter_pages(fetch: Callable[[str | None], Page[T]]) -> Iterator[T]:
    """Every item of a paged listing: ``fetch(cursor)`` gives one page, from the first
    (``None``) until a page has no next cursor. Memory holds one page at a time."""
    cursor: str | None = None
    while True:
        page = fetch(cursor)
        yield from page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor
