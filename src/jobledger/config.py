"""Settings: one object, read from ``JOBLEDGER_*`` environment variables, overridable in code.

Every field has a named default and is validated when the object is built, so a bad value fails
at start-up with a line naming the variable, not later inside a worker.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from jobledger.errors import ConfigError
from jobledger.model import OrphanPolicy

DEFAULT_DATABASE_URL = "sqlite:///jobledger.db"
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_STATEMENT_TIMEOUT = 5.0
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_RECOVERY_INTERVAL = 30.0
DEFAULT_MAX_RECOVERIES = 3
DEFAULT_RECOVERY_WINDOW = 3600.0
DEFAULT_KEEP_SUCCEEDED = 7 * 86400.0
DEFAULT_SERVER_HOST = "127.0.0.1"
DEFAULT_SERVER_PORT = 8000
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_PRUNE_INTERVAL = 3600.0
DEFAULT_RELAY_INTERVAL = 1.0
DEFAULT_RELAY_GRACE = 5.0
DEFAULT_RELAY_BATCH_SIZE = 500
DEFAULT_RELAY_MAX_BACKOFF = 30.0
DEFAULT_RELAY_LEASE = 60.0
DEFAULT_JOURNAL_DIR = ".jobledger"
DEFAULT_JOURNAL_LIMIT = 10_000
DEFAULT_SIDEKIQ_PROCESS_TTL = 20.0
#: Sidekiq lets a process's heartbeat hash expire 60 s after its last beat, and its own clean-up
#: then drops the process from ``processes``: a death must be judged before that.
SIDEKIQ_BEAT_EXPIRY = 60.0
#: The shortest API token accepted: it is the only secret between the network and the ledger.
API_TOKEN_MIN_LENGTH = 16
ENV_PREFIX = "JOBLEDGER_"

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``90s``, ``1h30m``, ``3d``, ``500ms``; :class:`ConfigError` for a
    negative, empty or unreadable duration."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().lower()
        if raw.startswith("-"):
            raise ConfigError(f"a duration must be zero or more seconds, not {text!r}")
        try:
            value = float(raw)
        except ValueError:
            parts = _DURATION.findall(raw)
            if not raw or "".join(n + u for n, u in parts) != raw.replace(" ", ""):
                raise ConfigError(
                    f"unreadable duration {text!r}: use seconds or e.g. 90s, 15m, 1h30m, 3d"
                ) from None
            value = sum(float(n) * _UNITS[u] for n, u in parts)
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"a duration must be zero or more seconds, not {text!r}")
    return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"expected true or false, not {text!r}")


@dataclass(frozen=True)
class Settings:
    """jobledger's settings. Build with :meth:`from_env` to read ``JOBLEDGER_*`` variables;
    keyword arguments given there (or here) win over the environment."""

    #: ``JOBLEDGER_DATABASE_URL``: the ledger database (SQLite file by default, no server).
    database_url: str = DEFAULT_DATABASE_URL
    #: ``JOBLEDGER_AUTO_MIGRATE``: apply the ledger's migrations on first use (default off:
    #: ``jobledger migrate`` is the deliberate step).
    auto_migrate: bool = False
    #: ``JOBLEDGER_CONNECT_TIMEOUT``: how long connecting to a ledger server may take before the
    #: ledger counts as down (5s), so a silent host cannot hold up an enqueue.
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: ``JOBLEDGER_STATEMENT_TIMEOUT``: how long one ledger statement may take, waiting for a
    #: lock included, before the ledger counts as down (5s): a host that accepts the connection
    #: and then hangs cannot hold up an enqueue or a worker. Migrations run without it.
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    #: ``JOBLEDGER_SYNCHRONOUS_PUBLISH``: whether the ``queued`` record written when a job is
    #: published waits for PostgreSQL to flush it to disk before the publish goes on (default
    #: on). Off, that one write commits with ``synchronous_commit = off``: about a WAL flush
    #: less per publish, and a PostgreSQL crash may forget the records of the last moments'
    #: publishes (at most 3 x ``wal_writer_delay``, 0.6 s by default; the database stays
    #: consistent). Such a job is still run, and its claim writes the record again; what is
    #: given up is the record of a job whose message the broker also lost in that moment.
    #: Claims, outcomes, staging and every other write stay durable. Other databases ignore it.
    synchronous_publish: bool = True
    #: ``JOBLEDGER_INSTANCE_NAME``: the stable part of an instance id (unset: the queue's own
    #: worker name, Celery's ``a@vm``, else the host name; on Kubernetes the pod name is a good
    #: choice). See :meth:`name_of_instance`.
    instance_name: str | None = None
    #: ``JOBLEDGER_HEARTBEAT_INTERVAL``: seconds between an instance's heartbeats (10).
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    #: ``JOBLEDGER_HEARTBEAT_TTL``: silence after which an instance is dead (3 x interval).
    heartbeat_ttl: float | None = None
    #: ``JOBLEDGER_RECOVERY_INTERVAL``: seconds between orphan sweeps (30).
    recovery_interval: float = DEFAULT_RECOVERY_INTERVAL
    #: ``JOBLEDGER_MAX_RECOVERIES``: recoveries within the window before a job is ``dead`` (3).
    max_recoveries: int = DEFAULT_MAX_RECOVERIES
    #: ``JOBLEDGER_RECOVERY_WINDOW``: the window the recovery cap counts in (1h).
    recovery_window: float = DEFAULT_RECOVERY_WINDOW
    #: ``JOBLEDGER_KEEP_SUCCEEDED``: how long ``prune`` keeps succeeded and cancelled jobs (7d);
    #: 0 deletes them at once.
    keep_succeeded: float = DEFAULT_KEEP_SUCCEEDED
    #: ``JOBLEDGER_KEEP_FAILED``: how long ``prune`` keeps failed and dead jobs (unset: until a
    #: person acts on them).
    keep_failed: float | None = None
    #: ``JOBLEDGER_API_TOKEN``: the supervisor's secret. Set, every write needs
    #: ``Authorization: Bearer <token>`` and the dashboard a login; unset, ``jobledger serve``
    #: listens on loopback only.
    api_token: str | None = field(default=None, repr=False)
    #: ``JOBLEDGER_OPEN_READS``: with a token set, let anyone read the API and the dashboard
    #: (writes still need the token). Default off.
    open_reads: bool = False
    #: ``JOBLEDGER_SERVER_HOST``: the address ``jobledger serve`` binds (127.0.0.1).
    server_host: str = DEFAULT_SERVER_HOST
    #: ``JOBLEDGER_SERVER_PORT``: the port ``jobledger serve`` binds (8000).
    server_port: int = DEFAULT_SERVER_PORT
    #: ``JOBLEDGER_MAX_BODY_BYTES``: the largest request body the supervisor reads (1 MiB).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: ``JOBLEDGER_PRUNE_INTERVAL``: seconds between the supervisor's prune runs (1h).
    prune_interval: float = DEFAULT_PRUNE_INTERVAL
    #: ``JOBLEDGER_RELAY``: run the outbox relay as a thread in every worker (default on; it
    #: costs one indexed query per interval while nothing is staged).
    relay: bool = True
    #: ``JOBLEDGER_RELAY_INTERVAL``: seconds between the relay's looks for staged jobs (1s).
    relay_interval: float = DEFAULT_RELAY_INTERVAL
    #: ``JOBLEDGER_RELAY_GRACE``: how old a staged job must be before the relay publishes it
    #: (5s): the fast path's time to publish it right after the commit. Shorter means less delay
    #: after a crash, and more chance of a duplicate publish while a fast path is slow.
    relay_grace: float = DEFAULT_RELAY_GRACE
    #: ``JOBLEDGER_RELAY_BATCH_SIZE``: staged jobs a relay holds and publishes at once (500).
    relay_batch_size: int = DEFAULT_RELAY_BATCH_SIZE
    #: ``JOBLEDGER_RELAY_MAX_BACKOFF``: the longest wait between relay tries while the broker
    #: is down (30s); waits grow from the interval, with jitter.
    relay_max_backoff: float = DEFAULT_RELAY_MAX_BACKOFF
    #: ``JOBLEDGER_RELAY_LEASE``: how long a relay batch holds the staged jobs it took (60s);
    #: a relay that died mid-batch leaves them to the others after this long.
    relay_lease: float = DEFAULT_RELAY_LEASE
    #: ``JOBLEDGER_STAGE_IN_ATOMIC``: stage every tracked task's ``delay``/``apply_async``
    #: called inside an open Django ``transaction.atomic`` block instead of publishing it (the
    #: job then commits with the block); a task declared ``staged=False`` opts out. Default off.
    stage_in_atomic: bool = False
    #: ``JOBLEDGER_JOURNAL_DIR``: where a worker keeps the ledger writes it could not make
    #: (ledger down) until they are replayed: one SQLite journal per instance name, shared by
    #: the worker's processes (default ``.jobledger`` in the worker's working directory). A
    #: worker replays its own name's journal at start and any journal there whose worker is
    #: gone; on Kubernetes an ``emptyDir`` survives a container restart, not the pod.
    journal_dir: str = DEFAULT_JOURNAL_DIR
    #: ``JOBLEDGER_JOURNAL_LIMIT``: the most writes a journal keeps (10000); past it the oldest
    #: is dropped, logged and counted (its job is recovered and run again once its owner stops).
    journal_limit: int = DEFAULT_JOURNAL_LIMIT
    #: ``JOBLEDGER_ON_ORPHAN``: what a tracked job whose worker died while it ran becomes when
    #: its task does not say (``@app.task(on_orphan=...)``, an RQ job's ``meta``): ``requeue``
    #: (default, run it again), ``fail`` (failed with the reason, for a person) or ``discard``
    #: (cancelled with the reason). Recorded with each job at publish.
    on_orphan: OrphanPolicy = OrphanPolicy.REQUEUE
    #: ``JOBLEDGER_SIDEKIQ_REDIS_URL``: the Redis of a Sidekiq app (unset: no Sidekiq). Set,
    #: restarts publish Sidekiq jobs there and the supervisor watches its processes' heartbeats.
    sidekiq_redis_url: str | None = field(default=None, repr=False)
    #: ``JOBLEDGER_SIDEKIQ_NAMESPACE``: the redis-namespace prefix of the Sidekiq app's keys
    #: (unset: none), as in ``Redis::Namespace.new("myapp", ...)``.
    sidekiq_namespace: str | None = None
    #: ``JOBLEDGER_SIDEKIQ_PROCESS_TTL``: how long a Sidekiq process's ``beat`` may stay
    #: unchanged before it counts as dead and its jobs are pushed back (20s: Sidekiq 6 beats
    #: every 5 s, Sidekiq 7 every 10 s). Under 60 s, Sidekiq's own expiry of a silent process.
    sidekiq_process_ttl: float = DEFAULT_SIDEKIQ_PROCESS_TTL

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "on_orphan", OrphanPolicy.parse(self.on_orphan))
        except ConfigError as exc:
            raise ConfigError(f"JOBLEDGER_ON_ORPHAN: {exc}") from None
        if not isinstance(self.database_url, str) or not self.database_url.strip():
            raise ConfigError("JOBLEDGER_DATABASE_URL must not be empty")
        if self.instance_name is not None:
            problem = _instance_name_problem(self.instance_name)
            if problem:
                raise ConfigError(f"JOBLEDGER_INSTANCE_NAME {problem}")
        for name in (
            "connect_timeout",
            "statement_timeout",
            "heartbeat_interval",
            "recovery_interval",
            "recovery_window",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_env(name)} must be more than zero seconds")
        if self.heartbeat_ttl is not None and self.heartbeat_ttl <= self.heartbeat_interval:
            raise ConfigError(
                f"JOBLEDGER_HEARTBEAT_TTL ({self.heartbeat_ttl}s) must be longer than "
                f"JOBLEDGER_HEARTBEAT_INTERVAL ({self.heartbeat_interval}s)"
            )
        if not isinstance(self.journal_dir, str) or not self.journal_dir.strip():
            raise ConfigError("JOBLEDGER_JOURNAL_DIR must not be empty")
        if self.journal_limit < 1:
            raise ConfigError(
                f"JOBLEDGER_JOURNAL_LIMIT must be 1 or more, not {self.journal_limit}"
            )
        if self.max_recoveries < 0:
            raise ConfigError("JOBLEDGER_MAX_RECOVERIES must be zero or more")
        for name in ("keep_succeeded", "keep_failed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{_env(name)} must be zero or more seconds")
        self._check_server()
        self._check_sidekiq()

    def _check_sidekiq(self) -> None:
        url = self.sidekiq_redis_url
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                "JOBLEDGER_SIDEKIQ_REDIS_URL must be a redis://, rediss:// or unix:// URL"
            )
        if self.sidekiq_namespace is not None and (
            not self.sidekiq_namespace or ":" in self.sidekiq_namespace
        ):
            raise ConfigError(
                "JOBLEDGER_SIDEKIQ_NAMESPACE must be the namespace without ':' (myapp, not myapp:)"
            )
        if not 0 < self.sidekiq_process_ttl < SIDEKIQ_BEAT_EXPIRY:
            raise ConfigError(
                "JOBLEDGER_SIDEKIQ_PROCESS_TTL must be more than zero and under 60 seconds "
                "(Sidekiq forgets a silent process after 60 s)"
            )

    def _check_server(self) -> None:
        if self.api_token is not None and (
            len(self.api_token) < API_TOKEN_MIN_LENGTH or not self.api_token.isprintable()
        ):
            raise ConfigError(
                f"JOBLEDGER_API_TOKEN must be at least {API_TOKEN_MIN_LENGTH} printable characters"
            )
        if not self.server_host or any(c.isspace() for c in self.server_host):
            raise ConfigError("JOBLEDGER_SERVER_HOST must be a host name or address")
        if not 0 <= self.server_port <= 65535:
            raise ConfigError(f"JOBLEDGER_SERVER_PORT must be 0-65535, not {self.server_port}")
        if self.max_body_bytes < 1024:
            raise ConfigError("JOBLEDGER_MAX_BODY_BYTES must be at least 1024")
        if not self.prune_interval > 0:
            raise ConfigError("JOBLEDGER_PRUNE_INTERVAL must be more than zero seconds")
        self._check_relay()

    def _check_relay(self) -> None:
        for name in ("relay_interval", "relay_max_backoff", "relay_lease"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_env(name)} must be more than zero seconds")
        if self.relay_grace < 0:
            raise ConfigError("JOBLEDGER_RELAY_GRACE must be zero or more seconds")
        if not 1 <= self.relay_batch_size <= 10_000:
            raise ConfigError(
                f"JOBLEDGER_RELAY_BATCH_SIZE must be 1-10000, not {self.relay_batch_size}"
            )
        if self.relay_max_backoff < self.relay_interval:
            raise ConfigError(
                f"JOBLEDGER_RELAY_MAX_BACKOFF ({self.relay_max_backoff}s) must be at least "
                f"JOBLEDGER_RELAY_INTERVAL ({self.relay_interval}s)"
            )

    @property
    def ttl(self) -> float:
        """The heartbeat TTL in force: the set one, or 3 x the interval (invariant 5)."""
        return self.heartbeat_ttl if self.heartbeat_ttl is not None else 3 * self.heartbeat_interval

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``JOBLEDGER_*`` variables in ``environ`` (default ``os.environ``), with
        ``overrides`` (None values ignored) taking precedence."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(_env(f.name))
            if raw is not None and raw.strip() != "":
                values[f.name] = _convert(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def name_of_instance(self, worker_name: str | None = None) -> str:
        """The stable part of this process's instance id: the setting if given, else the
        queue's own name for the worker (so a person matches ``a@vm`` in both tools), else
        the host name. A worker name that cannot be one (a ``:``) falls back to the host name.
        Each boot adds a fresh nonce to it (:func:`jobledger.heartbeat.new_instance`)."""
        if self.instance_name is not None:
            return self.instance_name
        if worker_name and not _instance_name_problem(worker_name):
            return worker_name
        return socket.gethostname()


def _instance_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an instance name (ids are ``name:nonce``), or None."""
    if not name or len(name) > 200 or ":" in name:
        return f"must be 1-200 characters without ':', not {name!r}"
    if name == "relay":  # relay:… is a staged job's lease
        return "must not be 'relay' (reserved)"
    return None


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _convert(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = str(f.type)
    try:
        if "bool" in kind:
            return _parse_bool(raw)
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return parse_duration(raw)
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"{_env(f.name)}={raw!r}: {exc}") from None
    return raw.strip()
