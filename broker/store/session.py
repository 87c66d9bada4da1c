"""Read and write transactions on the store, with the database's failures translated.

Everything the repositories do goes through `Database.read()` or `Database.write()`, so that
a database that cannot be reached, drops a connection, times out or is locked surfaces as one
retryable `StoreUnavailable` (the callers decide what to retry; ROTATION.md invariant 7), and
no driver exception, whose text may quote a statement's parameters, travels further up.
Writes begin IMMEDIATE on SQLite (see broker.store.engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Interval,
    Table,
    bindparam,
    func,
    insert,
    literal,
    select,
    text,
    type_coerce,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.errors import StoreError, StoreUnavailable
from broker.store.engine import writer
from broker.store.tables import UTCDateTime, grant_changes, grants

# The PostgreSQL channel every grant change is announced on; payload "GRANT_ID VERSION".
CHANNEL = "token_broker_grants"

_NOTIFY_ALL = text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p")

# The driver's own words are kept only for errors about the connection or a lock, which name
# no values ("database is locked", "connection was closed in the middle of operation").
_REASON_CHARS = 160


class Database:
    """One engine, its writer twin, error translation for both, and the store's clock.

    Time in statements (ROTATION.md invariant 9): on PostgreSQL, leases, intents, heartbeats and
    change stamps are the database server's `clock_timestamp()`, whatever the caller's clock
    says, so the brokers of a fleet agree on them however their own clocks drift. SQLite lives
    on one host, whose clock every process shares; there the caller's `now` is used.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._writer = writer(engine)
        self.server_clock = engine.dialect.name == "postgresql"
        # Reads on PostgreSQL need no transaction of their own (each statement sees committed
        # data, as it would inside READ COMMITTED): no BEGIN and ROLLBACK round trips.
        self._reader = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if self.server_clock else engine
        )
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
        # SQLite's busy handler (for up to 100 ms at a go) before it looks again. This
        # process's own write transactions queue here instead, and each starts the moment the
        # previous one commits; only other processes' writes are waited for by busy_timeout.
        self._one_writer = None if self.server_clock else _one_writer(engine)

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return str(self.engine.dialect.name)

    def now(self, now: datetime) -> ColumnElement[datetime]:
        """The store's "now" in a statement: the server's clock, or `now` on SQLite."""
        if self.server_clock:
            return func.clock_timestamp()
        return literal(now, UTCDateTime)

    def shifted(self, now: datetime, delta: timedelta) -> ColumnElement[datetime]:
        """The store's "now" plus `delta` (negative: minus) in a statement."""
        if self.server_clock:
            return func.clock_timestamp() + literal(delta, Interval)
        return literal(now + delta, UTCDateTime)

    def clock_values(self, now: datetime, **shifts: timedelta) -> dict[str, Any]:
        """The parameters of a statement built once with `clock_now` and `clock_shifted`:
        on SQLite `now` and each `now + shift` under its name, on PostgreSQL the shifts."""
        if self.server_clock:
            return dict(shifts)
        return {_STORE_NOW: now, **{name: now + delta for name, delta in shifts.items()}}

    async def notify(self, conn: AsyncConnection, payloads: Iterable[str]) -> None:
        """Announce changes to the other brokers (PostgreSQL NOTIFY, delivered at commit).

        A payload names a grant and a version, never a token. On SQLite the others follow the
        change sequence by polling, and this does nothing.
        """
        if not self.server_clock:
            return
        batch = list(payloads)
        if batch:  # one statement for them all
            await conn.execute(_NOTIFY_ALL, {"channel": CHANNEL, "payloads": batch})

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads."""
        async with translated(), self._reader.connect() as conn:
            yield conn

    async def writer_free(self) -> None:
        """Return when this process's write transactions queued before now have ended (SQLite,
        whose writes take turns; at once on PostgreSQL). A batch of writes gathered after
        this takes in everything that queued up meanwhile."""
        if self._one_writer is not None and self._one_writer.locked():
            async with self._one_writer:
                pass

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed when the block ends without an error."""
        async with contextlib.AsyncExitStack() as stack:
            if self._one_writer is not None:
                await stack.enter_async_context(self._one_writer)
            async with translated(), self._writer.begin() as conn:
                yield conn


