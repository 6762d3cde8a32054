"""Alembic's entry point for vivoflow's store: the connection comes from the Store, never a URL in a file."""

from __future__ import annotations

from alembic import context

from workers.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
