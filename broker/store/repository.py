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

from sqlalchemy import ColumnElement, delete, func, insert, inspect, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.crypto import Keyring
from broker.errors import ConflictError
from broker.model import Grant, GrantState
from broker.store.rows import GrantRows, verify_keys
from broker.store.sealing import Sealer
from broker.store.session import Database, take_versions
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
        self._db = Database(engine)
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
        async with self._db.read() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else self._rows.open(row)

    async def get_by_id(self, grant_id: str) -> Grant | None:
        """The grant with this row id, opened, or None."""
        async with self._db.read() as conn:
            row = (await conn.execute(select(grants).where(grants.c.id == grant_id))).first()
        return None if row is None else self._rows.open(row)

    async def all(self) -> list[Grant]:
        """Every grant, opened, ordered by provider and user."""
        query = select(grants).order_by(grants.c.provider, grants.c.user_name)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [self._rows.open(row) for row in rows]

    async def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        async with self._db.read() as conn:
            await conn.execute(select(1))

    # -- writes -----------------------------------------------------------------------------

    async def insert(self, grant: Grant, now: datetime) -> Grant:
        """Store a new grant at generation 1; the row id is chosen here."""
        grant = replace(grant, id=uuid.uuid4().hex, generation=1, created_at=now, updated_at=now)
        values = {**self._rows.plain(grant), **self._rows.sealed(grant)}
        try:
            async with self._db.write() as conn:
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
        async with self._db.write() as conn:
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
        async with self._db.write() as conn:
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
    # A refresh owns its grant through a lease. `claim` takes it by compare-and-swap, only when
    # no live lease exists and the row is still the version the caller holds, and in the same
    # write records the intent to send (so a claim is the announcement that a refresh token is
    # about to leave). The outcome is stored by `commit_refresh` (new tokens, fenced by the
    # generation) or `settle` (no new tokens, fenced by the generation and the lease). Each of
    # those carries a write id, so a retry after a failure whose fate is unknown can tell that
    # its own write landed (`written_by`).

    async def due(self, now: datetime, limit: int, providers: Iterable[str]) -> list[DueGrant]:
        """Active grants of `providers` whose refresh time has come, with no live lease."""
        query = (
            select(grants.c.id, grants.c.provider, grants.c.next_refresh_at)
            .where(
                grants.c.state == GrantState.ACTIVE.value,
                grants.c.provider.in_(list(providers)),
                # An open intent is due at once: a refresh with an unknown outcome.
                or_(grants.c.next_refresh_at <= now, grants.c.intent_at.is_not(None)),
                lease_free_for(None, now),
            )
            .order_by(grants.c.next_refresh_at)
            .limit(limit)
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [DueGrant(row.id, row.provider, row.next_refresh_at) for row in rows]

    async def next_due_at(self, now: datetime, providers: Iterable[str]) -> datetime | None:
        """The earliest refresh time among active, unleased grants of `providers`."""
        query = select(func.min(grants.c.next_refresh_at)).where(
            grants.c.state == GrantState.ACTIVE.value,
            grants.c.provider.in_(list(providers)),
            lease_free_for(None, now),
        )
        async with self._db.read() as conn:
            value: datetime | None = (await conn.execute(query)).scalar_one()
        return UTCDateTime().process_result_value(value, self._db.engine.dialect)

    async def changes_since(self, version: int) -> Changes:
        """Writes and deletions with a version above `version` (by anyone), in version order."""
        async with self._db.read() as conn:
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
        async with self._db.read() as conn:
            value = (
                await conn.execute(select(grant_changes.c.seq).where(grant_changes.c.id == 1))
            ).scalar_one_or_none()
        return int(value or 0)

    async def claim(self, grant: Grant, owner: str, now: datetime, until: datetime) -> Grant | None:
        """Take the lease on `grant` and record the intent to send its refresh token.

        Succeeds only while the row is still the version `grant` was read at (so the refresh
        token about to be sent is the stored one), is active, and has no live lease of another
        owner. An intent left by an earlier owner (a refresh whose outcome is unknown) is kept,
        not renewed: the provider's grace is counted from it. Returns the claimed grant (intent
        set, at the claim's version), or None.
        """
        async with self._db.write() as conn:
            version = await take_versions(conn)
            result = await conn.execute(
                update(grants)
                .where(
                    grants.c.id == grant.id,
                    grants.c.version == grant.version,
                    grants.c.state == GrantState.ACTIVE.value,
                    lease_free_for(owner, now),
                )
                .values(
                    lease_owner=owner,
                    lease_expires_at=until,
                    intent_at=func.coalesce(grants.c.intent_at, now),
                    updated_at=now,
                    version=version,
                )
            )
            if result.rowcount != 1:
                # Nothing was written; the counter's step is rolled back with it.
                await conn.rollback()
                return None
        return replace(grant, intent_at=grant.intent_at or now, updated_at=now, version=version)

    async def take_lease(self, grant_id: str, owner: str, now: datetime, until: datetime) -> bool:
        """Take the lease on a grant without any intent (to change it outside a refresh, such
        as revoking it); False when another owner holds a live one."""
        async with self._db.write() as conn:
            result = await conn.execute(
                update(grants)
                .where(
                    grants.c.id == grant_id,
                    lease_free_for(owner, now),
                )
                .values(lease_owner=owner, lease_expires_at=until)
            )
        return bool(result.rowcount == 1)

    async def extend_lease(self, grant_id: str, owner: str, until: datetime) -> bool:
        """Move this owner's lease deadline to `until`; False when it no longer holds it."""
        async with self._db.write() as conn:
            result = await conn.execute(
                update(grants)
                .where(grants.c.id == grant_id, grants.c.lease_owner == owner)
                .values(lease_expires_at=until)
            )
        return bool(result.rowcount == 1)

    async def commit_refresh(
        self, grant: Grant, expected_generation: int, write_id: str, now: datetime
    ) -> Grant:
        """Store a successful refresh: new tokens, generation + 1, intent and lease cleared.

        Fenced by the generation alone: new tokens from the provider are the truth about the
        grant, so they land even over a lease another owner took meanwhile, unless someone
        stored a newer generation (then ConflictError).
        """
        new = replace(grant, generation=expected_generation + 1, updated_at=now, intent_at=None)
        values = {**self._rows.plain(new), **self._rows.sealed(new)}
        for fixed in ("id", "created_at", "version"):
            values.pop(fixed)
        async with self._db.write() as conn:
            version = await take_versions(conn)
            result = await conn.execute(
                update(grants)
                .where(grants.c.id == grant.id, grants.c.generation == expected_generation)
                .values(
                    **values,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_write=write_id,
                    version=version,
                )
            )
            if result.rowcount != 1:
                await conn.rollback()
                raise ConflictError(
                    f"grant {grant.name} is no longer at generation {expected_generation}"
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
        write_id: str,
        keep_intent: bool = False,
    ) -> Grant:
        """Store a refresh that produced no tokens; the tokens themselves stay untouched.

        `keep_intent` leaves the intent in place: the outcome is still unknown, and whoever
        claims the grant next carries on recovering it. Fenced by the generation and the lease.
        """
        intent = grant.intent_at if keep_intent else None
        changes: dict[str, Any] = {
            "state": state.value,
            "last_error": last_error,
            "next_refresh_at": next_refresh_at,
            "refresh_failures": refresh_failures,
            "intent_at": intent,
            "updated_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
            "last_write": write_id,
        }
        async with self._db.write() as conn:
            version = await take_versions(conn)
            result = await conn.execute(
                update(grants)
                .where(
                    grants.c.id == grant.id,
                    grants.c.generation == grant.generation,
                    grants.c.lease_owner == owner,
                )
                .values(**changes, version=version)
            )
            if result.rowcount != 1:
                await conn.rollback()
                raise ConflictError(
                    f"grant {grant.name} is no longer at generation {grant.generation} "
                    "under this lease"
                )
        return replace(
            grant,
            state=state,
            last_error=last_error,
            next_refresh_at=next_refresh_at,
            refresh_failures=refresh_failures,
            intent_at=intent,
            updated_at=now,
            version=version,
        )

    async def written_by(self, grant_id: str, write_id: str) -> Grant | None:
        """The grant as stored if its last write is the one with `write_id`, else None."""
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    select(grants).where(grants.c.id == grant_id, grants.c.last_write == write_id)
                )
            ).first()
        return None if row is None else self._rows.open(row)

    async def changed_elsewhere(self, grant_id: str, generation: int, now: datetime) -> bool:
        """Whether the row moved past `generation`, or an owner with a live lease has sent
        (or is about to send) its refresh token; a missing row counts as changed."""
        query = select(
            grants.c.generation, grants.c.intent_at, grants.c.lease_owner, grants.c.lease_expires_at
        ).where(grants.c.id == grant_id)
        async with self._db.read() as conn:
            row = (await conn.execute(query)).first()
        if row is None or row.generation != generation:
            return True
        lease_expires = UTCDateTime().process_result_value(
            row.lease_expires_at, self._db.engine.dialect
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
        async with self._db.read() as conn:
            return (await conn.execute(query)).first() is not None

    async def lease_owners(self) -> set[str]:
        """Everyone holding a lease right now (live or not)."""
        query = select(grants.c.lease_owner).where(grants.c.lease_owner.is_not(None)).distinct()
        async with self._db.read() as conn:
            return {str(owner) for owner in (await conn.execute(query)).scalars().all()}

    async def break_leases(self, owners: set[str]) -> int:
        """Drop the leases of owners known to be dead; their intents stay for recovery."""
        if not owners:
            return 0
        async with self._db.write() as conn:
            result = await conn.execute(
                update(grants)
                .where(grants.c.lease_owner.in_(owners))
                .values(lease_owner=None, lease_expires_at=None)
            )
        return int(result.rowcount)

    async def release(self, grant_id: str, owner: str) -> None:
        """Give up a lease without changing anything else (an intent stays for recovery)."""
        async with self._db.write() as conn:
            await conn.execute(
                update(grants)
                .where(grants.c.id == grant_id, grants.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    # -- keys -------------------------------------------------------------------------------

    async def key_usage(self) -> list[KeyUsage]:
        """How many grants each key id seals."""
        query = select(grants.c.key_id, func.count()).group_by(grants.c.key_id)
        async with self._db.read() as conn:
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
        async with self._db.read() as conn:
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
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        moved = 0
        async with self._db.write() as conn:
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
        async with self._db.read() as conn:
            if not await conn.run_sync(lambda sync: inspect(sync).has_table("grants")):
                return []
            return await verify_keys(conn, self.keyring)


def lease_free_for(owner: str | None, now: datetime) -> ColumnElement[bool]:
    """The condition under which `owner` (None: anyone) may take a grant's lease at `now`:
    nobody holds it, it has expired, or `owner` holds it already."""
    free = [grants.c.lease_owner.is_(None), grants.c.lease_expires_at < now]
    if owner is not None:
        free.append(grants.c.lease_owner == owner)
    return or_(*free)
