"""Alembic environment for jobledger's own migrations (run through ``jobledger migrate``)."""

from alembic import context

from jobledger.stores.schema import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
