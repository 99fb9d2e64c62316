# mypy: disable-error-code="import-untyped"
"""The ledger's tables (jobs, worker instances, locks) and its Alembic version table."""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import migrations

from jobledger.contrib.django.migrations import downgrade_ledger, upgrade_ledger


class Migration(migrations.Migration):  # type: ignore[misc]  # Django ships no type hints
    initial = True
    dependencies: ClassVar[list[tuple[str, str]]] = []
    operations: ClassVar[list[Any]] = [
        # atomic=False: on MariaDB/MySQL, whose DDL cannot be in a transaction, Django would
        # otherwise wrap the operation in one and refuse the DDL; elsewhere the migration's
        # own transaction still holds it.
        migrations.RunPython(upgrade_ledger, downgrade_ledger, atomic=False),
    ]
