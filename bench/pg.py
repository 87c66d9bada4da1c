"""A PostgreSQL server for the benchmarks: the test suite's throwaway cluster, with fsync on.

The suite starts its cluster with fsync off (tests need speed, not durability); a benchmark of
durable rotations needs commits that reach the disk, so this one keeps PostgreSQL's default
(fsync on, synchronous_commit on). An existing server can be given by URL instead; its own
settings then apply, and the tables say what they were.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import asyncpg

from bench.proc import parent
from tests.postgres import PostgresServer, find_pg_bin, start_postgres


def available(url: str | None) -> bool:
    """Whether a PostgreSQL run is possible: a URL was given or the server binaries exist."""
    return url is not None or find_pg_bin() is not None


@contextlib.contextmanager
def server(directory: Path, url: str | None) -> Iterator[PostgresServer]:
    """The server at `url`, or a new durable cluster under `directory`; stopped afterwards."""
    pg = PostgresServer(url) if url else start_postgres(directory, fsync=True)
    try:
        yield pg
    finally:
        pg.stop()


def postmaster(url: str) -> int | None:
    """The pid of the server's postmaster when it runs on this machine, else None."""

    async def find() -> int | None:
        conn = await asyncpg.connect(url)
        try:
            backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
            # Read while the backend exists: it is gone once its connection closes.
            return parent(backend)
        except OSError:  # no such pid here: the server runs elsewhere
            return None
        finally:
            await conn.close()

    return asyncio.run(find())


def durability(url: str) -> str:
    """The server's fsync and synchronous_commit settings, for the tables."""

    async def read() -> str:
        conn = await asyncpg.connect(url)
        try:
            fsync = await conn.fetchval("SHOW fsync")
            sync = await conn.fetchval("SHOW synchronous_commit")
        finally:
            await conn.close()
        return f"fsync={fsync}, synchronous_commit={sync}"

    return asyncio.run(read())
