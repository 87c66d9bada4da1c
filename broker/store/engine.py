"""Engines for SQLite and PostgreSQL, with the pragmas and transaction modes rotation needs.

SQLite runs in WAL mode with `synchronous=FULL`, so a committed refresh token survives power
loss, and every write transaction starts with `BEGIN IMMEDIATE`, so two writers never both read
a generation and then race to upgrade their locks (which SQLite answers with SQLITE_BUSY
*without* waiting for busy_timeout).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker.errors import StoreError

BUSY_TIMEOUT_MS = 10_000
WRITE_OPTION = "broker_write"


def driver_url(url: str) -> str:
    """The SQLAlchemy URL with the async driver for a `sqlite:` or `postgresql:` store URL."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise StoreError(
        f"unsupported store URL scheme {parsed.drivername!r}: use sqlite or postgresql"
    )


def create_engine(url: str) -> AsyncEngine:
    """An async engine for the store URL, with SQLite's pragmas and BEGIN modes wired in."""
    engine = create_async_engine(driver_url(url), pool_pre_ping=False)
    if engine.dialect.name == "sqlite":
        _wire_sqlite(engine)
    return engine


def writer(engine: AsyncEngine) -> AsyncEngine:
    """The same engine, marked so its transactions begin as write transactions."""
    return engine.execution_options(**{WRITE_OPTION: True})


def _wire_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the driver so the "begin" hook below chooses the mode.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
