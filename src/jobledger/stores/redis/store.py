"""The ledger in Redis: every transition is one Lua script, a compare-and-set on the server.

A job is a hash; each script that moves it also moves its entries in the sorted-set indexes
(:mod:`jobledger.stores.redis.keys`), so counts per state and a queue's lag are read from
those alone, and a listing pages through an index instead of the whole ledger. Every time is
the server's ``TIME``, taken inside the script that stamps it.

What a query costs: a listing walks the ``order`` index of the states it names (of every job if
none) newest first, :data:`SCAN_BATCH` entries per script call, and the server tests each
entry's filters (a literal ``match`` too: ``string.find`` on the stored JSON), so only matches
travel and the client holds one batch. A call holds the server for about one batch's worth of
``HMGET`` (~1 ms for 500 jobs with small arguments). A regular expression is Python's ``re``,
tested in the client on the arguments of each candidate, one batch at a time. RediSearch is
not used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import itertools
import json
import secrets
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from redis import exceptions as redis_errors
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from jobledger.config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_STATEMENT_TIMEOUT
from jobledger.errors import SchemaMissing, StoreError, StoreUnavailable, UniqueKeyHeld
from jobledger.model import DurationStats, Instance, JobRecord, JobState, QueueStats
from jobledger.query import (
    Cursor,
    JobQuery,
    Page,
    check_page_size,
    finished_query,
    match_needles,
    page_of,
    prunable_states,
)
from jobledger.stores.base import (
    ANY,
    DEFAULT_LEASE,
    LEASE_PREFIX,
    DurationKind,
    LeasedBatch,
    StagedBatch,
    Store,
    Transition,
    _Sentinel,
    holding,
)
from jobledger.stores.redis import connect
from jobledger.stores.redis.keys import HEAD_LENGTH, Keys, order_member
from jobledger.stores.redis.scripts import Scripts
from jobledger.stores.rows import (
    HISTORY_INPUTS,
    creation_row,
    duration_start,
    history_after,
    history_event,
    instance_beat_values,
    instance_from_row,
    record_from_row,
    row_test,
    stats_by_name,
    text_test,
    transition_values,
)

#: Index entries one scan call examines (the server is busy that long; see the docstring).
SCAN_BATCH = 500
#: Seconds an instance's key outlives its last heartbeat: a silent instance stays listed (and
#: dead) this long, far past any heartbeat TTL, then its key expires.
DEFAULT_INSTANCE_EXPIRY = 7 * 24 * 3600.0
#: How often a move that appends history reads its inputs again after another move changed them.
_HISTORY_TRIES = 5
#: The layout the scripts of this version read and write (``P:meta`` ``schema``).
SCHEMA = "1"
#: The oldest server the scripts run on (``ZRANGE … BYLEX REV``, ``SET … NX PX`` in scripts).
MINIMUM_VERSION = (6, 2)

_TIMES = frozenset(
    {
        "created_at",
        "staged_at",
        "first_queued_at",
        "queued_at",
        "started_at",
        "finished_at",
        "recovered_at",
        "updated_at",
        "heartbeat_at",
    }
)
_INTEGERS = frozenset({"attempts", "recoveries", "restarts", "generation", "pid"})
_JOB_FIELDS = [
    *("id", "system", "name", "queue", "args", "kwargs", "tags", "options", "state", "owner"),
    *("attempts", "recoveries", "restarts", "generation", "recent_recoveries", "error"),
    *("history", "unique_key", "unique_hold"),
    *sorted(_TIMES - {"heartbeat_at"}),
]
T = TypeVar("T")


class _Now:
    """Stands for "the server's clock" in a row built for a script."""


class _Op:
    """Stands for a field's own value plus one (``i``) or, where it has none, the moment
    (``e``): what the transition script computes from the stored job."""

    def __init__(self, code: str) -> None:
        self.code = code


_NOW = _Now()


class RedisStore(Store):
    """The ledger in Redis 6.2+ or Valkey, reached with redis-py.

    ``url``: ``redis://``, ``rediss://``, ``redis+sentinel://`` or ``redis+cluster://`` (see
    :mod:`jobledger.stores.redis.connect`); its ``prefix`` option names the hash tag of the
    ledger's keys (``{jobledger}``). ``client`` replaces the client the URL would make (a
    ``RedisCluster``, for instance). ``statement_timeout`` bounds each command's wait for an
    answer (past it the call raises :class:`StoreUnavailable`, as for an outage).
    """

    def __init__(
        self,
        url: str,
        *,
        auto_migrate: bool = False,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
        prefix: str | None = None,
        instance_expiry: float = DEFAULT_INSTANCE_EXPIRY,
        client: connect.Client | None = None,
    ) -> None:
        target = connect.parse(url)
        self._safe_url = target.safe_url
        self.keys = Keys(prefix or target.prefix)
        self.auto_migrate = auto_migrate
        self.instance_expiry = instance_expiry
        self._connect = functools.partial(
            connect.connect, target, connect_timeout=connect_timeout, timeout=statement_timeout
        )
        self._made: tuple[connect.Client, Scripts] | None = None
        if client is not None:
            self._made = (client, Scripts(client))
        self._made_lock = threading.Lock()
        self._ready_lock = threading.Lock()
        self._checked = False
        self._ledger_id: str | None = None

    def __repr__(self) -> str:
        return f"RedisStore({self.safe_url!r}, prefix={self.keys.prefix!r})"

    def _connected(self) -> tuple[connect.Client, Scripts]:
        """The client and its scripts, made on first use: a cluster client connects as it is
        made, and a ledger that is down when a process starts must not stop the process
        (invariant 7), only fail its calls with :class:`StoreUnavailable` until it is back."""
        if self._made is None:
            with self._made_lock:
                if self._made is None:
                    try:
                        client = self._connect()
                    except RedisClusterException as exc:
                        raise StoreUnavailable(
                            f"the ledger Redis at {self.safe_url} is unavailable: "
                            f"{_first_line(exc)}"
                        ) from exc
                    self._made = (client, Scripts(client))
        return self._made

    @property
    def client(self) -> connect.Client:
        """The redis-py client (a ``RedisCluster`` for a ``redis+cluster://`` URL)."""
        return self._connected()[0]

    @property
    def _scripts(self) -> Scripts:
        return self._connected()[1]

    @property
    def safe_url(self) -> str:
        return self._safe_url

    @property
    def database(self) -> str:
        """Where the ledger is, as the outbox compares it with a caller's transaction: never
        a SQL database's, so staging in a SQL transaction is refused (the job would be
        written where no relay looks)."""
        return f"Redis at {self.safe_url} (staging in a transaction needs a SQL ledger)"

    # -- connection and schema -------------------------------------------------------------
    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        """redis-py's errors as jobledger's: unreachable or too slow → :class:`StoreUnavailable`."""
        try:
            yield
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            raise StoreUnavailable(
                f"the ledger Redis at {self.safe_url} is unavailable: {_first_line(exc)}"
            ) from exc
        except redis_errors.RedisError as exc:
            raise StoreError(f"ledger call failed on {self.safe_url}: {_first_line(exc)}") from exc

    def _ready(self) -> None:
        if self._checked:
            return
        with self._ready_lock:
            if self._checked:
                return
            with self._translate():
                found = self.client.hget(self.keys.meta, "schema")
            if found is None and self.auto_migrate:
                self.migrate()
            elif found is None:
                raise SchemaMissing(
                    f"no jobledger ledger under {self.keys.prefix} in {self.safe_url}; run "
                    "`jobledger migrate` (or set JOBLEDGER_AUTO_MIGRATE=true)"
                )
            elif found != SCHEMA:
                raise SchemaMissing(
                    f"the ledger in {self.safe_url} has layout {found!r}, this jobledger needs "
                    f"{SCHEMA}: upgrade jobledger if a newer one wrote it"
                )
            self._checked = True

    def _run(self, name: str, keys: list[str], args: Iterable[Any]) -> Any:
        """Run a script; one that names no key of its own is given ``P:meta``, so a cluster
        client sends it to the node that holds the ledger's slot."""
        self._ready()
        with self._translate():
            return self._scripts.run(name, keys or [self.keys.meta], [self.keys.prefix, *args])

    def migrate(self) -> None:
        """Check the server and write the ledger's metadata (idempotent)."""
        self.migrate_report()

    def migrate_report(self) -> str:
        with self._translate():
            info = self.client.info("server")
            version = str(info.get("redis_version", "0"))
            if _version(version) < MINIMUM_VERSION:
                raise StoreError(
                    f"the Redis at {self.safe_url} is version {version}; jobledger needs "
                    f"{'.'.join(map(str, MINIMUM_VERSION))} or newer (or Valkey)"
                )
            self.client.hsetnx(self.keys.meta, "ledger_id", secrets.token_hex(16))
            self.client.hset(self.keys.meta, "schema", SCHEMA)
        self._checked = True
        server = f"Valkey {info['valkey_version']}" if "valkey_version" in info else version
        return (
            f"server {server}; a scan on the server, {SCAN_BATCH} jobs of the states asked "
            "for per call (no RediSearch index)"
        )

    def ledger_id(self) -> str:
        """This ledger's id, written by ``migrate``."""
        if self._ledger_id is None:
            self._ready()
            with self._translate():
                self._ledger_id = str(self.client.hget(self.keys.meta, "ledger_id"))
        return self._ledger_id

    def close(self) -> None:
        if self._made is not None:
            self._made[0].close()

    def now(self) -> float:
        with self._translate():
            seconds, micros = self.client.time()
        return float(seconds) + micros / 1_000_000

    # -- jobs ------------------------------------------------------------------------------
    def create(self, record: JobRecord) -> bool:
        created = self._run("create", [self.keys.job(record.id)], _creation_args(record))
        if isinstance(created, list):  # [holder]: the unique key is held
            raise UniqueKeyHeld(str(record.unique_key), _text(created[0]))
        return bool(created)

    def create_many(self, records: Iterable[JobRecord], *, chunk: int = 1000) -> int:
        """:meth:`create` of many records, ``chunk`` per round trip (one script call each, so
        each is as atomic as one ``create``; a held unique key creates nothing); how many were
        created. For loading a ledger (an import, a benchmark), where a round trip per job is
        most of the cost."""
        self._ready()
        created = 0
        for part in _chunks(records, chunk):
            calls = [([self.keys.job(r.id)], _creation_args(r)) for r in part]
            created += sum(won == 1 for won in self._run_many("create", calls))
        return created

    def _run_many(self, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """Script ``name`` once per ``(keys, args)``, in one round trip on one server. A
        cluster client's pipeline refuses scripts (redis-py), so there each call is a round
        trip of its own: as atomic, slower."""
        self._ready()
        with self._translate():
            if isinstance(self.client, RedisCluster):
                return [self._scripts.run(name, k, [self.keys.prefix, *a]) for k, a in calls]
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                self._scripts.run(name, keys, [self.keys.prefix, *args], pipe)
            return list(pipe.execute())

    def get(self, job_id: str) -> JobRecord | None:
        self._ready()
        with self._translate():
            found: dict[str, str] = self.client.hgetall(self.keys.job(job_id))  # type: ignore[assignment]
        return record_from_row(_job_row(found)) if found else None

    def transition(self, job_id: str, change: Transition) -> bool:
        if history_event(change) is None:  # the hot path: one script call
            return self._transition(job_id, change, []) == 1
        # A move that appends history: read its inputs, write the entry guarded by them, and
        # read again if another move changed them meanwhile.
        for _ in range(_HISTORY_TRIES):
            self._ready()
            with self._translate():
                found: list[str | None] = self.client.hmget(  # type: ignore[assignment]
                    self.keys.job(job_id), HISTORY_INPUTS
                )
            if found[0] is None:
                return False
            read = dict(zip(HISTORY_INPUTS, found, strict=True))
            at = self.now() if change.at is None else float(change.at)
            moved = dataclasses.replace(change, at=at)
            entry = history_after(_typed(_present(read), HISTORY_INPUTS), moved, at)
            guards = [part for n in HISTORY_INPUTS for part in (n, "g", read[n] or "")]
            won = self._transition(job_id, moved, [*guards, "history", "s", entry])
            if won != 2:
                return won == 1
        raise StoreError(f"job {job_id} kept changing while its history was written")

    def _transition(self, job_id: str, change: Transition, extra: list[str]) -> int:
        """The transition script: 1 won, 0 lost, 2 a guard in ``extra`` did not hold."""
        at: object = _NOW
        values = transition_values(
            change, at, increment=lambda _: _Op("i"), if_empty=lambda _: _Op("e")
        )
        ops: list[str] = [*extra]
        for name, value in values.items():
            if value is _NOW:
                ops += [name, "n", ""]
            elif isinstance(value, _Op):
                ops += [name, value.code, ""]
            elif value is None:
                ops += [name, "d", ""]
            else:
                ops += [name, "s", _text(value)]
        moment = "" if change.at is None else repr(float(change.at))
        compare = _compare(change.expect, change.expect_owner, change.expect_generation)
        args = [job_id, *compare, moment, *ops]
        return int(self._run("transition", [self.keys.job(job_id)], args))

    def delete(
        self,
        job_id: str,
        expect: frozenset[JobState],
        expect_owner: str | _Sentinel | None = ANY,
        expect_generation: int | None = None,
    ) -> bool:
        compare = _compare(expect, expect_owner, expect_generation)
        return bool(self._run("delete", [self.keys.job(job_id)], [job_id, *compare]))

    def query(self, query: JobQuery, *, limit: int, cursor: str | None = None) -> Page[JobRecord]:
        rows = self._page(query, limit, cursor)
        return page_of(rows, limit, record_from_row, _position)

    def count(self, query: JobQuery) -> int:
        states = sorted(s.value for s in (query.states or JobState))
        others = (
            *(query.queues, query.names, query.systems, query.ids, query.owners),
            *(query.unique_keys, query.match),
            query.recovered,
        )
        if any(others):
            return sum(1 for _ in self._members(query, None))
        self._ready()
        with self._translate():
            if query.older_than is None and query.newer_than is None:
                counts = self._pipelined(lambda p, s: p.zcard(self.keys.state(s)), states)
            else:
                now = self.now()
                low = "-inf" if query.newer_than is None else f"({now - query.newer_than!r}"
                high = "+inf" if query.older_than is None else repr(now - query.older_than)
                counts = self._pipelined(
                    lambda p, s: p.zcount(self.keys.state(s), low, high), states
                )
        return sum(int(n) for n in counts)

    def queue_stats(self) -> list[QueueStats]:
        states = [s.value for s in JobState]
        found = self._run("queue_stats", [], states)
        now = float(found[0])
        stats: list[QueueStats] = []
        step = 1 + 2 * len(states)
        for at in range(1, len(found), step):
            queue, values = found[at], found[at + 1 : at + step]
            counts: dict[JobState, int] = {}
            oldest: dict[str, float | None] = {}
            for i, state in enumerate(states):
                count, first = int(values[2 * i]), values[2 * i + 1]
                if count:
                    counts[JobState(state)] = count
                oldest[state] = None if first == "" else max(0.0, now - float(first))
            if counts:
                staged, queued = JobState.STAGED.value, JobState.QUEUED.value
                stats.append(QueueStats(queue, counts, oldest[queued], oldest[staged], now))
        return sorted(stats, key=lambda s: s.queue)

    def durations(
        self, query: JobQuery, kind: DurationKind, *, limit: int, cursor: str | None = None
    ) -> Page[tuple[JobRecord, float]]:
        start = duration_start(kind)
        rows = self._page(finished_query(query), limit, cursor, (start, "finished_at"))
        return page_of(
            rows, limit, lambda r: (record_from_row(r), r["finished_at"] - r[start]), _position
        )

    def duration_stats(self, query: JobQuery, kind: DurationKind) -> list[DurationStats]:
        start = duration_start(kind)
        wanted = ("name", start, "finished_at")
        members = self._members(finished_query(query), None, wanted[1:])
        by_name: dict[str, list[float]] = {}
        for chunk in _chunks(members, SCAN_BATCH):
            with self._translate():
                found = self._pipelined(
                    lambda p, m: p.hmget(self.keys.job(m[HEAD_LENGTH:]), wanted), chunk
                )
            for name, began, finished in found:
                if name is not None and began is not None and finished is not None:
                    by_name.setdefault(name, []).append(float(finished) - float(began))
        return stats_by_name(by_name)

    def prune(self, query: JobQuery, *, batch_size: int = 1000) -> int:
        check_page_size(batch_size)
        states = prunable_states(query)
        if not states:
            return 0
        narrowed = query.narrowed(states=states)
        compare = _compare(states, ANY, None)
        removed = 0
        while True:
            batch = [
                m[HEAD_LENGTH:] for m in itertools.islice(self._members(narrowed, None), batch_size)
            ]
            calls = [([self.keys.job(job_id)], [job_id, *compare]) for job_id in batch]
            removed += sum(int(won) for won in self._run_many("delete", calls))
            if len(batch) < batch_size:
                return removed

    # -- the outbox ------------------------------------------------------------------------
    @contextlib.contextmanager
    def staged_batch(
        self,
        *,
        limit: int,
        older_than: float = 0.0,
        ids: Collection[str] | None = None,
        systems: Collection[str] | None = None,
        lease: float = DEFAULT_LEASE,
    ) -> Iterator[StagedBatch]:
        check_page_size(limit)
        token = f"{LEASE_PREFIX}{secrets.token_hex(8)}"
        records: list[JobRecord] = []
        if ids is None or ids:
            chosen = sorted(ids) if ids is not None else []
            only = "" if systems is None else json.dumps(sorted(systems))
            args = [token, limit, repr(float(older_than)), repr(float(lease)), only, *chosen]
            rows = self._run("lease", [], args)
            records = [record_from_row(_job_row(_pairs(row))) for row in rows]
        with holding(records, functools.partial(self._end_lease, token)) as batch:
            yield batch

    def _end_lease(self, token: str, batch: LeasedBatch) -> None:
        """The published jobs → queued, the refused → failed, the others free again."""
        for job_id, change in batch.moves(token):
            self.transition(job_id, change)
        if batch.records:
            self._run("release", [], [token, *(r.id for r in batch.records)])

    # -- instances -------------------------------------------------------------------------
    def heartbeat(self, instance: Instance) -> None:
        beat = [part for item in instance_beat_values(instance).items() for part in item]
        first = [instance.name, instance.nonce, instance.hostname, str(instance.pid)]
        expiry = str(max(1, round(self.instance_expiry * 1000)))
        self._run("beat", [self.keys.instance(instance.id)], [instance.id, expiry, *first, *beat])

    def deregister(self, instance_id: str) -> bool:
        self._ready()
        with self._translate():
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.keys.instance(instance_id))
            pipe.zrem(self.keys.beats, instance_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def instances(self, ttl: float) -> list[Instance]:
        now, *rows = self._run("instances", [], [])
        found = [_instance_row(_pairs(row)) for row in rows]
        found.sort(key=lambda r: (r["name"], r["started_at"]))
        return [instance_from_row(r, float(now) - r["heartbeat_at"], ttl) for r in found]

    def is_alive(self, instance_id: str, ttl: float) -> bool:
        return bool(self._run("alive", [], [instance_id, repr(float(ttl))]))

    def orphans(self, ttl: float, *, limit: int = 1000) -> list[JobRecord]:
        rows = self._run("orphans", [], [repr(float(ttl)), limit])
        return [record_from_row(_job_row(_pairs(row))) for row in rows if row]

    # -- locks -----------------------------------------------------------------------------
    def acquire_lock(self, name: str, token: str, ttl: float) -> bool:
        millis = max(1, round(ttl * 1000))
        return bool(self._run("lock", [self.keys.lock(name)], [token, millis]))

    def release_lock(self, name: str, token: str) -> bool:
        return bool(self._run("unlock", [self.keys.lock(name)], [token]))

    # -- selection -------------------------------------------------------------------------
    def _page(
        self, query: JobQuery, limit: int, cursor: str | None, has: tuple[str, ...] = ()
    ) -> list[dict[str, Any]]:
        """``limit`` + 1 rows newest first after ``cursor`` (the extra row says: more follow)."""
        check_page_size(limit)
        after = None if cursor is None else Cursor.decode(cursor)
        members = list(itertools.islice(self._members(query, after, has), limit + 1))
        rows = self._rows(m[HEAD_LENGTH:] for m in members)
        return [row for row in rows if row is not None]

    def _rows(self, job_ids: Iterable[str]) -> list[dict[str, Any] | None]:
        """The rows of these jobs, in order (None for one deleted meanwhile)."""
        self._ready()
        with self._translate():
            found = self._pipelined(lambda p, i: p.hgetall(self.keys.job(i)), list(job_ids))
        return [_job_row(h) if h else None for h in found]

    def _members(
        self, query: JobQuery, after: Cursor | None, has: tuple[str, ...] = ()
    ) -> Iterator[str]:
        """The ``order`` members of the jobs ``query`` selects, newest first, after ``after``:
        lazily, a batch at a time."""
        if query.ids:
            yield from self._picked(query, after, has)
            return
        start = "+" if after is None else f"({order_member(after.created_at, after.id)}"
        spec = _filter_spec(query, has)
        needles = [] if query.match is None or query.regex else match_needles(query.match)
        sources = [self.keys.order(s.value) for s in sorted(query.states)] or [self.keys.order()]
        walks = [self._walk(index, start, spec, needles) for index in sources]
        members = walks[0] if len(walks) == 1 else heapq.merge(*walks, reverse=True)
        test = text_test(query.match, True) if query.regex else None
        if test is None:
            yield from members
            return
        for chunk in _chunks(members, SCAN_BATCH):
            with self._translate():
                texts = self._pipelined(
                    lambda p, m: p.hmget(
                        self.keys.job(m[HEAD_LENGTH:]), ("args", "kwargs", "tags")
                    ),
                    chunk,
                )
            yield from (
                m for m, t in zip(chunk, texts, strict=True) if any(x and test(x) for x in t)
            )

    def _walk(self, index: str, start: str, spec: str, needles: list[str]) -> Iterator[str]:
        while True:
            last, *found = self._run("scan", [index], [start, SCAN_BATCH, spec, *needles])
            yield from found
            if not last:
                return
            start = f"({last}"

    def _picked(self, query: JobQuery, after: Cursor | None, has: tuple[str, ...]) -> Iterator[str]:
        """:meth:`_members` of a query that lists ids: those jobs' rows, tested here."""
        test = row_test(query, self.now())
        rows = [r for r in self._rows(sorted(query.ids)) if r is not None and test(r)]
        members = sorted(
            (
                order_member(r["created_at"], r["id"])
                for r in rows
                if all(r[name] is not None for name in has)
            ),
            reverse=True,
        )
        bound = None if after is None else order_member(after.created_at, after.id)
        yield from (m for m in members if bound is None or m < bound)

    def _pipelined(self, command: Callable[[Any, Any], object], items: Iterable[Any]) -> list[Any]:
        """``command(pipe, item)`` for each item in one round trip; the answers in order."""
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            command(pipe, item)
        return list(pipe.execute())


def _creation_args(record: JobRecord) -> list[str]:
    """The create script's arguments: the id, the times the server stamps, the other fields."""
    row = creation_row(record, _NOW)
    stamped = [name for name, value in row.items() if value is _NOW]
    pairs = [
        part
        for name, value in row.items()
        if value is not None and value is not _NOW
        for part in (name, _text(value))
    ]
    return [record.id, ",".join(stamped), *pairs]


def _compare(
    expect: frozenset[JobState], owner: str | _Sentinel | None, generation: int | None
) -> list[str]:
    """The compare of compare-and-set as the scripts read it (``expected`` in common.lua)."""
    states = "," + ",".join(sorted(s.value for s in expect)) + ","
    who = "*" if owner is ANY else "" if owner is None else f"={owner}"
    return [states, who, "" if generation is None else str(generation)]


def _filter_spec(query: JobQuery, has: tuple[str, ...]) -> str:
    spec: dict[str, Any] = {}
    for label, values in (
        ("queues", query.queues),
        ("names", query.names),
        ("systems", query.systems),
        ("owners", query.owners),
        ("unique_keys", query.unique_keys),
    ):
        if values:
            spec[label] = sorted(values)
    if query.older_than is not None:
        spec["older"] = query.older_than
    if query.newer_than is not None:
        spec["newer"] = query.newer_than
    if query.recovered:
        spec["recovered"] = True
    if has:
        spec["has"] = list(has)
    return json.dumps(spec)


def _text(value: object) -> str:
    """A row value as the hash keeps it (a float as its exact ``repr``)."""
    return repr(value) if isinstance(value, float) else str(value)


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _typed(found: Mapping[str, str], names: Iterable[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(names)
    for name, value in found.items():
        if name in _TIMES:
            row[name] = float(value)
        elif name in _INTEGERS:
            row[name] = int(value)
        else:
            row[name] = value
    return row


def _present(found: Mapping[str, str | None]) -> dict[str, str]:
    return {name: value for name, value in found.items() if value is not None}


def _job_row(found: Mapping[str, str]) -> dict[str, Any]:
    return _typed(found, _JOB_FIELDS)


def _instance_row(found: Mapping[str, str]) -> dict[str, Any]:
    return _typed(found, ())


def _position(row: Mapping[str, Any]) -> Cursor:
    return Cursor(float(row["created_at"]), row["id"])


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
