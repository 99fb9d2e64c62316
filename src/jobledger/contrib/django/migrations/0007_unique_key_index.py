# mypy: disable-error-code="import-untyped"
"""Ledger revision 0007: an index on ``unique_key`` (``jobs --unique-key``)."""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations

from jobledger.contrib.django.migrations import downgrade_ledger_to, upgrade_ledger


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no type hints
    dependencies: ClassVar[list[tuple[str, str]]] = [("jobledger", "0006_unique_keys")]
    operations: ClassVar[list[Any]] = [
        migrations.RunPython(upgrade_ledger, downgrade_ledger_to("0006"), atomic=False),
    ]
