"""Alembic environment: runs on the connection that blogchat hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from blogchat.store.tables import metadata


def run_migrations(connection: Connection) -> None:
    """Apply migrations on an open connection (SQLite needs batch mode for ALTERs)."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `blogchat db upgrade`, which provides a connection")
run_migrations(connection)
