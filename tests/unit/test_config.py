"""Settings and durations: every JOBLEDGER_* variable read, and a bad one named."""

from __future__ import annotations

import dataclasses
import math
import socket

import pytest

from jobledger.config import Settings, parse_duration
from jobledger.errors import ConfigError
from jobledger.heartbeat import new_instance
from jobledger.model import OrphanPolicy


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        (" 90s ", 90.0),
        ("500ms", 0.5),
        ("15m", 900.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1.5h", 5400.0),
        ("3d", 259200.0),
        ("2w", 1209600.0),
        ("10S", 10.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "   ", "-5", "-1h", "5x", "h", "1h-30m", "abc", "nan", "inf", "-inf", "1e999", -1, True],
)
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)  # type: ignore[arg-type]


#: A value for every JOBLEDGER_* variable, and what the field must become.
EVERY_VARIABLE: dict[str, tuple[str, object]] = {
    "database_url": ("postgresql://u@db/ledger", "postgresql://u@db/ledger"),
    "auto_migrate": ("yes", True),
    "connect_timeout": ("3s", 3.0),
    "statement_timeout": ("1500ms", 1.5),
    "synchronous_publish": ("false", False),
    "instance_name": ("worker-7", "worker-7"),
    "heartbeat_interval": ("5s", 5.0),
    "heartbeat_ttl": ("1m", 60.0),
    "recovery_interval": ("2m", 120.0),
    "max_recoveries": ("5", 5),
    "recovery_window": ("2h", 7200.0),
    "keep_succeeded": ("1d", 86400.0),
    "keep_failed": ("30d", 30 * 86400.0),
    "api_token": ("a-long-enough-secret-token", "a-long-enough-secret-token"),
    "open_reads": ("on", True),
    "server_host": ("0.0.0.0", "0.0.0.0"),
    "server_port": ("9000", 9000),
    "max_body_bytes": ("2048", 2048),
    "prune_interval": ("10m", 600.0),
    "relay": ("off", False),
    "relay_interval": ("2s", 2.0),
    "relay_grace": ("500ms", 0.5),
    "relay_batch_size": ("250", 250),
    "relay_max_backoff": ("1m", 60.0),
    "relay_lease": ("90s", 90.0),
    "stage_in_atomic": ("true", True),
    "journal_dir": ("/var/lib/worker/journal", "/var/lib/worker/journal"),
    "journal_limit": ("500", 500),
    "on_orphan": ("Fail", OrphanPolicy.FAIL),
    "sidekiq_redis_url": ("redis://cache:6379/3", "redis://cache:6379/3"),
    "sidekiq_namespace": ("myapp", "myapp"),
    "sidekiq_process_ttl": ("30s", 30.0),
}


def test_from_env_reads_every_variable() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert names <= set(EVERY_VARIABLE), f"no test value for {sorted(names - set(EVERY_VARIABLE))}"
    environ = {
        f"JOBLEDGER_{name.upper()}": raw
        for name, (raw, _) in EVERY_VARIABLE.items()
        if name in names
    }
    settings = Settings.from_env(environ)
    for name in names:
        assert getattr(settings, name) == EVERY_VARIABLE[name][1], name
    assert settings.ttl == 60.0


