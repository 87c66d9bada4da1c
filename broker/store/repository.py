"""The grant repository: the only code that speaks SQL, and the only code that seals and opens.

Every change to a grant's tokens is a compare-and-swap on its generation: the UPDATE matches
`generation = expected` and sets `generation = expected + 1`, and a miss raises ConflictError.
Write transactions use the writer engine, which begins them IMMEDIATE on SQLite.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, inspect, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.crypto import Keyring
from broker.errors import ConflictError
from broker.model import Grant, GrantState
from broker.store.engine import writer
from broker.store.rows import GrantRows, verify_keys
from broker.store.sealing import Sealer
from broker.store.tables import UTCDateTime, grant_changes, grant_deletions, grants


@dataclass(frozen=True, slots=True)
class DueGrant:
    """A grant the schedule loop should refresh now."""

    id: str
    provider: str
    next_refresh_at: datetime


@dataclass(frozen=True, slots=True)
class Deletion:
    """A grant deleted at a version of the change sequence."""

    grant_id: str
    provider: str
    user: str
    version: int


@dataclass(frozen=True, slots=True)
class Changes:
    """What a follower of the change sequence has not seen yet, and where it now stands."""

    written: list[Grant]
    deleted: list[Deletion]
    version: int


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """How many grants a key id seals (None: grants with nothing sealed)."""

    key_id: str | None
    grants: int


class GrantRepository:
    """Loads and saves grants, sealing their secrets with the keyring on the way in."""

    def __init__(
        self,
        engine: AsyncEngine,
        keyring: Keyring,
        reload_keyring: Callable[[], Keyring] | None = None,
    ) -> None:
        self._engine = engine
        self._writer = writer(engine)
        self.sealer = Sealer(keyring, reload_keyring)
        self._rows = GrantRows(self.sealer)

    @property
    def keyring(self) -> Keyring:
        """The keyring in use (re-read when a sealed value names a key it lacks)."""
        return self.sealer.keyring

    @keyring.setter
    def keyring(self, keyring: Keyring) -> None:
        self.sealer.keyring = keyring

    # -- reads ------------------------------------------------------------------------------

    async def get(self, provider: str, user: str) -> Grant | None:
        """The grant at PROVIDER/USER, opened, or None."""
        query = select(grants).where(grants.c.provider == provider, grants.c.user_name == user)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else self._rows.open(row)

    async def get_by_id(self, grant_id: str) -> Grant | None:
        """The grant with this row id, opened, or None."""
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(grants).where(grants.c.id == grant_id))).first()
        return None if row is None else self._rows.open(row)

    async def all(self) -> list[Grant]:
        """Every grant, opened, ordered by provider and user."""
        query = select(grants).order_by(grants.c.provider, grants.c.user_name)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [self._rows.open(row) for row in rows]

    async def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        async with self._engine.connect() as conn:
            await conn.execute(select(1))

    # -- writes -----------------------------------------------------------------------------

    async def insert(self, grant: Grant, now: datetime) -> Grant:
        """Store a new grant at generation 1; the row id is chosen here."""
        grant = replace(grant, id=uuid.uuid4().hex, generation=1, created_at=now, updated_at=now)
        values = {**self._rows.plain(grant), **self._rows.sealed(grant)}
        try:
            async with self._writer.begin() as conn:
                values["version"] = await take_versions(conn)
                await conn.execute(insert(grants).values(**values))
        except IntegrityError:
            raise ConflictError(
                f"grant {grant.name} was created by someone else meanwhile"
            ) from None
        return replace(grant, key_id=values["key_id"], version=values["version"])

    async def replace_tokens(self, grant: Grant, expected_generation: int, now: datetime) -> Grant:
        """Write `grant` over its row if the row is still at `expected_generation`."""
        new = replace(grant, generation=expected_generation + 1, updated_at=now)
        values = {**self._rows.plain(new), **self._rows.sealed(new)}
        for fixed in ("id", "created_at"):
            values.pop(fixed)
        async with self._writer.begin() as conn:
            values["version"] = await take_versions(conn)
            result = await conn.execute(
                update(grants)
                .where(grants.c.id == grant.id, grants.c.generation == expected_generation)
                .values(**values)
            )
            if result.rowcount != 1:
                raise ConflictError(
                    f"grant {grant.name} changed under us "
                    f"(expected generation {expected_generation})"
                )
        return replace(new, key_id=values["key_id"], version=values["version"])

    async def delete(self, grant_id: str, now: datetime) -> bool:
        """Delete a grant row, recording the deletion in the change sequence; True if it existed."""
        async with self._writer.begin() as conn:
            row = (
                await conn.execute(
                    select(grants.c.provider, grants.c.user_name).where(grants.c.id == grant_id)
                )
            ).first()
            if row is None:
                return False
            await conn.execute(delete(grants).where(grants.c.id == grant_id))
            await conn.execute(
                insert(grant_deletions).values(
                    version=await take_versions(conn),
                    grant_id=grant_id,
                    provider=row.provider,
                    user_name=row.user_name,
                    deleted_at=now,
                )
            )
        return True

    # -- the refresher: schedule, leases, intent, compare-and-swap commits -------------------
    #
    # A refresh owns its grant through a lease: `claim` sets lease_owner and a deadline by
    # compare-and-swap, only when no live lease exists. Every later write is guarded by
    # `lease_owner = me AND generation = g`, so a process whose lease was taken over (or
    # whose generation is stale) can change nothing: the generation is the fencing token.

    async def due(self, now: datetime, limit: int, providers: Iterable[str]) -> list[DueGrant]:
        """Active grants of `providers` whose refresh time has come, with no live lease."""
        query = (
            select(grants.c.id, grants.c.provider, grants.c.next_refresh_at)
            .where(
                grants.c.state == GrantState.ACTIVE.value,
                grants.c.provider.in_(list(providers)),
                # An open intent is due at once: a refresh with an unknown outcome.
                or_(grants.c.next_refresh_at <= now, grants.c.intent_at.is_not(None)),
                or_(grants.c.lease_owner.is_(None), grants.c.lease_expires_at < now),
            )
            .order_by(grants.c.next_refresh_at)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [DueGrant(row.id, row.provider, row.next_refresh_at) for row in rows]

    async def next_due_at(self, now: datetime, providers: Iterable[str]) -> datetime | None:
        """The earliest refresh time among active, unleased grants of `providers`."""
        query = select(func.min(grants.c.next_refresh_at)).where(
            grants.c.state == GrantState.ACTIVE.value,
            grants.c.provider.in_(list(providers)),
            or_(grants.c.lease_owner.is_(None), grants.c.lease_expires_at < now),
        )
        async with self._engine.connect() as conn:
            value: datetime | None = (await conn.execute(query)).scalar_one()
        return UTCDateTime().process_result_value(value, self._engine.dialect)

    async def changes_since(self, version: int) -> Changes:
        """Writes and deletions with a version above `version` (by anyone), in version order."""
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(grants).where(grants.c.version > version).order_by(grants.c.version)
                )
            ).all()
            gone = (
                await conn.execute(
                    select(grant_deletions)
                    .where(grant_deletions.c.version > version)
                    .order_by(grant_deletions.c.version)
                )
            ).all()
        written = [self._rows.open(row) for row in rows]
        deleted = [Deletion(row.grant_id, row.provider, row.user_name, row.version) for row in gone]
        last = max([version, *(g.version for g in written), *(d.version for d in deleted)])
        return Changes(written, deleted, last)

    async def last_version(self) -> int:
        """The change sequence's current value: everything up to it is committed."""
        async with self._engine.connect() as conn:
            value = (
                await conn.execute(select(grant_changes.c.seq).where(grant_changes.c.id == 1))
            ).scalar_one_or_none()
        return int(value or 0)

    async def claim(
        self, grant_id: str, owner: str, now: datetime, until: datetime
    ) -> Grant | None:
        """Take the lease on an active grant; its current row, or None when someone holds it."""
        async with self._writer.begin() as conn:
            result = await conn.execute(
                update(grants)
                .where(
                    grants.c.id == grant_id,
                    grants.c.state == GrantState.ACTIVE.value,
                    or_(
                        grants.c.lease_owner.is_(None),
                        grants.c.lease_expires_at < now,
                        grants.c.lease_owner == owner,
                    ),
                )
                .values(lease_owner=owner, lease_expires_at=until)
            )
            if result.rowcount != 1:
                return None
            row = (await conn.execute(select(grants).where(grants.c.id == grant_id))).one()
        return self._rows.open(row)

    async def mark_sent(self, grant_id: str, generation: int, owner: str, now: datetime) -> int:
        """Record, durably, that this generation's refresh token is about to be sent; the
        write's version."""
        return await self._guarded(
            grant_id, generation, owner, {"intent_at": now, "updated_at": now}
        )

    async def commit_refresh(
        self, grant: Grant, expected_generation: int, owner: str, now: datetime
    ) -> Grant:
        """Store a successful refresh: new tokens, generation + 1, intent and lease cleared."""
        new = replace(grant, generation=expected_generation + 1, updated_at=now, intent_at=None)
        values = {**self._rows.plain(new), **self._rows.sealed(new)}
        for fixed in ("id", "created_at"):
            values.pop(fixed)
        values.pop("version")
        version = await self._guarded(
            grant.id,
            expected_generation,
            owner,
            {**values, "lease_owner": None, "lease_expires_at": None},
        )
        return replace(new, key_id=values["key_id"], version=version)

    async def settle(
        self,
        grant: Grant,
        owner: str,
        now: datetime,
        *,
        state: GrantState,
        last_error: str | None,
        next_refresh_at: datetime | None,
        refresh_failures: int,
    ) -> Grant:
        """Store a refresh that produced no tokens; the tokens themselves stay untouched."""
        changes: dict[str, Any] = {
            "state": state.value,
            "last_error": last_error,
            "next_refresh_at": next_refresh_at,
            "refresh_failures": refresh_failures,
            "intent_at": None,
            "updated_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        version = await self._guarded(grant.id, grant.generation, owner, changes)
        return replace(
            grant,
            state=state,
            last_error=last_error,
            next_refresh_at=next_refresh_at,
            refresh_failures=refresh_failures,
            intent_at=None,
            updated_at=now,
            version=version,
        )

    async def changed_elsewhere(self, grant_id: str, generation: int, now: datetime) -> bool:
        """Whether the row moved past `generation`, or an owner with a live lease has sent
        (or is about to send) its refresh token; a missing row counts as changed."""
        query = select(
            grants.c.generation, grants.c.intent_at, grants.c.lease_owner, grants.c.lease_expires_at
        ).where(grants.c.id == grant_id)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None or row.generation != generation:
            return True
        lease_expires = UTCDateTime().process_result_value(
            row.lease_expires_at, self._engine.dialect
        )
        live = row.lease_owner is not None and lease_expires is not None and lease_expires >= now
        return live and row.intent_at is not None

    async def lease_held(self, grant_id: str, now: datetime) -> bool:
        """Whether someone holds a live lease on this grant."""
        query = select(grants.c.id).where(
            grants.c.id == grant_id,
            grants.c.lease_owner.is_not(None),
            grants.c.lease_expires_at >= now,
        )
        async with self._engine.connect() as conn:
            return (await conn.execute(query)).first() is not None

    async def lease_owners(self) -> set[str]:
        """Everyone holding a lease right now (live or not)."""
        query = select(grants.c.lease_owner).where(grants.c.lease_owner.is_not(None)).distinct()
        async with self._engine.connect() as conn:
            return {str(owner) for owner in (await conn.execute(query)).scalars().all()}

    async def break_leases(self, owners: set[str]) -> int:
        """Drop the leases of owners known to be dead; their intents stay for recovery."""
        if not owners:
            return 0
        async with self._writer.begin() as conn:
            result = await conn.execute(
                update(grants)
                .where(grants.c.lease_owner.in_(owners))
                .values(lease_owner=None, lease_expires_at=None)
            )
        return int(result.rowcount)

    async def release(self, grant_id: str, owner: str) -> None:
        """Give up a lease without changing anything else."""
        async with self._writer.begin() as conn:
            await conn.execute(
                update(grants)
                .where(grants.c.id == grant_id, grants.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    async def _guarded(
        self, grant_id: str, generation: int, owner: str, values: dict[str, Any]
    ) -> int:
        async with self._writer.begin() as conn:
            version = await take_versions(conn)
            result = await conn.execute(
                update(grants)
                .where(
                    grants.c.id == grant_id,
                    grants.c.generation == generation,
                    grants.c.lease_owner == owner,
                )
                .values(**values, version=version)
            )
            if result.rowcount != 1:
                raise ConflictError(
                    f"grant row {grant_id} is no longer at generation {generation} under this lease"
                )
        return version

    # -- keys -------------------------------------------------------------------------------

    async def key_usage(self) -> list[KeyUsage]:
        """How many grants each key id seals."""
        query = select(grants.c.key_id, func.count()).group_by(grants.c.key_id)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return sorted(
            (KeyUsage(key_id, count) for key_id, count in rows),
            key=lambda usage: (usage.key_id is None, usage.key_id or ""),
        )

    async def count_not_under(self, key_id: str) -> int:
        """How many grants still hold values sealed with a key other than `key_id`."""
        query = (
            select(func.count())
            .select_from(grants)
            .where(grants.c.key_id.is_not(None), grants.c.key_id != key_id)
        )
        async with self._engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def reseal_batch(self, limit: int) -> int:
        """Re-encrypt up to `limit` grants not sealed with the primary key; how many moved.

        Each row is rewritten by a compare-and-swap on its generation without changing it, so
        a concurrent token update wins and the row is simply picked up by a later batch.
        """
        primary = self.keyring.primary
        query = (
            select(grants)
            .where(grants.c.key_id.is_not(None), grants.c.key_id != primary)
            .order_by(grants.c.id)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        moved = 0
        async with self._writer.begin() as conn:
            for row in rows:
                grant = self._rows.open(row)
                sealed = self._rows.sealed(grant)
                result = await conn.execute(
                    update(grants)
                    .where(grants.c.id == grant.id, grants.c.generation == grant.generation)
                    .values(**sealed)
                )
                moved += result.rowcount
        return moved

    async def verify_keys(self) -> list[str]:
        """Problems opening one sealed value per key id in use; empty when the keyring fits.

        Reads only; used before migrations so a wrong keyring changes nothing on disk.
        """
        async with self._engine.connect() as conn:
            if not await conn.run_sync(lambda sync: inspect(sync).has_table("grants")):
                return []
            return await verify_keys(conn, self.keyring)


async def take_versions(conn: AsyncConnection, count: int = 1) -> int:
    """Take `count` values of the change sequence inside `conn`'s write transaction; the last.

    The counter row stays locked until the transaction ends, so values are handed out in
    commit order: a follower that has seen version v never later finds a new write below v.
    """
    result = await conn.execute(
        update(grant_changes)
        .where(grant_changes.c.id == 1)
        .values(seq=grant_changes.c.seq + count)
        .returning(grant_changes.c.seq)
    )
    return int(result.scalar_one())
