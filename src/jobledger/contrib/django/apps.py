# mypy: disable-error-code="import-untyped"
"""The Django app: it has no models, only the migrations that create the ledger's tables."""

from __future__ import annotations

from django.apps import AppConfig


class JobLedgerConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    name = "jobledger.contrib.django"
    label = "jobledger"
    verbose_name = "Job ledger"