def test_from_env_defaults_and_overrides() -> None:
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite:///jobledger.db"
    assert settings.auto_migrate is False
    assert settings.ttl == 3 * settings.heartbeat_interval
    assert settings.keep_failed is None
    blank = Settings.from_env({"JOBLEDGER_HEARTBEAT_TTL": "  ", "JOBLEDGER_KEEP_FAILED": ""})
    assert blank.heartbeat_ttl is None and blank.keep_failed is None
    environ = {"JOBLEDGER_HEARTBEAT_INTERVAL": "20", "JOBLEDGER_INSTANCE_NAME": "env"}
    overridden = Settings.from_env(environ, instance_name="code", heartbeat_ttl=None)
    assert (overridden.instance_name, overridden.heartbeat_interval) == ("code", 20.0)
    assert overridden.replace(max_recoveries=0).max_recoveries == 0


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("JOBLEDGER_HEARTBEAT_INTERVAL", "soon", "JOBLEDGER_HEARTBEAT_INTERVAL"),
        ("JOBLEDGER_HEARTBEAT_INTERVAL", "0", "JOBLEDGER_HEARTBEAT_INTERVAL"),
        ("JOBLEDGER_HEARTBEAT_INTERVAL", "-3", "JOBLEDGER_HEARTBEAT_INTERVAL"),
        ("JOBLEDGER_HEARTBEAT_TTL", "10s", "JOBLEDGER_HEARTBEAT_TTL"),  # not above the interval
        ("JOBLEDGER_RECOVERY_INTERVAL", "0s", "JOBLEDGER_RECOVERY_INTERVAL"),
        ("JOBLEDGER_STATEMENT_TIMEOUT", "0", "JOBLEDGER_STATEMENT_TIMEOUT"),
        ("JOBLEDGER_STATEMENT_TIMEOUT", "later", "JOBLEDGER_STATEMENT_TIMEOUT"),
        ("JOBLEDGER_RECOVERY_WINDOW", "forever", "JOBLEDGER_RECOVERY_WINDOW"),
        ("JOBLEDGER_MAX_RECOVERIES", "three", "JOBLEDGER_MAX_RECOVERIES"),
        ("JOBLEDGER_MAX_RECOVERIES", "-1", "JOBLEDGER_MAX_RECOVERIES"),
        ("JOBLEDGER_AUTO_MIGRATE", "maybe", "JOBLEDGER_AUTO_MIGRATE"),
        ("JOBLEDGER_KEEP_SUCCEEDED", "-1d", "JOBLEDGER_KEEP_SUCCEEDED"),
        ("JOBLEDGER_KEEP_FAILED", "x", "JOBLEDGER_KEEP_FAILED"),
        ("JOBLEDGER_INSTANCE_NAME", "a:b", "JOBLEDGER_INSTANCE_NAME"),
        ("JOBLEDGER_INSTANCE_NAME", "n" * 201, "JOBLEDGER_INSTANCE_NAME"),
        ("JOBLEDGER_JOURNAL_LIMIT", "0", "JOBLEDGER_JOURNAL_LIMIT"),
        ("JOBLEDGER_JOURNAL_LIMIT", "many", "JOBLEDGER_JOURNAL_LIMIT"),
        ("JOBLEDGER_ON_ORPHAN", "retry", "JOBLEDGER_ON_ORPHAN"),
    ],
)
def test_a_bad_variable_is_named(variable: str, value: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env({variable: value})


def test_validation_in_code() -> None:
    with pytest.raises(ConfigError, match="JOBLEDGER_DATABASE_URL"):
        Settings(database_url="  ")
    with pytest.raises(ConfigError, match="JOBLEDGER_HEARTBEAT_TTL"):
        Settings(heartbeat_interval=10, heartbeat_ttl=10)
    with pytest.raises(ConfigError, match="JOBLEDGER_KEEP_FAILED"):
        Settings(keep_failed=-1)
    with pytest.raises(ConfigError, match="JOBLEDGER_JOURNAL_DIR"):
        Settings(journal_dir=" ")
    with pytest.raises(ConfigError, match="JOBLEDGER_HEARTBEAT_INTERVAL"):
        Settings(heartbeat_interval=math.nan)
    assert Settings(heartbeat_interval=2).ttl == 6


def test_the_instance_name_is_the_queues_worker_name_unless_set() -> None:
    """Celery's ``a@vm`` names the instance, so a person matches the two; the setting wins;
    a name that cannot be one (ids are name:nonce) falls back to the host name."""
    host = socket.gethostname()
    assert Settings().name_of_instance("a@vm") == "a@vm"
    assert Settings().name_of_instance(None) == host
    assert Settings().name_of_instance("odd:name") == host
    assert Settings(instance_name="pod-7").name_of_instance("a@vm") == "pod-7"
    first, second = (new_instance(Settings(), name="a@vm") for _ in range(2))
    assert first.name == second.name == "a@vm" and first.id != second.id  # a restart is new
