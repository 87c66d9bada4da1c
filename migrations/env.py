"""Alembic environment: runs on a connection the broker hands over, inside its event loop."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from broker.store.tables import metadata


def run_on(connection: Connection) -> None:
    """Run the migrations on `connection`; batch mode lets SQLite alter tables."""
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
    raise RuntimeError(
        "run migrations with `token-broker db upgrade`, which supplies the store's connection"
    )
run_on(connection)
