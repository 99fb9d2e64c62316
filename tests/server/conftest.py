"""Fixtures of the supervisor tests: an app over a real ledger, PostgreSQL (this test session's
own database) and Redis (a prefix of its own), with a recording integration for the ``http``
system."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobledger.config import Settings
from jobledger.integrations.base import Registry
from jobledger.server import create_app
from jobledger.stores.base import Store
from ledgerdb import database_url, discard_store, empty_store

from .recording import RecordingIntegration

# Starlette's TestClient wants httpx2 in its newest releases; httpx still works.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from fastapi.testclient import TestClient

TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.fixture(params=["postgresql", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(str(request.param), tmp_path)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    the_store = empty_store(store_url)
    yield the_store
    discard_store(the_store)


@pytest.fixture
def recorder() -> RecordingIntegration:
    return RecordingIntegration()


@pytest.fixture
def registry(recorder: RecordingIntegration) -> Registry:
    found = Registry()
    found.register(recorder)
    return found


AppFactory = Callable[..., TestClient]


@pytest.fixture
def make_client(store_url: str, store: Store, registry: Registry) -> Iterator[AppFactory]:
    """Build a TestClient over the test ledger; keyword arguments become Settings fields
    (``maintenance`` and ``integrations`` go to ``create_app``)."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        maintenance = overrides.pop("maintenance", False)
        integrations = overrides.pop("integrations", registry)
        settings = Settings(database_url=store_url, **overrides)
        app = create_app(settings, store=store, integrations=integrations, maintenance=maintenance)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: AppFactory) -> TestClient:
    return make_client()


@pytest.fixture
def auth_client(make_client: AppFactory) -> TestClient:
    return make_client(api_token=TOKEN)


BEARER = {"Authorization": f"Bearer {TOKEN}"}
