"""The throwaway PostgreSQL fixture starts a usable server and hands out empty databases."""

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.postgres import postgres_server, postgres_url  # noqa: F401

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
