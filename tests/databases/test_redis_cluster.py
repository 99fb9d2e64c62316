"""The Redis store on a real Redis Cluster (three masters on private ports, started here): the
shipped Store contract, unchanged, through a ``redis+cluster://`` URL. Every key of a ledger
shares one hash tag, so each script and pipeline touches one slot and the cluster client
sends it to the node that holds that slot."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from e2e.celery.services import free_port
from jobledger.errors import ConfigError, StoreUnavailable
from jobledger.model import JobRecord
from jobledger.stores import Store, open_store
from jobledger.stores.redis import RedisStore
from jobledger.stores.redis.connect import parse
from jobledger.testing import wait_for
from jobledger.testing.contract import StoreContract
from ledgerdb import discard_store

MASTERS = 3


def _cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=60
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three cluster-enabled redis-servers (no persistence), joined with ``redis-cli --cluster
    create``; the URL naming two of them (the client learns the rest)."""
    root = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(MASTERS)]
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node = root / str(port)
            node.mkdir()
            cmd = [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", str(node / "nodes.conf"), "--dir", str(node),
                "--save", "", "--appendonly", "no", "--logfile", str(node / "server.log"),
            ]  # fmt: skip
            servers.append(subprocess.Popen(cmd, start_new_session=True))
        wait_for("the nodes to answer", lambda: all("PONG" in _cli(p, "ping") for p in ports))
        created = _cli(
            ports[0], "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"
        )
        assert "All 16384 slots covered" in created, created
        wait_for(
            "every node to see the cluster ok",
            lambda: all("cluster_state:ok" in _cli(p, "cluster", "info") for p in ports),
            timeout=60,
        )
        yield f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    finally:
        for server in servers:
            server.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(10)


class TestStoreContractOnACluster(StoreContract):
    @pytest.fixture
    def store(self, cluster: str) -> Iterator[Store]:  # type: ignore[override]
        opened = open_store(f"{cluster}?prefix=jl-test-{uuid.uuid4().hex[:12]}")
        opened.migrate()
        yield opened
        discard_store(opened)


def test_a_ledger_lives_on_one_node_of_the_cluster(cluster: str) -> None:
    store = open_store(f"{cluster}?prefix=one-slot", auto_migrate=True)
    assert isinstance(store, RedisStore)
    for n in range(20):
        assert store.create(JobRecord(id=f"job-{n}", name="t", queue=f"q{n % 3}"))
    holders = {
        str(store.client.get_node_from_key(key))  # type: ignore[union-attr]
        for key in store.client.scan_iter(store.keys.pattern, count=1000)
    }
    assert len(holders) == 1
    discard_store(store)


def test_cluster_urls() -> None:
    target = parse("rediss+cluster://u:pw@n1,n2:7001/0?prefix=shop")
    assert target.cluster_nodes == (("n1", 6379), ("n2", 7001))
    assert target.prefix == "shop" and target.options["username"] == "u"
    assert "pw" not in target.safe_url
    with pytest.raises(ConfigError, match="database 0 only"):
        parse("redis+cluster://n1:7000/2")
    store = open_store("redis+cluster://127.0.0.1:1", connect_timeout=0.2)  # made lazily
    with pytest.raises(StoreUnavailable, match="unavailable"):
        store.get("a")
    store.close()
