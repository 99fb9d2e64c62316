"""A Django project for the tests: the ledger app and a ``shop`` app whose orders commit or roll
back together with the jobs staged beside them.

Django can be set up once per process, so :func:`setup` takes every database the tests need at
once, as ledger URLs, and sets Django up through ``django_project.settings`` without leaving
``DJANGO_SETTINGS_MODULE`` in the environment.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sqlalchemy import make_url

#: The environment variable ``settings`` reads the databases from (JSON: alias → URL).
DATABASES_ENV = "JOBLEDGER_TEST_DJANGO_DATABASES"

_databases: dict[str, str] | None = None


def django_database(url: str) -> dict[str, Any]:
    """The ``DATABASES`` entry for a ledger URL (sqlite, postgresql, mysql)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": parsed.database}
    entry: dict[str, Any] = {
        "NAME": parsed.database,
        "USER": parsed.username or "",
        "PASSWORD": parsed.password or "",
        "HOST": parsed.host or "",
        "PORT": str(parsed.port or ""),
    }
    if backend == "postgresql":
        return {"ENGINE": "django.db.backends.postgresql", **entry}
    if backend in ("mysql", "mariadb"):
        # utf8mb4: Django's default "utf8" cannot carry every character a job argument may.
        options = {"charset": "utf8mb4", "init_command": "SET sql_mode='STRICT_TRANS_TABLES'"}
        return {"ENGINE": "django.db.backends.mysql", **entry, "OPTIONS": options}
    raise ValueError(f"no Django backend for {url}")


def setup(databases: dict[str, str]) -> None:
    """Set Django up with these databases (alias → ledger URL; one must be ``default``).
    Again with the same databases: nothing to do; with others: an error, since Django's
    settings cannot change once loaded."""
    global _databases
    from django.conf import settings

    if settings.configured:
        if databases != _databases:
            raise RuntimeError(f"Django is already set up with other databases: {_databases}")
        return
    import django

    saved = {key: os.environ.get(key) for key in ("DJANGO_SETTINGS_MODULE", DATABASES_ENV)}
    os.environ["DJANGO_SETTINGS_MODULE"] = "django_project.settings"
    os.environ[DATABASES_ENV] = json.dumps(databases)
    try:
        django.setup()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _databases = dict(databases)