_WRITERS: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()


def _one_writer(engine: AsyncEngine) -> asyncio.Lock:
    """The lock this process's SQLite write transactions on `engine` queue on (one per
    database, shared by every repository on it)."""
    key = engine.sync_engine
    lock = _WRITERS.get(key)
    if lock is None:
        lock = _WRITERS[key] = asyncio.Lock()
    return lock


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn the driver's and the pool's failures into StoreUnavailable or StoreError."""
    try:
        yield
    except IntegrityError:
        raise  # a constraint the caller knows how to read (a duplicate, a lost race)
    except DBAPIError as exc:
        raise _translate(exc) from None
    except PoolTimeout:
        raise StoreUnavailable("no database connection became free in time") from None
    except (OSError, TimeoutError) as exc:
        raise StoreUnavailable(f"the database cannot be reached: {type(exc).__name__}") from None


def _translate(exc: DBAPIError) -> StoreError:
    original = exc.orig
    name = type(original).__name__ if original is not None else type(exc).__name__
    connection_level = exc.connection_invalidated or _is_connection_error(exc)
    if connection_level:
        reason = " ".join(str(original).split())[:_REASON_CHARS] if original is not None else ""
        detail = f"{name}: {reason}" if reason else name
        return StoreUnavailable(f"the database did not complete the operation ({detail})")
    return StoreError(f"the database refused the operation ({name})")


def _is_connection_error(exc: DBAPIError) -> bool:
    """Whether the failure is the connection's or a lock's, not the statement's."""
    kind = type(exc).__name__
    if kind in ("OperationalError", "InterfaceError"):
        return True
    original = exc.orig
    # asyncpg's errors reach SQLAlchemy wrapped; their SQLSTATE class says what they are:
    # 08 connection exception, 53 insufficient resources, 57 operator intervention (a server
    # shutting down, a statement timeout or cancel), 40 a serialization failure or deadlock.
    sqlstate = getattr(original, "sqlstate", None) or getattr(original, "pgcode", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in ("08", "53", "57", "40")


_STORE_NOW = "store_now"


def clock_now(server_clock: bool) -> ColumnElement[datetime]:
    """`Database.now` in a statement built once, for every call: the server's clock, or a
    parameter (`Database.clock_values` gives its value)."""
    if server_clock:
        return func.clock_timestamp()
    return bindparam(_STORE_NOW, type_=UTCDateTime)


def clock_shifted(server_clock: bool, name: str) -> ColumnElement[datetime]:
    """`Database.shifted` in a statement built once: the shift is the parameter `name`."""
    if server_clock:
        return func.clock_timestamp() + bindparam(name, type_=Interval)
    return bindparam(name, type_=UTCDateTime)


_TAKE_VERSIONS = (
    update(grant_changes)
    .where(grant_changes.c.id == 1)
    .values(seq=grant_changes.c.seq + bindparam("take_count", type_=Integer))
    .returning(grant_changes.c.seq)
)


async def take_versions(conn: AsyncConnection, count: int = 1) -> int:
    """Take `count` values of the change sequence inside `conn`'s write transaction; the last.

    The counter row stays locked until the transaction ends, so values are handed out in
    commit order: a follower that has seen version v never later finds a new write below v.
    Every writer takes it after its other writes, just before the commit, so the lock that
    orders every write of every broker is held as briefly as can be (and, taken last by all,
    never waited for while holding it in the other order).
    """
    result = await conn.execute(_TAKE_VERSIONS, {"take_count": count})
    return int(result.scalar_one())


_STAMP_ONE = (
    update(grants)
    .where(grants.c.id == bindparam("stamp_id"))
    .values(version=bindparam("stamp_version"))
)
_STAMP_MANY = _STAMP_ONE.values(updated_at=bindparam("stamp_at", type_=UTCDateTime))
# One row: stamped by the store's clock and read back in the same statement.
_STAMP_ONE_NOW = {
    server_clock: _STAMP_ONE.values(updated_at=clock_now(server_clock)).returning(
        grants.c.updated_at
    )
    for server_clock in (False, True)
}
_SERVER_NOW = select(type_coerce(func.clock_timestamp(), UTCDateTime))


async def stamp_writes(
    conn: AsyncConnection,
    db: Database,
    grant_ids: Sequence[str],
    now: datetime,
) -> dict[str, tuple[int, datetime]]:
    """Give each of these rows, written earlier in this transaction, the next value of the
    change sequence, in the order given (see `take_versions`), and `updated_at` = the store's
    "now" (`Database.now`): the instant the write took its place in the sequence, right
    before its commit, which is what other brokers measure their lag from. Each row's version
    and updated_at.

    The statements are the same whatever the ids, so they are built once: one row is one
    UPDATE ... RETURNING; several are one executemany, after one reading of the server's
    clock on PostgreSQL (on SQLite the store's "now" is `now` itself).
    """
    if not grant_ids:
        return {}
    first = await take_versions(conn, len(grant_ids)) - len(grant_ids) + 1
    if len(grant_ids) == 1:
        result = await conn.execute(
            _STAMP_ONE_NOW[db.server_clock],
            {"stamp_id": grant_ids[0], "stamp_version": first, **db.clock_values(now)},
        )
        return {grant_ids[0]: (first, result.scalar_one())}
    when: datetime = (
        (await conn.execute(_SERVER_NOW)).scalar_one() if db.server_clock else now.astimezone(UTC)
    )
    await conn.execute(
        _STAMP_MANY,
        [
            {"stamp_id": grant_id, "stamp_version": first + i, "stamp_at": when}
            for i, grant_id in enumerate(grant_ids)
        ],
    )
    return {grant_id: (first + i, when) for i, grant_id in enumerate(grant_ids)}


# A bulk INSERT as the driver takes it: its SQL, and each column's name and bind processor in
# the order of its parameters. Kept per dialect (an engine's: its processors depend on its
# driver), table and columns (see `insert_rows`).
_Insert = tuple[str, tuple[tuple[str, Callable[[Any], Any] | None], ...]]
_INSERTS: weakref.WeakKeyDictionary[Dialect, dict[tuple[Table, tuple[str, ...]], _Insert]] = (
    weakref.WeakKeyDictionary()
)


def _bulk_insert(dialect: Dialect, table: Table, keys: tuple[str, ...]) -> _Insert | None:
    """The compiled INSERT of `keys` into `table`; None when the driver's parameters are not
    positional (then SQLAlchemy does it all)."""
    inserts = _INSERTS.setdefault(dialect, {})
    found = inserts.get((table, keys))
    if found is None:
        compiled = insert(table).compile(dialect=dialect, column_keys=list(keys))
        if not compiled.positional or compiled.positiontup is None:
            return None
        order = tuple(compiled.positiontup)
        if sorted(order) != sorted(keys):  # a default or an expression of its own: not ours
            return None
        found = inserts[(table, keys)] = (
            compiled.string,
            tuple((name, table.c[name].type.bind_processor(dialect)) for name in order),
        )
    return found


async def insert_rows(
    conn: AsyncConnection, table: Table, rows: Sequence[Mapping[str, Any]]
) -> None:
    """INSERT `rows` (each with the same columns) in one executemany.

    What `conn.execute(insert(table), rows)` does, without SQLAlchemy building a parameter
    dictionary per row: the statement is compiled once per column set, and each row becomes
    the driver's tuple through the columns' own bind processors. An import binds thousands of
    rows of twenty-odd columns; this halves what that costs.
    """
    if not rows:
        return
    keys = tuple(rows[0])
    compiled = _bulk_insert(conn.dialect, table, keys)
    if compiled is None:
        await conn.execute(insert(table), list(rows))
        return
    sql, columns = compiled
    width = len(keys)
    params = []
    for row in rows:
        if len(row) != width:  # with the same length, a missing key raises KeyError below
            raise ValueError("every row of one insert_rows call must have the same columns")
        params.append(
            tuple(row[name] if process is None else process(row[name]) for name, process in columns)
        )
    await conn.exec_driver_sql(sql, params)
