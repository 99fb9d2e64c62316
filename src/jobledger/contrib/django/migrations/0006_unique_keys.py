# mypy: disable-error-code="import-untyped"
"""Ledger revision 0006: unique keys (``unique_key``, and ``unique_hold`` with its index)."""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations

from jobledger.contrib.django.migrations import downgrade_ledger_to, upgrade_ledger


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no type hints
    dependencies: ClassVar[list[tuple[str, str]]] = [("jobledger", "0005_seed_jobs_are_sidekiq")]
    operations: ClassVar[list[Any]] = [
        migrations.RunPython(upgrade_ledger, downgrade_ledger_to("0005"), atomic=False),
    ]
