"""Alembic, driven from inside the running event loop on the store's own engine."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import broker
from broker.errors import StoreError
from broker.store.engine import writer

MIGRATION_LOCK = 0x746B6272  # an advisory lock key of this application's own ("tkbr")


def script_location() -> Path:
    """Where the migration scripts are: inside the wheel, or at the top of a source checkout."""
    package = Path(broker.__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError(f"migration scripts not found next to {package}; reinstall token-broker")


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    return config


def head_revision() -> str | None:
    """The newest revision the scripts know."""
    return ScriptDirectory.from_config(_config()).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at; None when it was never migrated."""

    def read(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def upgrade(engine: AsyncEngine, target: str = "head") -> tuple[str | None, str | None]:
    """Migrate the store to `target` in one write transaction; returns (before, after)."""
    config = _config()

    def run(conn: Connection) -> str | None:
        before = MigrationContext.configure(conn).get_current_revision()
        config.attributes["connection"] = conn
        command.upgrade(config, target)
        return before

    async with writer(engine).begin() as conn:
        if engine.dialect.name == "postgresql":
            # Brokers of a fleet starting at once migrate one after another, each seeing the
            # revision the one before it left (SQLite's BEGIN IMMEDIATE does this by itself).
            await conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        before = await conn.run_sync(run)
    return before, head_revision() if target == "head" else target


async def require_current(engine: AsyncEngine) -> None:
    """Raise with what to run unless the database is at the head revision."""
    current, head = await current_revision(engine), head_revision()
    if current != head:
        raise StoreError(
            f"the store is at revision {current or 'none'} but this version needs {head}; "
            "run `token-broker db upgrade`"
        )
