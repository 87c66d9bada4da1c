"""SQLite through aiosqlite with one trip to its thread per statement.

aiosqlite runs each call on the sqlite3 connection in a thread of its own, and SQLAlchemy's
adapter makes four such calls for a statement that returns rows (open a cursor, execute, fetch,
close) and three for one that does not. Each trip is a hand-off to that thread and back to the
event loop, about 30-40 µs of the loop's CPU and as much of the thread's: on the refresher's
path, where every claim batch and commit batch runs several statements, those trips cost more
than the statements themselves. Here a statement's cursor is opened, executed, read to the
end and closed in one call on the thread, and the adapter's cursor keeps what it returned
(the rows, the description, the row count, the last row id), which is all SQLAlchemy asks of it.

Everything else is aiosqlite's and SQLAlchemy's own: the thread, the connection, the adapter's
lock, exceptions (raised from the same sqlite3 calls, translated by the same handler), and
server-side cursors, which this store does not use. This leans on two of their internals,
aiosqlite's `Connection._execute` (queue a call on its thread) and `_conn`, as SQLAlchemy's
own adapter does (`_tx`, `_conn`); pyproject.toml bounds both to the versions
tests/test_sqlite_driver.py holds the adapter to (the stock adapter's results and errors).
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util import EMPTY_DICT

_Outcome = tuple[Any, list[Any] | None, int, int | None]  # description, rows, rowcount, lastrowid


class OneTripCursor(AsyncAdapt_aiosqlite_cursor):
    """SQLAlchemy's aiosqlite cursor, with each statement one call on the connection's thread."""

    __slots__ = ("_arraysize", "_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: AsyncAdapt_aiosqlite_connection) -> None:
        # No aiosqlite cursor is opened here (that was a trip of its own): each statement
        # opens and closes a sqlite3 cursor on the thread.
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._soft_closed_memoized = EMPTY_DICT
        self._rows = collections.deque()
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None
        self._arraysize = 1  # sqlite3's default: what fetchmany() without a size returns

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int:
        return self._lastrowid  # type: ignore[return-value]

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._arraysize = value

    async def _execute_async(self, operation: Any, parameters: Any) -> Any:
        await self._run(operation, parameters, many=False)

    async def _executemany_async(self, operation: Any, seq_of_parameters: Any) -> Any:
        await self._run(operation, seq_of_parameters, many=True)

    async def _run(self, operation: str, parameters: Any, *, many: bool) -> None:
        connection: aiosqlite.Connection = self._connection  # type: ignore[assignment]

        def run() -> _Outcome:
            cursor = connection._conn.cursor()
            try:
                if many:
                    cursor.executemany(operation, parameters)
                else:
                    cursor.execute(operation, () if parameters is None else parameters)
                rows = cursor.fetchall() if cursor.description else None
                return cursor.description, rows, cursor.rowcount, cursor.lastrowid
            finally:
                cursor.close()

        async with self._adapt_connection._execute_mutex:
            outcome: _Outcome = await connection._execute(run)  # type: ignore[no-untyped-call]
        self._description, rows, self._rowcount, self._lastrowid = outcome
        self._rows = collections.deque(rows or ())

    async def _async_soft_close(self) -> None:
        return  # nothing is open: the sqlite3 cursor was closed on the thread

    def close(self) -> None:
        self._rows.clear()

    def setinputsizes(self, *inputsizes: Any) -> None:
        pass  # sqlite3 takes none


class _Connection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = OneTripCursor  # type: ignore[assignment]  # a subclass of the stock one


class OneTripDBAPI(AsyncAdapt_aiosqlite_dbapi):
    """aiosqlite as a DBAPI module whose connections have the one-trip cursor; passed to the
    engine as its `module`."""

    def __init__(self) -> None:
        super().__init__(aiosqlite, sqlite3)

    def connect(self, *arg: Any, **kw: Any) -> _Connection:
        stock = super().connect(*arg, **kw)
        return _Connection(self, stock._connection)
