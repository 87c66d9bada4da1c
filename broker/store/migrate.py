"""Alembic, driven from inside the running event loop on the store's own engine.

Alembic is imported only when a store has to be migrated or inspected: a daemon starting on a
current store reads the revision with one query and compares it with `HEAD` (tests hold `HEAD`
equal to the newest script's revision), which keeps ~0.1 s and a few MiB out of every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

import broker
from broker.errors import StoreError
from broker.store.engine import writer

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATION_LOCK = 0x746B6272  # an advisory lock key of this application's own ("tkbr")
HEAD = "0006"  # the newest revision in migrations/versions; a test keeps the two equal


def script_location() -> Path:
    """Where the migration scripts are: inside the wheel, or at the top of a source checkout."""
    package = Path(broker.__file__).resolve().parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError(f"migration scripts not found next to {package}; reinstall token-broker")


def _config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(script_location()))
    return config


def head_revision() -> str | None:
    """The newest revision the scripts know."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config()).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at; None when it was never migrated."""

    def read(conn: Connection) -> str | None:
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def _at_head(engine: AsyncEngine) -> bool:
    """Whether the store is already at `HEAD`, asked without Alembic (False when unsure)."""
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except DBAPIError:  # never migrated: no such table
        return False
    return [row[0] for row in rows] == [HEAD]


async def upgrade(engine: AsyncEngine, target: str = "head") -> tuple[str | None, str | None]:
    """Migrate the store to `target` in one write transaction; returns (before, after)."""
    if target == "head" and await _at_head(engine):
        return HEAD, HEAD
    from alembic import command
    from alembic.runtime.migration import MigrationContext

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
