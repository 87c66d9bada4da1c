"""SqliteWriteLock holds SQLite's write lock the way a competing writer would, and lets go."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from broker.store.engine import create_engine, writer
from tests.storefaults import SqliteWriteLock


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A WAL-mode SQLite database with one table and one row, as the broker's store would be."""
    path = tmp_path / "store.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (v INTEGER)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    return path


def _begin_immediate(path: Path, busy_timeout: float) -> None:
    """Take and give back the write lock on another connection, waiting at most busy_timeout."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_other_writers_are_locked_out_until_release(db: Path) -> None:
    """While held, BEGIN IMMEDIATE elsewhere fails "database is locked"; after release it works."""
    lock = await SqliteWriteLock(db).acquire()
    assert lock.held
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        _begin_immediate(db, busy_timeout=0.2)
    assert time.monotonic() - started >= 0.2  # it waited out its busy timeout first
    lock.release()
    assert not lock.held
    assert not lock.expired
    _begin_immediate(db, busy_timeout=0.2)


async def test_readers_go_on_reading_while_held(db: Path) -> None:
    """In WAL mode only writers wait: a reader sees the committed row while the lock is held."""
    async with SqliteWriteLock(db):
        conn = sqlite3.connect(db, timeout=0.2)
        try:
            assert conn.execute("SELECT v FROM t").fetchall() == [(1,)]
        finally:
            conn.close()


async def test_a_broker_engine_write_waits_for_the_lock(db: Path) -> None:
    """A write through the broker's engine waits on its busy_timeout and lands after release."""
    engine = create_engine(f"sqlite:///{db}")
    lock = await SqliteWriteLock(db).acquire()

    async def write() -> float:
        started = time.monotonic()
        async with writer(engine).begin() as conn:
            await conn.execute(text("INSERT INTO t VALUES (2)"))
        return time.monotonic() - started

    try:
        async with asyncio.TaskGroup() as group:
            waited = group.create_task(write())
            await asyncio.sleep(0.5)
            assert not waited.done()
            lock.release()
        assert waited.result() >= 0.5
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT v FROM t ORDER BY v"))
            assert rows.scalars().all() == [1, 2]
    finally:
        lock.release()
        await engine.dispose()


async def test_the_hold_ends_by_itself_after_max_hold(db: Path) -> None:
    """A lock nobody releases lets go after max_hold, and says so."""
    lock = await SqliteWriteLock(db, max_hold=0.3).acquire()
    await asyncio.sleep(0.6)
    assert not lock.held
    assert lock.expired
    _begin_immediate(db, busy_timeout=0.2)


async def test_acquire_waits_for_another_writer_and_then_gives_up(db: Path) -> None:
    """A second lock waits acquire_timeout for the first, then raises "database is locked"."""
    async with SqliteWriteLock(db):
        second = SqliteWriteLock(db, acquire_timeout=0.2)
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            await second.acquire()
        assert not second.held


async def test_a_missing_database_is_not_created(tmp_path: Path) -> None:
    """Locking a path with no database raises FileNotFoundError and leaves no file behind."""
    missing = tmp_path / "typo.db"
    with pytest.raises(FileNotFoundError, match="create it first"):
        await SqliteWriteLock(missing).acquire()
    assert not missing.exists()
