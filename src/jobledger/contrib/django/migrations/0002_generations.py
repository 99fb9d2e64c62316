# mypy: disable-error-code="import-untyped"
"""Ledger revision 0002: fencing generations, windowed recoveries, instance holdings."""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations

from jobledger.contrib.django.migrations import downgrade_ledger_to, upgrade_ledger


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no type hints
    dependencies: ClassVar[list[tuple[str, str]]] = [("jobledger", "0001_initial")]
    operations: ClassVar[list[Any]] = [
        migrations.RunPython(upgrade_ledger, downgrade_ledger_to("0001"), atomic=False),
    ]
