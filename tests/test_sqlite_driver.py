"""The SQLite engine's one-trip cursor (broker.store.sqlite_driver) against SQLAlchemy's stock
aiosqlite adapter: the same results and errors, one call on the connection's thread a statement."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from broker.store.engine import create_engine

metadata = MetaData()
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(32), nullable=False, unique=True),
    Column("size", Integer, nullable=False),
)


async def _engine(engine: AsyncEngine) -> AsyncEngine:
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    return engine


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """The broker's SQLite engine and a stock aiosqlite one, each on a file of its own."""
    ours = await _engine(create_engine(f"sqlite:///{tmp_path / 'ours.db'}"))
    stock = await _engine(create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'stock.db'}"))
    try:
        yield ours, stock
    finally:
        await ours.dispose()
        await stock.dispose()


async def _workload(conn: AsyncConnection) -> list[Any]:
    """What SQLAlchemy reads back from a cursor, for every kind of statement the store runs."""
    seen: list[Any] = []
    first = await conn.execute(insert(items).values(name="a", size=1))
    seen.append(("insert", first.rowcount, first.inserted_primary_key))
    many = await conn.execute(insert(items), [{"name": f"n{i}", "size": i} for i in range(5)])
    seen.append(("executemany", many.rowcount))
    rows = await conn.execute(select(items).order_by(items.c.id))
    seen.append(("select", list(rows.keys()), rows.all()))
    changed = await conn.execute(update(items).where(items.c.size > 2).values(size=0))
    seen.append(("update", changed.rowcount))
    returned = await conn.execute(
        update(items)
        .where(items.c.name.in_(["a", "n1"]))
        .values(size=items.c.size + 10)
        .returning(items.c.name, items.c.size)
    )
    seen.append(("returning", sorted(returned.all())))
    none = await conn.execute(select(items).where(items.c.id < 0))
    seen.append(("empty", none.all(), none.fetchone()))
    seen.append(("scalar", (await conn.execute(text("SELECT count(*) FROM items"))).scalar()))
    return seen


async def test_results_are_the_stock_adapters(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    ours, stock = engines
    async with ours.begin() as conn:
        mine = await _workload(conn)
    async with stock.begin() as conn:
        theirs = await _workload(conn)
    assert mine == theirs
    assert mine[2][:2] == ("select", ["id", "name", "size"])
    assert len(mine[2][2]) == 6


async def _fetched_in_parts(engine: AsyncEngine) -> list[Any]:
    """Rows read off the DBAPI cursor with fetchmany(), at its default size and a set one."""
    async with engine.begin() as conn:
        await conn.execute(insert(items), [{"name": f"n{i}", "size": i} for i in range(5)])
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()

        def parts(dbapi_connection: Any) -> list[Any]:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT name FROM items ORDER BY id")
            seen = [cursor.arraysize, cursor.fetchmany()]
            cursor.arraysize = 3
            seen += [cursor.arraysize, cursor.fetchmany(), cursor.fetchall()]
            cursor.close()
            return seen

        return await conn.run_sync(lambda _: parts(raw.dbapi_connection))


async def test_fetching_in_parts_is_the_stock_adapters(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    ours, stock = engines
    mine = await _fetched_in_parts(ours)
    assert mine == await _fetched_in_parts(stock)
    assert [len(part) for part in mine[1::2]] == [1, 3]


@pytest.mark.parametrize(
    ("statement", "error"),
    [
        (insert(items).values(name="taken", size=1), IntegrityError),
        (text("SELECT nonsense FROM items"), OperationalError),
    ],
)
async def test_errors_are_the_stock_adapters_and_the_connection_carries_on(
    engines: tuple[AsyncEngine, AsyncEngine], statement: Any, error: type[DBAPIError]
) -> None:
    for engine in engines:
        async with engine.begin() as conn:
            await conn.execute(insert(items).values(name="taken", size=1))
        async with engine.connect() as conn:
            with pytest.raises(error) as raised:
                await conn.execute(statement)
            await conn.rollback()
            count = (await conn.execute(text("SELECT count(*) FROM items"))).scalar()
        assert count == 1
        assert type(raised.value.orig).__module__ == "sqlite3"


async def _trips(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[Any]]) -> int:
    """How many calls `work` queues on the connection's thread."""
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        queued = driver._execute
        calls = 0

        async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await queued(fn, *args, **kwargs)

        driver._execute = counting
        try:
            await work(conn)
        finally:
            del driver._execute
    return calls


async def test_a_statement_is_one_trip_to_the_thread(
    engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """A SELECT and an UPDATE ... RETURNING each one call on the thread (the stock adapter
    makes four: open a cursor, execute, fetch, close), an UPDATE and an executemany one
    (three)."""

    async def statements(conn: AsyncConnection) -> None:
        await conn.execute(select(items))
        await conn.execute(update(items).values(size=1).returning(items.c.id))
        await conn.execute(update(items).values(size=2))
        await conn.execute(insert(items), [{"name": "x", "size": 1}, {"name": "y", "size": 2}])

    ours, stock = engines
    assert await _trips(ours, statements) == 5  # the broker's own BEGIN, then one a statement
    assert await _trips(stock, statements) == 14
