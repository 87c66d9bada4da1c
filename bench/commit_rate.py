"""The raw durable-commit rate of a disk or a database server: the ceiling for rotations.

Every rotation must commit to durable storage before its new token is served, so the fastest
the broker could ever rotate (without batching commits) is bounded by how many single-row
commits the store takes per second. These measure that with nothing of the broker in the way:
SQLite through the standard library (WAL, synchronous=FULL, BEGIN IMMEDIATE, as the broker
configures it) in the directory that holds the broker's store, and PostgreSQL through asyncpg
(autocommit INSERTs), on one connection and on many at once (PostgreSQL groups concurrent
commits into one WAL flush; SQLite has one writer at a time, so concurrency cannot help it).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

ROW_BYTES = 400  # about the size of a grant row with its sealed tokens


def sqlite_rate(directory: Path, seconds: float) -> float:
    """Single-row durable commits per second in a fresh SQLite file in `directory`."""
    path = directory / "commit-rate.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, value BLOB NOT NULL)")
        payload = os.urandom(ROW_BYTES)
        commits = 0
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO rows (value) VALUES (?)", (payload,))
            conn.execute("COMMIT")
            commits += 1
        return commits / (time.monotonic() - started)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)


def postgres_rate(url: str, seconds: float, connections: int) -> float:
    """Single-row durable commits per second over `connections` concurrent connections."""
    return asyncio.run(_postgres_rate(url, seconds, connections))


async def _postgres_rate(url: str, seconds: float, connections: int) -> float:
    import asyncpg

    table = f"commit_rate_{os.getpid()}"
    setup = await asyncpg.connect(url)
    await setup.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, value bytea NOT NULL)")
    payload = os.urandom(ROW_BYTES)
    conns = [await asyncpg.connect(url) for _ in range(connections)]
    try:
        deadline = time.monotonic() + seconds
        insert = f"INSERT INTO {table} (value) VALUES ($1)"  # noqa: S608 - our own table name

        async def writer(conn: asyncpg.Connection) -> int:
            commits = 0
            while time.monotonic() < deadline:
                await conn.execute(insert, payload)
                commits += 1
            return commits

        started = time.monotonic()
        counts = await asyncio.gather(*(writer(c) for c in conns))
        return sum(counts) / (time.monotonic() - started)
    finally:
        for conn in conns:
            await conn.close()
        await setup.execute(f"DROP TABLE {table}")
        await setup.close()
