"""Engines for SQLite and PostgreSQL, with the pragmas, timeouts and transaction modes needed.

SQLite runs in WAL mode with `synchronous=FULL`, so a committed refresh token survives power
loss, and every write transaction starts with `BEGIN IMMEDIATE`, so two writers never both read
a generation and then race to upgrade their locks (which SQLite answers with SQLITE_BUSY
*without* waiting for busy_timeout).

PostgreSQL connections are not pinged before each use (a round trip per transaction): a pooled
connection that a server restart killed fails its first statement, which the caller sees as
StoreUnavailable and retries like any other store failure, and SQLAlchemy then replaces every
connection of the pool made before the failure, so one operation pays for a restart, not one per
connection. Every statement has a server-side `statement_timeout` and `lock_timeout` well
under a refresh's lease, plus a client-side command timeout, so a partition or a stuck lock can
never hold a write past the lease it was made under. `sslmode` in the URL is passed to
asyncpg, which reads it as libpq does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker.config import StoreConfig
from broker.errors import StoreError
from broker.store.sqlite_driver import OneTripDBAPI

BUSY_TIMEOUT_MS = 10_000
WRITE_OPTION = "broker_write"
# PostgreSQL: every statement ends within these (seconds); a refresh's lease is longer.
STATEMENT_TIMEOUT = 10
LOCK_TIMEOUT = 5
CONNECT_TIMEOUT = 5
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


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


def read_password(path: Path) -> str:
    """The database password from `store.password_file` (surrounding whitespace stripped)."""
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise StoreError(f"cannot read store.password_file {path}: {exc.strerror or exc}") from None
    if not value:
        raise StoreError(f"store.password_file {path} is empty")
    return value


def create_engine(
    url: str, *, password_file: Path | None = None, pool_size: int = 10
) -> AsyncEngine:
    """An async engine for the store URL, with each backend's settings wired in."""
    target = make_url(driver_url(url))
    if target.get_backend_name() == "sqlite":
        engine = create_async_engine(target, module=OneTripDBAPI())
        _wire_sqlite(engine)
        return engine
    target, connect_args = _postgresql(target, password_file)
    return create_async_engine(
        target,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=STATEMENT_TIMEOUT,
        connect_args=connect_args,
    )


def _postgresql(url: URL, password_file: Path | None) -> tuple[URL, dict[str, Any]]:
    query = dict(url.query)
    sslmode = query.pop("sslmode", None)
    connect_args: dict[str, Any] = {
        "timeout": CONNECT_TIMEOUT,
        "command_timeout": STATEMENT_TIMEOUT + 5,
        "server_settings": {
            "application_name": "token-broker",
            "statement_timeout": str(STATEMENT_TIMEOUT * 1000),
            "lock_timeout": str(LOCK_TIMEOUT * 1000),
            "idle_in_transaction_session_timeout": str(STATEMENT_TIMEOUT * 3 * 1000),
        },
    }
    if sslmode is not None:
        mode = sslmode if isinstance(sslmode, str) else sslmode[0]
        if mode not in SSL_MODES:
            raise StoreError(f"sslmode={mode!r} in store.url: use one of {', '.join(SSL_MODES)}")
        connect_args["ssl"] = mode  # asyncpg takes libpq's sslmode names here
    if password_file is not None:
        connect_args["password"] = read_password(password_file)
    return url.set(query=query), connect_args


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


def store_engine(store: StoreConfig) -> AsyncEngine:
    """The engine for the `[store]` table: its URL, password file and pool size."""
    return create_engine(store.url, password_file=store.password_file, pool_size=store.pool_size)


def file_probe(url: str) -> Callable[[], object] | None:
    """For a SQLite store in a file: a fingerprint of its files that changes with every commit
    by anyone (the write-ahead log grows or is rewritten, the database file changes when the
    log is checkpointed into it), read with two stat calls and no query. None for other stores.

    The follower reads the change sequence only when the fingerprint moved, so an idle broker
    does not query its store every second. A fingerprint can stay equal across a commit in
    the rare case the log is rewritten to the very same size within one timestamp tick; the
    follower therefore still reads the sequence every few seconds whatever the fingerprint.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    database = Path(parsed.database)
    files = (database, database.with_name(database.name + "-wal"))

    def probe() -> object:
        marks: list[tuple[int, int, int] | None] = []
        for path in files:
            try:
                info = path.stat()
            except OSError:
                marks.append(None)
            else:
                marks.append((info.st_size, info.st_mtime_ns, info.st_ino))
        return tuple(marks)

    return probe


def listener_params(store: StoreConfig) -> tuple[str, dict[str, Any]]:
    """A DSN and keyword arguments for one asyncpg connection of its own (for LISTEN), made as
    the engine's are: same server, credentials, TLS and timeouts."""
    url, connect_args = _postgresql(make_url(store.url), store.password_file)
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return dsn, connect_args
