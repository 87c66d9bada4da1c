"""How a broker learns, within milliseconds, of writes other brokers make to the shared store.

Every write of a grant takes the next value of the store's change sequence (its version) and,
on PostgreSQL, sends `NOTIFY token_broker_grants, 'GRANT_ID VERSION'` in the same transaction,
delivered to every listener when it commits. `PgListener` holds one connection of its own
(outside the pool) that LISTENs on that channel and hands each notice to the refresher, which
then reads what changed (`changes_since`) and publishes it. When the connection drops (a
server restart, a network fault) it reconnects with back-off; meanwhile, and as a safety net
always, the refresher polls the sequence. A notice is only a hint: what a broker serves comes
from the rows it reads, in version order.

A broker also hears its own notices back. `echo(grant_id, version)` waits for one: once the
server has delivered a claim's notice to this broker, it has sent it to every other listener,
so the claim's owner can let a refresh token leave knowing the others hold their callers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from broker.store.session import CHANNEL

RECENT_NOTICES = 4096
RECONNECT_BASE = 0.5
RECONNECT_CAP = 10.0
log = structlog.get_logger("broker.feed")

Notice = Callable[[str, int, bool], None]  # grant id, version, deleted


def parse_notice(payload: str) -> tuple[str, int, bool] | None:
    """`GRANT_ID VERSION [deleted]`, or None for anything else."""
    parts = payload.split()
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        return None
    if len(parts) == 3 and parts[2] != "deleted":
        return None
    return parts[0], int(parts[1]), len(parts) == 3


class PgListener:
    """One LISTEN connection, reconnected for as long as the broker runs."""

    def __init__(self, dsn: str, connect_args: dict[str, Any]) -> None:
        self._dsn = dsn
        self._connect_args = connect_args
        self.on_notice: Notice = lambda _grant, _version, _deleted: None  # set by the follower
        self._connection: Any = None
        self._lost = asyncio.Event()
        self._echoes: dict[tuple[str, int], asyncio.Future[None]] = {}
        # Notices just received: an echo asked for after its notice arrived is answered here.
        self._recent: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.on_connect: Callable[[], None] | None = None  # after each (re)connect: resync

    @property
    def connected(self) -> bool:
        """Whether notices are arriving (otherwise the refresher polls)."""
        return self._connection is not None and not self._connection.is_closed()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after each loss with back-off."""
        failures = 0
        while True:
            try:
                await self._listen()
                failures = 0
                await self._lost.wait()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                failures += 1
                if failures == 1:
                    log.warning("feed_disconnected", reason=type(exc).__name__)
            finally:
                await self._close()
            await asyncio.sleep(min(RECONNECT_CAP, RECONNECT_BASE * (1 << min(failures, 10))))

    async def _listen(self) -> None:
        self._lost.clear()
        connection = await asyncpg.connect(self._dsn, **self._connect_args)
        connection.add_termination_listener(lambda _conn: self._lost.set())
        await connection.add_listener(CHANNEL, self._received)
        self._connection = connection
        log.info("feed_listening", channel=CHANNEL)
        if self.on_connect is not None:
            self.on_connect()  # notices sent while not listening are lost: read what changed

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        parsed = parse_notice(payload)
        if parsed is None:
            return
        grant_id, version, deleted = parsed
        self._recent[(grant_id, version)] = None
        while len(self._recent) > RECENT_NOTICES:
            self._recent.popitem(last=False)
        echo = self._echoes.pop((grant_id, version), None)
        if echo is not None and not echo.done():
            echo.set_result(None)
        self.on_notice(grant_id, version, deleted)

    async def echo(self, grant_id: str, version: int, seconds: float) -> bool:
        """Wait at most `seconds` for this broker's own notice of a write to come back."""
        if (grant_id, version) in self._recent:
            return True
        if not self.connected:
            return False
        future = asyncio.get_running_loop().create_future()
        self._echoes[(grant_id, version)] = future
        try:
            await asyncio.wait_for(future, seconds)
        except TimeoutError:
            return False
        finally:
            self._echoes.pop((grant_id, version), None)
        return True

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 2)
