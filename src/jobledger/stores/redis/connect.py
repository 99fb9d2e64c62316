"""A redis-py client from a ledger URL: ``redis://``, ``rediss://`` (TLS),
``redis+sentinel://`` / ``rediss+sentinel://`` (the master a set of Sentinels names), and
``redis+cluster://`` / ``rediss+cluster://`` (a Redis Cluster).

``redis+sentinel://[user:password@]host[:port][,host[:port]…]/service_name[/db]``: the hosts are
the Sentinels (port 26379 unless given), the credentials and the TLS choice are the master's.
``redis+cluster://[user:password@]host[:port][,host[:port]…][/0]``: the hosts are nodes to
learn the cluster's layout from (port 6379 unless given); a cluster has database 0 only.
redis-py reads every other query option of a URL (``socket_keepalive``, ``ssl_cert_reqs``…);
``prefix`` is jobledger's (the hash tag of the ledger's keys, see
:mod:`jobledger.stores.redis.keys`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.sentinel import Sentinel

from jobledger.errors import ConfigError
from jobledger.stores.redis.keys import DEFAULT_PREFIX

SCHEMES = (
    "redis",
    "rediss",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)
SENTINEL_PORT = 26379
REDIS_PORT = 6379
#: What :func:`connect` gives: one server's client (standalone, or the master Sentinels name)
#: or a cluster's.
Client = redis.Redis | RedisCluster


@dataclass(frozen=True)
class Target:
    """What a ledger URL names: the client options, the Sentinels or the cluster's nodes if
    any, the key prefix."""

    scheme: str
    options: dict[str, Any]
    sentinels: tuple[tuple[str, int], ...]
    service: str
    prefix: str
    safe_url: str
    cluster_nodes: tuple[tuple[str, int], ...] = ()


def parse(url: str) -> Target:
    """Read a Redis ledger URL; :class:`ConfigError` saying what is wrong with it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"not a Redis URL: {_hide(url)!r}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    prefix = query.pop("prefix", DEFAULT_PREFIX) or DEFAULT_PREFIX
    tls = scheme.startswith("rediss")
    sentinels: tuple[tuple[str, int], ...] = ()
    service = ""
    netloc, path = parts.netloc, parts.path
    cluster_nodes: tuple[tuple[str, int], ...] = ()
    if scheme.endswith("+cluster"):
        userinfo, _, hosts = netloc.rpartition("@")
        cluster_nodes = tuple(_host_port(h, url, REDIS_PORT) for h in hosts.split(",") if h)
        if not cluster_nodes or path.strip("/") not in ("", "0"):
            raise ConfigError(
                f"malformed Redis Cluster URL {_hide(url)!r}: expected "
                "redis+cluster://[user:password@]host[:port][,host[:port]...][/0] "
                "(a cluster has database 0 only)"
            )
        netloc = f"{userinfo}@localhost" if userinfo else "localhost"
        path = ""
    elif scheme.endswith("+sentinel"):
        userinfo, _, hosts = netloc.rpartition("@")
        sentinels = tuple(_host_port(h, url, SENTINEL_PORT) for h in hosts.split(",") if h)
        segments = [s for s in path.split("/") if s]
        if not sentinels or not segments or len(segments) > 2:
            raise ConfigError(
                f"malformed Sentinel URL {_hide(url)!r}: expected "
                "redis+sentinel://[user:password@]host[:port][,host[:port]...]/service_name[/db]"
            )
        service = segments[0]
        netloc = f"{userinfo}@localhost" if userinfo else "localhost"
        path = f"/{segments[1]}" if len(segments) == 2 else ""
    plain = urlunsplit(("rediss" if tls else "redis", netloc, path, urlencode(query), ""))
    try:
        options = parse_url(plain)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"malformed Redis URL {_hide(url)!r}: {exc}") from None
    return Target(scheme, options, sentinels, service, prefix, _hide(url), cluster_nodes)


def connect(target: Target, *, connect_timeout: float, timeout: float) -> Client:
    """A client for ``target`` whose connects and commands give up after the timeouts (a
    ledger that does not answer must not hold a publish or a worker: invariant 7)."""
    options = {
        **target.options,
        "decode_responses": True,
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": timeout,
        "health_check_interval": 30,
    }
    if target.cluster_nodes:
        for where in ("host", "port", "db"):
            options.pop(where, None)
        nodes = [ClusterNode(host, port) for host, port in target.cluster_nodes]  # type: ignore[no-untyped-call]
        return RedisCluster(startup_nodes=nodes, **_without_pool_keys(options))
    if not target.sentinels:
        return redis.Redis(**_without_pool_keys(options))
    sentinel_options = {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout}
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call, unused-ignore]
    # redis-py types Sentinel from 8.2 on; the ignores stay for the older releases we allow
    client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        target.service, **_without_pool_keys(options)
    )
    return client


def _without_pool_keys(options: dict[str, Any]) -> dict[str, Any]:
    """parse_url's options as ``redis.Redis`` keywords (it names TLS by a connection class)."""
    found = dict(options)
    connection_class = found.pop("connection_class", None)
    if connection_class is not None and connection_class is redis.SSLConnection:
        found["ssl"] = True
    return found


def _host_port(text: str, url: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ConfigError(f"malformed address {text!r} in {_hide(url)!r}") from None


def _hide(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
