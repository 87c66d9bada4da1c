"""Store faults made with real parts: SQLite's write lock held by another connection.

`SqliteWriteLock(path)` opens its own sqlite3 connection to an existing database file in a
thread of its own and holds `BEGIN IMMEDIATE` there: every other writer (the broker's
`BEGIN IMMEDIATE` included) waits on its busy_timeout and then fails with "database is
locked"; readers of a WAL database go on reading. The lock is held until `release()`, or at
most `max_hold` seconds, so a failing test never wedges the run.

For PostgreSQL that stops, starts and restarts under a test, see `private_postgres` in
tests/postgres.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from types import TracebackType

MAX_HOLD = 60.0  # seconds: past the broker's 10 s busy_timeout, short of wedging the run
ACQUIRE_TIMEOUT = 10.0  # seconds to wait for a writer already holding the lock


class SqliteWriteLock:
    """SQLite's write lock on one database file, held from a separate thread."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_hold: float = MAX_HOLD,
        acquire_timeout: float = ACQUIRE_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.max_hold = max_hold
        self.acquire_timeout = acquire_timeout
        self._ready = threading.Event()
        self._release = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._held = False
        self._expired = False

    @property
    def held(self) -> bool:
        """Whether the lock is held now."""
        return self._held

    @property
    def expired(self) -> bool:
        """Whether `max_hold` ended the hold, rather than `release()`."""
        return self._expired

    async def acquire(self) -> SqliteWriteLock:
        """Take the write lock; return once it is held (or raise what stopped it)."""
        if self._thread is not None:
            raise RuntimeError("a SqliteWriteLock is acquired once")
        if not self.path.is_file():
            raise FileNotFoundError(f"no SQLite database at {self.path}: create it first")
        self._thread = threading.Thread(target=self._hold, name="sqlite-write-lock", daemon=True)
        self._thread.start()
        ready = await asyncio.to_thread(self._ready.wait, self.acquire_timeout + 5)
        if self._error is not None:
            raise self._error
        if not ready:
            self._release.set()
            raise TimeoutError(f"the write lock on {self.path} was not taken in time")
        return self

    def release(self) -> None:
        """Roll back and close the connection, and wait for the thread (a few seconds at most)."""
        self._release.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    async def __aenter__(self) -> SqliteWriteLock:
        return await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _hold(self) -> None:
        try:
            # mode=rw: never create a file by mistake; isolation_level=None: BEGIN is ours.
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=rw",
                uri=True,
                timeout=self.acquire_timeout,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            self._error = exc
            self._ready.set()
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._error = exc
            self._ready.set()
            conn.close()
            return
        self._held = True
        self._ready.set()
        try:
            self._expired = not self._release.wait(self.max_hold)
        finally:
            conn.execute("ROLLBACK")
            conn.close()
            self._held = False
