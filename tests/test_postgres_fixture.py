"""The throwaway PostgreSQL fixture starts a usable server and hands out empty databases."""

import asyncio

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests import postgres as pg_fixture
from tests.postgres import PrivatePostgres, postgres_server, postgres_url  # noqa: F401

private_postgres = pg_fixture.private_postgres

pytestmark = pytest.mark.postgres


def _async_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


async def test_select_and_table_roundtrip(postgres_url: str) -> None:  # noqa: F811
    """A fresh database answers SELECT 1 and lets us create, fill, read and drop a table."""
    engine = create_async_engine(_async_url(postgres_url))
    try:
        async with engine.begin() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            await conn.execute(text("CREATE TABLE probe (id integer PRIMARY KEY, note text)"))
            await conn.execute(text("INSERT INTO probe VALUES (1, 'hello')"))
            assert (await conn.execute(text("SELECT note FROM probe"))).scalar_one() == "hello"
            await conn.execute(text("DROP TABLE probe"))
    finally:
        await engine.dispose()


async def test_each_test_gets_an_empty_database(postgres_url: str) -> None:  # noqa: F811
    """The database handed to a test is new, so it holds no tables from other tests."""
    engine = create_async_engine(_async_url(postgres_url))
    try:
        async with engine.connect() as conn:
            count = await conn.execute(
                text("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
            )
            assert count.scalar_one() == 0
            name = (await conn.execute(text("SELECT current_database()"))).scalar_one()
            assert name.startswith("tb_")
    finally:
        await engine.dispose()


async def test_a_private_cluster_stops_and_starts_under_its_clients(
    private_postgres: PrivatePostgres,
) -> None:
    """An open connection breaks and new ones are refused while stopped; start() brings it back."""
    url = private_postgres.new_database()
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE probe (v integer); INSERT INTO probe VALUES (1)")
    await asyncio.to_thread(private_postgres.stop)
    assert not private_postgres.running
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    await conn.close()
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the port
        await asyncpg.connect(url, timeout=5)
    await asyncio.to_thread(private_postgres.start)
    assert private_postgres.running
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT sum(v) FROM probe") == 1
    finally:
        await conn.close()


async def test_a_private_cluster_restarts_on_the_same_port(
    private_postgres: PrivatePostgres,
) -> None:
    """restart() is a new postmaster on the same URL; crash-stopped (immediate), data survives."""
    url = private_postgres.new_database()
    conn = await asyncpg.connect(url)
    first_pid = await conn.fetchval("SELECT pg_backend_pid()")
    await conn.execute("CREATE TABLE probe (v integer); INSERT INTO probe VALUES (7)")
    await conn.close()
    await asyncio.to_thread(private_postgres.restart)
    await asyncio.to_thread(private_postgres.restart, "immediate")
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT v FROM probe") == 7
        assert await conn.fetchval("SELECT pg_backend_pid()") != first_pid
        uptime = await conn.fetchval("SELECT now() - pg_postmaster_start_time()")
        assert uptime.total_seconds() < 30
    finally:
        await conn.close()
    with pytest.raises(ValueError, match="no stop mode"):
        private_postgres.stop("abrupt")
