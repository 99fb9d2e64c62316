"""``open_store`` picks the store by the URL's scheme, and says which schemes it knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobledger.errors import ConfigError, UnknownStoreScheme
from jobledger.stores import open_store
from jobledger.stores.redis import RedisStore
from jobledger.stores.redis.connect import parse
from jobledger.stores.sql import SQLStore


def test_sql_schemes_open_the_sql_store(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert isinstance(store, SQLStore)
    for url in ("postgresql://u@h/db", "postgres://u@h/db", "postgresql+psycopg://u@h/db"):
        found = open_store(url)
        assert isinstance(found, SQLStore) and found.url.get_backend_name() == "postgresql"
    assert isinstance(open_store("mysql://root@h/db"), SQLStore)
    assert isinstance(open_store("mariadb://root@h/db"), SQLStore)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0",
        "rediss://user:pw@127.0.0.1:1/2",
        "REDIS://127.0.0.1:1",
        "redis+sentinel://127.0.0.1:1,127.0.0.2/mymaster/3",
    ],
)
def test_redis_schemes_open_the_redis_store(url: str) -> None:
    store = open_store(url, connect_timeout=0.2)  # connects lazily: no server needed here
    assert isinstance(store, RedisStore)
    assert "pw" not in repr(store)


@pytest.mark.parametrize("url", ["mongodb://h/db", "jobledger.db", "http://u:secret@h/x", ""])
def test_an_unknown_scheme_names_the_known_ones(url: str) -> None:
    with pytest.raises(UnknownStoreScheme) as raised:
        open_store(url)
    message = str(raised.value)
    assert isinstance(raised.value, ConfigError) and "\n" not in message
    assert "sqlite://" in message and "redis://" in message and "redis+sentinel://" in message
    assert "secret" not in message


def test_redis_url_options() -> None:
    plain = parse("redis://:pw@10.0.0.1:6380/4?prefix=shop&socket_keepalive=true")
    assert (plain.options["host"], plain.options["port"], plain.options["db"]) == (
        "10.0.0.1",
        6380,
        4,
    )
    assert plain.prefix == "shop" and plain.options["password"] == "pw"
    assert plain.safe_url == "redis://:***@10.0.0.1:6380/4?prefix=shop&socket_keepalive=true"
    sentinel = parse("rediss+sentinel://u:pw@s1,s2:5000/primary/2")
    assert sentinel.sentinels == (("s1", 26379), ("s2", 5000))
    assert (sentinel.service, sentinel.options["db"]) == ("primary", 2)
    assert sentinel.options["username"] == "u"
    with pytest.raises(ConfigError, match="service_name"):
        parse("redis+sentinel://s1:26379")
