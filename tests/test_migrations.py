"""Alembic migrations bring an empty store, SQLite or PostgreSQL, to exactly the declared schema."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, MetaData, Text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.errors import StoreError
from broker.store.engine import create_engine
from broker.store.migrate import (
    HEAD,
    current_revision,
    head_revision,
    require_current,
    upgrade,
)
from broker.store.tables import grants, metadata


@pytest.fixture
async def engine(store_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty store, disposed after the test."""
    engine = create_engine(store_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def _differences(conn: Connection, declared: MetaData) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, declared))


def _schema_differences(conn: Connection) -> list[Any]:
    return _differences(conn, metadata)


def _drifted_differences(conn: Connection) -> list[Any]:
    drifted = MetaData()
    for table in metadata.tables.values():
        copy = table.to_metadata(drifted)
        if table is grants:
            copy.append_column(Column("extra", Text))
    return _differences(conn, drifted)


async def test_upgrade_takes_an_empty_store_to_head(engine: AsyncEngine) -> None:
    """A never-migrated store has no revision; upgrade reports (None, head) and lands on head."""
    assert head_revision() is not None
    assert await current_revision(engine) is None
    assert await upgrade(engine) == (None, head_revision())
    assert await current_revision(engine) == head_revision()


def test_head_names_the_newest_script() -> None:
    """The constant a current store is checked against without Alembic is the scripts' head."""
    assert head_revision() == HEAD


def test_starting_on_a_current_store_does_not_load_alembic(tmp_path: Path) -> None:
    """`upgrade` of a store already at head answers from one query; Alembic stays unimported."""
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    program = (
        "import asyncio, sys\n"
        "from broker.store.engine import create_engine\n"
        "from broker.store.migrate import upgrade\n"
        "async def main():\n"
        f"    engine = create_engine({url!r})\n"
        "    result = await upgrade(engine)\n"
        "    await engine.dispose()\n"
        "    return result\n"
        "result = asyncio.run(main())\n"
        "print(result[0], result[1], 'alembic' in sys.modules)\n"
    )
    first = subprocess.run(
        [sys.executable, "-c", program], check=False, capture_output=True, text=True
    )
    second = subprocess.run(
        [sys.executable, "-c", program], check=False, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout.split() == ["None", HEAD, "True"]  # migrated: Alembic did it
    assert second.stdout.split() == [HEAD, HEAD, "False"]  # current: one query


async def test_second_upgrade_is_a_no_op(engine: AsyncEngine) -> None:
    """Upgrading a store already at head changes nothing and reports (head, head)."""
    await upgrade(engine)
    assert await upgrade(engine) == (head_revision(), head_revision())
    assert await current_revision(engine) == head_revision()


async def test_migrated_schema_matches_the_declared_tables(engine: AsyncEngine) -> None:
    """Autogenerate finds no difference between the migrated database and `tables.metadata`."""
    await upgrade(engine)
    async with engine.connect() as conn:
        assert await conn.run_sync(_schema_differences) == []


async def test_schema_comparison_notices_drift(engine: AsyncEngine) -> None:
    """The comparison is not vacuous: a declared column the migrations lack shows up."""
    await upgrade(engine)
    async with engine.connect() as conn:
        differences = await conn.run_sync(_drifted_differences)
    assert [d[0] for d in differences] == ["add_column"]


async def test_require_current_names_the_command_until_migrated(engine: AsyncEngine) -> None:
    """An unmigrated store is refused with `token-broker db upgrade`; a migrated one passes."""
    with pytest.raises(StoreError, match="token-broker db upgrade"):
        await require_current(engine)
    await upgrade(engine)
    await require_current(engine)


@pytest.mark.postgres
async def test_brokers_migrating_one_postgresql_at_once_all_succeed(postgres_url: str) -> None:
    """Three brokers of a fleet starting together migrate in turn: none fails on a table the
    other just made, and all end at the head revision."""
    engines = [create_engine(postgres_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(upgrade(engine) for engine in engines))
        assert [before for before, _ in results].count(None) == 1  # one migrated, from empty
        assert all(after == head_revision() for _, after in results)
        assert await current_revision(engines[0]) == head_revision()
    finally:
        for engine in engines:
            await engine.dispose()
