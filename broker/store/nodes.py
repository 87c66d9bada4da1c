"""The brokers sharing a store: registration, heartbeats, membership, and the server's clock.

Every write here stamps times with the store's clock (`Database.now`: the PostgreSQL server's
`clock_timestamp()`), so a node whose own clock runs ahead or behind is judged alive or dead by
the same clock as every other node.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.errors import StoreError
from broker.store.session import Database
from broker.store.tables import UTCDateTime, grants, nodes


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Who a broker is: a random id made at start, and where it runs."""

    id: str
    hostname: str
    pid: int
    boot_id: str  # the kernel's boot id: pids are comparable only within one boot
    pid_namespace: str  # ...and within one pid namespace (containers have their own)
    version: str


@dataclass(frozen=True, slots=True)
class Member:
    """A registered node as the store sees it now."""

    info: NodeInfo
    heartbeat_at: datetime
    alive: bool


class NodeRepository:
    """The nodes table; the only SQL about nodes."""

    def __init__(self, engine: AsyncEngine, node_timeout: timedelta) -> None:
        self._db = Database(engine)
        self.node_timeout = node_timeout

    async def register(self, node: NodeInfo, now: datetime) -> None:
        """Add this node, alive from now."""
        async with self._db.write() as conn:
            await conn.execute(
                insert(nodes).values(
                    id=node.id,
                    hostname=node.hostname[:255],
                    pid=node.pid,
                    boot_id=node.boot_id,
                    pid_namespace=node.pid_namespace,
                    version=node.version,
                    started_at=self._db.now(now),
                    heartbeat_at=self._db.now(now),
                )
            )

    async def heartbeat(
        self, node_id: str, now: datetime, leases: list[str], lease: timedelta
    ) -> bool:
        """Stamp this node's heartbeat and move the deadline of the leases it holds for calls
        in flight `lease` ahead; False when the node is no longer registered (or was marked
        stopped by another node that found it dead)."""
        async with self._db.write() as conn:
            beat = await conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id, nodes.c.stopped_at.is_(None))
                .values(heartbeat_at=self._db.now(now))
            )
            if beat.rowcount != 1:
                return False
            if leases:
                await conn.execute(
                    update(grants)
                    .where(grants.c.id.in_(leases), grants.c.lease_owner == node_id)
                    .values(lease_expires_at=self._db.shifted(now, lease))
                )
        return True

    async def revive(self, node_id: str, now: datetime) -> None:
        """Alive again: a node other nodes had marked stopped, or whose row was purged."""
        async with self._db.write() as conn:
            result = await conn.execute(
                update(nodes)
                .where(nodes.c.id == node_id)
                .values(stopped_at=None, heartbeat_at=self._db.now(now))
            )
        if result.rowcount != 1:
            raise StoreError(f"node {node_id} is not registered")

    async def server_time(self) -> datetime | None:
        """The database server's clock now; None for a store without one (SQLite)."""
        if not self._db.server_clock:
            return None
        async with self._db.read() as conn:
            value = (await conn.execute(select(func.clock_timestamp()))).scalar_one()
        result: datetime | None = UTCDateTime().process_result_value(value, self._db.engine.dialect)
        return result

    async def members(self, now: datetime) -> list[Member]:
        """Every registered node that has not stopped, and whether it is alive now."""
        alive = nodes.c.heartbeat_at >= self._db.shifted(now, -self.node_timeout)
        query = select(nodes, alive.label("alive")).where(nodes.c.stopped_at.is_(None))
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            Member(
                NodeInfo(
                    row.id, row.hostname, row.pid, row.boot_id, row.pid_namespace, row.version
                ),
                row.heartbeat_at,
                bool(row.alive),
            )
            for row in rows
        ]

    async def stop(self, node_ids: list[str], now: datetime) -> None:
        """Mark nodes stopped (this one leaving, or others found dead): their leases are free
        at once; intents they left stay, for recovery."""
        if not node_ids:
            return
        async with self._db.write() as conn:
            await conn.execute(
                update(nodes)
                .where(nodes.c.id.in_(node_ids), nodes.c.stopped_at.is_(None))
                .values(stopped_at=self._db.now(now))
            )
            await conn.execute(
                update(grants)
                .where(grants.c.lease_owner.in_(node_ids), grants.c.intent_at.is_(None))
                .values(lease_owner=None, lease_expires_at=None)
            )

    async def purge(self, now: datetime, older_than: timedelta) -> int:
        """Forget nodes stopped or silent for `older_than` that hold no lease any more."""
        gone = or_(
            nodes.c.stopped_at < self._db.shifted(now, -older_than),
            nodes.c.heartbeat_at < self._db.shifted(now, -older_than),
        )
        holding = select(grants.c.lease_owner).where(grants.c.lease_owner.is_not(None))
        async with self._db.write() as conn:
            result = await conn.execute(delete(nodes).where(gone, nodes.c.id.not_in(holding)))
        return int(result.rowcount)
